"""The datasheet step-time model: GPU profiles, matmul and attention efficiency, collectives.

estimate.step_time calls `datasheet_step` for every cuda plan without a `meshbake calibrate`
profile; suggest calls it per candidate, so everything here is O(distinct GEMM shapes).

Per rank and optimizer step (docs/PERFORMANCE.md has the sources and the fitted constants):
  matmul       sum over the step's GEMMs (m, n, k after TP, m = micro-batch tokens / cp) of
               passes x 2 m n k / (peak x eff); eff = gpu fraction / (1 + KAPPA x ridge / I):
               I = 1 / (1/m + 1/n + 1/k) is the GEMM's FLOPs per byte moved (bf16: 2 m n k FLOPs
               over 2 (m n + n k + m k) bytes), ridge = peak / HBM bandwidth (the roofline's
               corner), so a large GEMM saturates at the GPU's fraction and a thin one (TP-split,
               one short sequence) falls toward the memory bound; a thin GEMM (a dimension of at
               most THIN_DIM: LoRA's rank-r products) streams at the memory bound, pb (m n + n k +
               m k) bytes at the HBM bandwidth (gemm_seconds)
  attention    12 L H Dh T FLOPs per token (runtime/flops.py, causal not halved) at peak x gpu
               fraction x ATTN[kernel] x T / (T + ATTN_T0): flash skips the masked half, the
               masked (memory-efficient) kernel computes all T^2, eager writes the scores out
  element-wise norms, RoPE, SiLU, residual adds and the loss: memory-bound, EW_PASSES x
               (h / (tp unless SP) + (I + q + 2 kv) / tp) x pb bytes per token and layer, plus the
               logits 6 x 4 B x vocab (/tp under loss parallel), at the HBM bandwidth;
               torch.compile (train.compile) fuses them: x (1 - COMPILE_FUSION)
  recompute    full AC: the forward again (1/3 of the matmuls, ATTN_FWD of the attention, 1/3 of
               the element-wise); selective (runtime: every mm and SDPA output saved, the rest
               recomputed): 1/3 of the element-wise
  collectives  each row: wire bytes / bus bandwidth + its latency (collective_seconds); TP, CP
               and EP exposed; FSDP/HSDP hidden behind the compute except the first all-gather
               and the last reduce-scatter of a step (1 / (blocks + 1) of the traffic) and what
               exceeds the compute
Float8 is out of scope: the runtime has no Float8 converter, so no recipe can ask for it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from meshbake.compiler.memo import cached

# --------------------------------------------------------------------------------- GPU profiles


@dataclass(frozen=True)
class GPU:
    """Datasheet facts of one GPU (docs/PERFORMANCE.md gives each number's source)."""
    name: str
    peak_tflops: float        # dense bf16 tensor-core TFLOP/s (no sparsity)
    hbm_gbps: float           # memory bandwidth, GB/s
    intra_node_gbps: float    # GPU-to-GPU inside a node, GB/s per direction (NVLink, else PCIe)
    inter_node_gbps: float    # one NIC, GB/s (typical server)
    nics_per_node: int        # typical server
    gpus_per_node: int
    memory_gb: float
    family: str               # whose fitted fraction applies (FRACTION)


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("a100-40gb", 312, 1555, 300, 25, 8, 8, 40, "a100"),
    GPU("a100-80gb", 312, 2039, 300, 25, 8, 8, 80, "a100"),
    GPU("h100-sxm", 989, 3350, 450, 50, 8, 8, 80, "h100"),
    GPU("h100-pcie", 756, 2000, 64, 50, 4, 8, 80, "h100"),
    GPU("h200", 989, 4800, 450, 50, 8, 8, 141, "h100"),
    GPU("b200", 2250, 8000, 900, 50, 8, 8, 180, "b200"),
    GPU("l40s", 362, 864, 32, 25, 2, 8, 48, "l40s"),
)}

# ------------------------------------------------------------------------ fitted constants
# Fitted by `python -m bench.published --fit` on the fit part of bench/published_runs.json, from
# bench.published.neutral()'s start (docs/PERFORMANCE.md: fit and held-out errors); 3 digits.
# the share of peak a large GEMM reaches (fwd + bwd, bf16), per GPU family: a100 and h100 fitted;
# b200, l40s and a GPU outside the catalog have no published run in the set and take h100's
FRACTION = {"a100": 0.915, "h100": 0.770, "b200": 0.770, "l40s": 0.770, "generic": 0.770}
KAPPA = 4.48              # GEMM saturation: eff halves at I = KAPPA x ridge
ATTN_FLASH = 0.529        # flash attention's rate on counted FLOPs, relative to the GPU fraction
ATTN_T0 = 16              # seq at which attention reaches half its rate (fitted to the bound: the runs,
                          # seq 512-65536, show no shortfall at short sequences)
# counted, not fitted: HF Llama's eager element-wise ops of one layer and token, forward, in bytes at
# bf16: 2 RMSNorms (fp32 upcast, pow, mean, rsqrt-mul, weight-mul: ~42 h), RoPE on q, k (~12 (h + kv)),
# 2 residual adds (6 h each), SiLU x up (10 I... ), q/k/v/o transposes (16 h): ~136 h + 24 kv + 10 I;
# backward ~2x: ~408 h + 72 kv + 30 I bytes = EW_PASSES x 2 x (2h + I + 2kv) at EW_PASSES ~44 (8B)
EW_PASSES = 44
COMPILE_FUSION = 0.99     # share of that traffic torch.compile (or a codebase's fused kernels) removes
# stated, not fitted (no published run in the set uses them): the masked kernel computes both
# halves of the causal T^2 (flash skips one): half flash's rate on the counted FLOPs, and a
# further 0.7 for the memory-efficient kernel against flash (FlashAttention-2 paper, fig. 4-6);
# eager attention materializes the scores: a tenth
ATTN = {"flash": 1.0, "masked": 0.35, "eager": 0.1}
# stated, not fitted: a GEMM with a dimension this small (one H100 tensor-core tile, 128 wide in
# CUTLASS's Hopper kernels) is timed as memory-bound streaming (gemm_seconds)
THIN_DIM = 128
ATTN_FWD = 2 / 7          # FlashAttention-2: backward ~2.5x the forward -> forward = 1 / 3.5
LOGIT_PASSES = 6          # fp32 logits: written, log-softmax read + written, grad written + read, cast
# collectives (NCCL's tuning model, src/graph/tuning.cc: ring LL128 base 3.6 us, 2.5 us per
# NVLink / network hop; tree across nodes); bus efficiency from nccl-tests (PERFORMANCE.md)
BASE_LAT_S = 3.6e-6
HOP_LAT_S = {"intra": 2.5e-6, "inter": 2.5e-6}
NET_HOP_EXTRA_S = 5e-6    # a hop that leaves the node: NIC + switch
NVLINK_EFF = 0.80         # nccl-tests busbw / NVLink per-direction bandwidth (DGX H100 ~360/450)
NET_EFF = 0.90            # nccl-tests busbw / NIC line rate (IB NDR ~45/50 GB/s)


@dataclass(frozen=True)
class Consts:
    """The fitted constants as one value, so bench.published --fit can vary them."""
    fraction: tuple[tuple[str, float], ...] = tuple(FRACTION.items())
    kappa: float = KAPPA
    attn_flash: float = ATTN_FLASH
    attn_t0: float = ATTN_T0
    ew_passes: float = EW_PASSES
    compile_fusion: float = COMPILE_FUSION

    def frac(self, family: str) -> float:
        d = dict(self.fraction)
        return d.get(family, d["generic"])


DEFAULT = Consts()


def gpu_of(name: str | None, peak_tflops: float) -> GPU:
    """cluster.gpu's profile; without one, the catalog GPU of the same peak (a profile that gives
    peak_tflops 312 is an A100), else a generic one with the cluster's peak."""
    if name in GPUS:
        return GPUS[name]
    for g in GPUS.values():
        if g.peak_tflops == peak_tflops:
            return g
    return GPU("generic", peak_tflops, 0, 0, 0, 0, 0, 0, "generic")


# -------------------------------------------------------------------------------- compute


def gemm_seconds(m: int, n: int, k: int, peak: float, hbm: float, pb: int, fraction: float, kappa: float) -> float:
    """One GEMM's time: 2 m n k / (peak x gemm_efficiency), except a thin one (a dimension of at
    most THIN_DIM: LoRA's rank-r A and B products, a GQA k/v projection split by TP to 128 rows,
    a handful of routed tokens): one tensor-core tile
    spans that dimension, so the kernel streams the large operands once and is bound by memory:
    pb (m n + n k + m k) bytes at the HBM bandwidth. The KAPPA curve is fitted on GEMMs whose
    smallest dimension is 1024 or more (I 780-5440 in bench/published_runs.json); extrapolated to I ~ 16 (rank 16) it charges
    KAPPA / FRACTION ~ 6.6x that streaming time: 8B LoRA (rank 16, all linears) on one H100 at
    4.1 s of a 10.5 s measured step, against 0.6 s of bytes."""
    if min(m, n, k) <= THIN_DIM:
        return pb * (m * n + n * k + m * k) / hbm
    return 2 * m * n * k / (peak * gemm_efficiency(m, n, k, peak / hbm, fraction, kappa))


def gemm_efficiency(m: int, n: int, k: int, ridge: float, fraction: float, kappa: float) -> float:
    """Share of peak one GEMM reaches: fraction / (1 + kappa x ridge / I), I = 1/(1/m + 1/n + 1/k).
    8B on H100 (m 16384, n = k = 4096): I = 1820, ridge 989/3.35 = 295, KAPPA 4.48: 0.58 of the
    fraction (0.45 of peak); 70B TP 8 at seq 8192 (m 8192, n 1024, k 8192): I = 819: 0.38 of it."""
    i = 1 / (1 / m + 1 / n + 1 / k)
    return fraction / (1 + kappa * ridge / i)


@dataclass(frozen=True)
class Work:
    """What one rank computes per micro-batch, the model's inputs besides the constants."""
    gemms: tuple[tuple[int, int, int, int, int], ...]   # (m, n, k, passes, count), distinct shapes
    attn_flops: float          # counted attention FLOPs (fwd + bwd) of one micro-batch on this rank
    seq: int                   # keys per query row (seq_len)
    kernel: str                # flash | masked | eager
    ew_elems: float            # element-wise elements per micro-batch (h + (I + q + 2kv)/tp ... x L x tokens)
    logit_elems: float         # logits elements per micro-batch on this rank
    pb: int                    # compute dtype bytes
    micro: float               # micro-batches per rank per step (grad_accum; a pp stage runs them all)
    blocks: int                # decoder blocks (FSDP units: blocks + root)
    compile: bool
    ac: str


def work_of(recipe, model, mesh, gemms, kernel: str) -> Work:
    """The per-micro-batch work from the plan (estimate.gemm_shapes) and the model's sizes."""
    from meshbake.compiler.placements import DTYPE_BYTES

    t = recipe.train
    tokens = t.micro_batch_size * t.seq_len // mesh.cp
    tp, sp = mesh.tp, mesh.sequence_parallel
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    ew = model.num_layers * tokens * (model.hidden_size / (tp if sp else 1)
                                      + (model.intermediate_size + q + 2 * kv) / tp)
    attn = 12 * model.num_layers * model.num_heads // tp * model.head_dim * t.seq_len * tokens
    return Work(_counted(gemms), attn, t.seq_len, kernel, ew,
                tokens * model.vocab_size / (tp if mesh.loss_parallel else 1),
                DTYPE_BYTES[t.mixed_precision.param_dtype], mesh.grad_accum, model.num_layers,
                bool(t.compile), t.activation_checkpointing)


_COUNTED: dict = {}


def _counted(gemms) -> tuple[tuple[int, ...], ...]:
    """(m, n, k, passes, count) per distinct shape: ~7 of the L x 7 matmuls, so the model's cost is
    O(shapes). Memoized per gemms object (estimate.gemm_shapes returns its cached tuple): suggest
    counted the same ~560 shapes for each of 1,253 candidates of 70B on 64 GPUs (~4% of its time)."""
    return cached(_COUNTED, id(gemms), (gemms,),
                  lambda: tuple((*g, cnt) for g, cnt in sorted(Counter(gemms).items())), size=1024)


def kernel_of(attn_kernel: str) -> str:
    """estimate.attention_memory's kernel line -> flash | masked | eager."""
    return "eager" if attn_kernel.startswith("eager") else "masked" if "mask" in attn_kernel else "flash"


@dataclass(frozen=True)
class Compute:
    matmul_s: float
    attention_s: float
    elementwise_s: float
    recompute_s: float


def compute_seconds(w: Work, gpu: GPU, peak_tflops: float, hbm_gbps: float, cs: Consts = DEFAULT) -> Compute:
    """Per rank per optimizer step (all micro-batches)."""
    peak, hbm = peak_tflops * 1e12, hbm_gbps * 1e9
    frac = cs.frac(gpu.family)
    one = {g[:3]: gemm_seconds(*g[:3], peak, hbm, w.pb, frac, cs.kappa) for g in w.gemms}
    mm = sum(cnt * p * one[m, n, k] for m, n, k, p, cnt in w.gemms)
    rate = frac * cs.attn_flash * ATTN[w.kernel] * w.seq / (w.seq + cs.attn_t0)
    attn = w.attn_flops / (peak * rate)
    ew_bytes = cs.ew_passes * w.ew_elems * w.pb + LOGIT_PASSES * 4 * w.logit_elems
    ew = ew_bytes / hbm * (1 - cs.compile_fusion if w.compile else 1.0)
    # matmuls: forward 2 of 6 FLOPs per parameter (frozen: 2 of 4); element-wise forward ~1/3
    fwd_mm = sum(cnt * one[m, n, k] for m, n, k, p, cnt in w.gemms)
    if w.ac == "full":
        re = fwd_mm + ATTN_FWD * attn + ew / 3
    elif w.ac == "selective":
        re = ew / 3
    else:
        re = 0.0
    return Compute(mm * w.micro, attn * w.micro, ew * w.micro, re * w.micro)


# ----------------------------------------------------------------------------- collectives


@dataclass(frozen=True)
class Group:
    """Where one collective group's ranks sit: size, members per node, nodes it spans."""
    size: int
    per_node: int
    nodes: int


def group_of(size: int, stride: int, gpus_per_node: int) -> Group:
    """A group of `size` ranks `stride` apart (consecutive ranks fill a node first)."""
    if size <= 1:
        return Group(1, 1, 1)
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    return Group(size, per_node, -(-size // per_node))


def bus_gbps(g: Group, gpu: GPU, intra_gbps: float, nic_gbps: float, nics: int, gpus_per_node: int) -> float:
    """Bus bandwidth of the group (nccl-tests' busbw: wire bytes per rank / time).
    Inside a node: NVLink x NVLINK_EFF. Across nodes NCCL runs one ring (or tree) per rail: a
    node's members send their crossing traffic over the NICs of their rails, so the group gets
    per_node / gpus_per_node of the node's NICs, and never more than NVLink between its members:
    a flat group over whole nodes (FSDP 128) gets all 8 NICs (400 GB/s on a DGX H100), a
    group of one GPU per node (HSDP's replicas) its own NIC (50 GB/s)."""
    nvl = intra_gbps * NVLINK_EFF
    if g.nodes <= 1:
        return nvl
    net = nics * nic_gbps * NET_EFF * min(1.0, g.per_node / gpus_per_node)
    return min(nvl, net)


def latency_s(op: str, g: Group) -> float:
    """One call's start-up: ring hops (n - 1 for all-gather / reduce-scatter, 2 (n - 1) for
    all-reduce) inside a node; across nodes all-reduce takes NCCL's tree (2 log2 nodes network hops
    + 2 (per_node - 1) NVLink ones), the others the ring with one network hop per node crossed."""
    if g.size <= 1:
        return 0.0
    intra, inter = HOP_LAT_S["intra"], HOP_LAT_S["inter"] + NET_HOP_EXTRA_S
    if g.nodes <= 1:
        hops = 2 * (g.size - 1) if op == "all_reduce" else g.size - 1
        return BASE_LAT_S + hops * intra
    if op == "all_reduce":
        return BASE_LAT_S + 2 * math.ceil(math.log2(g.nodes)) * inter + 2 * (g.per_node - 1) * intra
    return BASE_LAT_S + g.nodes * inter + (g.size - g.nodes) * intra


def fsdp_exposed(dp_s: float, compute_s: float, blocks: int) -> float:
    """FSDP2 prefetches block i+1's all-gather during block i and reduce-scatters block i's
    gradients during block i-1's backward: the first gather and the last reduce of a step (one
    FSDP unit of blocks + 1: the root) wait, the rest hides unless it outlasts the compute."""
    if not dp_s:
        return 0.0
    first = dp_s / (blocks + 1)
    return first + max(0.0, dp_s - first - compute_s)


# ------------------------------------------------------------------------------ error band
# bench.published at the constants above (docs/PERFORMANCE.md; tests/test_published.py recomputes
# them and fails when the held-out share drops below HELD_OUT_WITHIN)
HELD_OUT_ROWS = 23
HELD_OUT_WITHIN = 0.913   # share of held-out published runs within +-20% of measured tokens/s per GPU (21 of 23)
HELD_OUT_MEDIAN = 0.082   # their median |predicted / measured - 1| (0.073 before a pp stage's TP rows
#                           counted its own blocks, issue #27 item 4: the PP 4 rows read faster, docs/PERFORMANCE.md)


def band_line() -> str:
    """PLAN.md's and suggest's statement of how sure the model is."""
    return (f"+-20% on {HELD_OUT_WITHIN:.0%} of {HELD_OUT_ROWS} held-out published runs (median error "
            f"{HELD_OUT_MEDIAN:.0%}, docs/PERFORMANCE.md)")
