"""The training program of every bundle:  python -m runtime.train PLAN_JSON [--run-dir DIR]

Started by torchrun (launch.sh). Per process: process group -> device mesh from plan.json ->
model built and parallelized (runtime/parallel.py) -> AdamW + warmup/decay -> steps with
gradient accumulation, per-mesh gradient clipping, metrics -> DCP checkpoints. SIGUSR1 or
SIGTERM: finish the step, save, write <run_dir>/PREEMPTED, exit 0 (job.sbatch requeues).
Imports torch, transformers and the stdlib only (never the compiler).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from . import checkpoint as ckpt
from . import cp, preflight, safeio
from .data import IGNORE, Batch, PackedData, Stream, load_data
from .dims import tokens_per_step
from .errors import EXIT_USER, UserError, from_os_error
from .fused import moe_metrics, router_aux_loss
from .metrics import MetricsLog, flops_per_token, peak_flops, peak_memory
from .parallel import build, compute_context, reduce_partial_grads, set_gradient_sync
from .plan import Plan, crossed, load_plan, resolve_steps

# the per-mesh grad norm reduces a 2-D (dp_shard, tp) partial in two all-reduces; torch warns
# about it once per rank per step, which drowns the console on CPU. It is correct, just 2 ops.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


# ------------------------------------------------------------------------- process group
def init_distributed(backend: str) -> None:
    """torchrun env -> process group. The store is the agent's TCPStore, prefixed by the
    restart count: after a rank dies and torchrun restarts the group, the new workers must
    not read the dead workers' gloo addresses still in the store (with a plain
    init_process_group("gloo") such a restart failed 3 of 6 times on CPU with "Gloo connectFullMesh
    failed ... Connection refused"; with the prefixed store 6 of 6 resumed)."""
    if dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=__import__("datetime").timedelta(minutes=10))
    prefix = f"meshbake/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    kw = {"device_id": torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))} if backend == "nccl" else {}
    _STORE[:] = [dist.PrefixStore(prefix, store)]
    dist.init_process_group(backend, store=_STORE[0], rank=rank, world_size=world, **kw)


_STORE: list = []          # the rendezvous store, for reporting a user error without a collective


def report_user_error(e: UserError | None) -> None:
    """The user's error, printed once for the whole job: the first rank to claim it in the
    store prints the line. Ranks that fail only because a peer stopped (e is None: a gloo/NCCL
    error after the reporting rank exited) stay silent when a line was printed."""
    key = "meshbake/user_error"
    try:
        # no store yet (before the process group): every rank of a node read the same plan and
        # files, so its local rank 0 speaks for it, as for preflight's lines
        first = (_STORE[0].add(key, 1 if e is not None else 0) == 1 if _STORE
                 else e is not None and os.environ.get("LOCAL_RANK", "0") == "0")
    except Exception:                  # store gone: fall back to rank 0 of the job
        first = e is not None and os.environ.get("RANK", "0") == "0"
    if e is not None and first:
        # the line names a file whose name came from disk or the plan: a newline in it must not
        # start a second line, an escape sequence must not reach the terminal
        print(safeio.printable(e.line()), file=sys.stderr, flush=True)


def user_error_reported() -> bool:
    try:
        return bool(_STORE) and _STORE[0].add("meshbake/user_error", 0) > 0
    except Exception:
        return False


def device_for(plan: Plan) -> torch.device:
    if plan.mesh.device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20      # glibc's own ceiling for its dynamic threshold (64-bit), and mallopt's


def keep_host_memory() -> bool:
    """CPU training: let glibc keep the memory a step frees for the next step. By default it
    serves a block >= its mmap threshold (128 KiB, raised up to 32 MiB as such blocks are freed)
    with a fresh mmap and unmaps it on free, and gives a free heap top above 2 x that back to the
    OS; every step allocates and frees the same activations, so the next step touches new pages
    and page-faults on each 4 KiB (tiny-llama, world 1: 6,000-12,000 minor faults per step, 20-30%
    of the step's CPU time, the count varying run to run with the heap's layout). Blocks up to
    32 MiB from the heap and no trimming (-1: never; mallopt(3)): 0 faults per step after the
    first, CPU time per step 73 -> 50 ms (LoRA) on that run. Larger blocks keep being mmapped
    and returned. The process keeps its high-water heap, as the CUDA caching allocator keeps its
    device memory. Process-wide and one-way (setting a threshold turns off glibc's dynamic one).
    False where there is no glibc mallopt (macOS, musl's is a stub returning 0)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def world_mesh(plan: Plan) -> DeviceMesh:
    """([pp,] dp_replicate, dp_shard, cp, tp), tp innermost: tp groups are consecutive ranks,
    pp outermost: a stage group is world / pp consecutive ranks."""
    if dist.get_world_size() != plan.mesh.world:
        raise RuntimeError(f"plan.json is for world {plan.mesh.world} {plan.mesh.shape}, torchrun started "
                           f"{dist.get_world_size()} processes")
    return init_device_mesh(plan.mesh.device, plan.mesh.shape, mesh_dim_names=plan.mesh.mesh_dims)


# ----------------------------------------------------------------------------- optimizer
def lr_factor(i: int, plan: Plan) -> float:
    """Multiplier of train.lr at optimizer step i (0-based): linear warmup to lr, then
    cosine / linear decay to min_lr at the last step, or constant."""
    t = plan.train
    if i < t.warmup_steps:
        return (i + 1) / t.warmup_steps
    if t.lr_schedule == "constant" or t.steps <= t.warmup_steps:
        return 1.0
    progress = min(1.0, (i - t.warmup_steps) / max(1, t.steps - t.warmup_steps - 1))
    floor = t.min_lr / t.lr
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def mesh_key(p: torch.Tensor) -> tuple:
    """Which device mesh a parameter lives on, as a value (mesh objects of equal meshes are
    not always the same object, and grouping by object splits one mesh into many groups)."""
    if not isinstance(p, DTensor):
        return ()
    m = p.device_mesh
    key = _MESH_KEYS.get(m)
    if key is None:     # once per mesh: clipping groups every step, and m.mesh.tolist() is a tensor op
        key = _MESH_KEYS[m] = (tuple(m.mesh_dim_names or ()), tuple(m.mesh.flatten().tolist()))
    return key


_MESH_KEYS: dict[DeviceMesh, tuple] = {}


class AdamW(torch.optim.AdamW):
    """torch's foreach AdamW, its update run on each DTensor's local tensors.

    AdamW is elementwise: on a Shard or Replicate DTensor every foreach op computes exactly its
    local tensor's result, so running the same kernels on the local tensors gives the same bits.
    What it saves is DTensor's dispatch: ~13 foreach ops a step, each unwrapped, sharding-
    propagated per tensor and rewrapped (measured: the optimizer step was 35% of a 3-step world-4
    training step on CPU, nearly all of it sharding propagation). The state stays what torch
    creates, DTensors like their parameters (zeros_like(p)), so optimizer_state_dict and DCP
    checkpoints, their resharding across meshes, are unchanged; only the lists handed to the
    functional update are the local views of the same storage.

    _init_group is torch's PRIVATE hook (torch.optim.Adam, 2.13: Adam.step calls it with the seven
    lists it then hands to the functional adam()); torch may change it in any release.
    tests/test_train_rules.py pins its signature and checks this class against torch's AdamW bit
    for bit on DTensors: a torch upgrade that changes it fails there, not silently in a run."""

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                          state_steps)
        # a gradient in another layout than its parameter (a Partial the runtime did not reduce)
        # is redistributed as DTensor's dispatch would before the in-place update of the state
        grads[:] = [g.redistribute(p.device_mesh, p.placements)
                    if isinstance(g, DTensor) and g.placements != p.placements else g for g, p in zip(grads, params)]
        for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
            ts[:] = [_local(t) for t in ts]
        return has_complex


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (the same storage; under no_grad to_local is that tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def build_optimizer(model: torch.nn.Module, plan: Plan):
    """AdamW (above: updated on the local tensors); no weight decay on 1-D params (norms,
    biases). Params are grouped by their device mesh too (one mesh per foreach list, as
    torch's DTensor foreach ops need: kept so the param groups, hence checkpoints, are as they were),
    2-D TP+FSDP params beside 1-D FSDP-only ones when sequence parallel is off."""
    t = plan.train
    groups: dict[tuple, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((mesh_key(p), p.ndim >= 2), []).append(p)
    param_groups = [{"params": ps, "weight_decay": t.weight_decay if decay else 0.0}
                    for (_, decay), ps in sorted(groups.items())]
    opt = AdamW(param_groups, lr=t.lr, betas=t.betas, eps=t.eps, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, plan))
    return opt, sched


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group=None, skip=()) -> torch.Tensor:
    """Total L2 norm over all grads, whatever mesh they live on: norm per mesh group (a
    DTensor reduction inside the group), combined as sqrt(sum n_g^2), then scaled per group.
    clip_grad_norm_ over params on two meshes fails (aten.stack needs one mesh). pp_group:
    each pp rank holds other parameters, so the squares are summed over the pp group too
    (torchtitan's pp clipping). skip: ids of parameters clipped but not counted (under pp the
    last stage's copy of a tied table: the first stage counts the same gradient once)."""
    by_mesh: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(mesh_key(p), []).append(p)
    sq = None       # stays on the device: no host sync for the norm (train_step reads it when due)
    for ps in by_mesh.values():
        counted = [p.grad for p in ps if id(p) not in skip]
        if not counted:
            continue
        n = torch.nn.utils.get_total_norm(counted, 2.0)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        sq = n.double() ** 2 if sq is None else sq + n.double().to(sq.device) ** 2
    if pp_group is not None:
        sq = sq if sq is not None else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt() if sq is not None else torch.zeros((), dtype=torch.float64)
    if max_norm > 0:
        scale_grads([p.grad for p in params if p.grad is not None], max_norm, total)
    return total


@torch.no_grad()
def scale_grads(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """grad *= min(max_norm / (total + 1e-6), 1), torch's clip_grads_with_norm_ to the bit (the
    same float32 coefficient, one foreach multiply per device and dtype) but on the local tensors:
    scaling is elementwise and linear, right for a shard, a replica or a partial sum alike, and
    skips DTensor's dispatch of the multiply (it was 2/3 of clipping's CPU time)."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        local = _local(g)
        by_kind.setdefault((local.device, local.dtype), []).append(local)
    coef = torch.clamp(max_norm / (total.to(torch.float32) + 1e-6), max=1.0)
    for (device, _), gs in by_kind.items():
        torch._foreach_mul_(gs, coef.to(device))


# --------------------------------------------------------------------------------- faults
@dataclass
class Signals:
    """SIGUSR1 (Slurm's pre-timeout signal) / SIGTERM (preemption): stop after this step."""
    received: list[int] = field(default_factory=list)

    def install(self) -> None:
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: self.received.append(signum))


def fault_hook(where: str, step: int) -> None:
    """Test hook, inert unless MESHBAKE_FAULT='<where>:<rank>:<step>' (e.g. 'step:1:6', 'save:2:4')
    and this is the first attempt: the rank os._exit(17)s, like a node dying."""
    spec = os.environ.get("MESHBAKE_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    w, r, s = spec.split(":")
    if w == where and int(r) == dist.get_rank() and int(s) == step:
        print(f"meshbake: MESHBAKE_FAULT {spec}: rank {r} exits", file=sys.stderr, flush=True)
        os._exit(17)


# ----------------------------------------------------------------------------- training
@dataclass
class Result:
    losses: dict[int, float]          # optimizer step (1-based) -> global mean loss
    grad_norms: dict[int, float]
    step_times: dict[int, float]      # seconds per optimizer step, data loading included
    preempted: bool
    model: torch.nn.Module
    mesh: DeviceMesh
    evals: dict[int, float] = field(default_factory=dict)   # step -> eval loss


def forward_loss_sum(model, x, y, lp: bool, position_ids=None) -> torch.Tensor:
    """Sum of the token losses (labels -100 excluded): the caller divides by the global count
    of labelled tokens, so every token weighs the same whatever rank or micro-batch it is on."""
    logits = model(input_ids=x, position_ids=position_ids, use_cache=False).logits   # (B, T[/cp], V[/tp])
    with loss_parallel() if lp else nullcontext():
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(0, 1), ignore_index=IGNORE, reduction="sum")


def place_batch(job: Job, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, position_ids) of this rank, on its device: under cp its two load-balanced
    chunks, with their (per-document) positions and the cp attention mask set for them."""
    x, y, pos = b.input_ids, b.labels, b.position_ids
    if job.plan.mesh.cp_enabled and job.pipeline is not None:
        # pp: the global position_ids go on (None: one causal sequence); each stage forward makes
        # its micro-batch's local ones and mask (runtime/pp.Stage: the schedule interleaves them)
        cp_mesh = job.mesh["cp"]
        x, y = (cp.shard_sequence(t, job.plan.mesh.cp, cp_mesh.get_local_rank()) for t in (x, y))
    elif job.plan.mesh.cp_enabled:
        cp_mesh = job.mesh["cp"]
        pos = cp.set_batch(cp_mesh, job.plan.train.seq_len, pos)
        pos = pos[None, :] if pos.dim() == 1 else pos
        x, y = (cp.shard_sequence(t, job.plan.mesh.cp, cp_mesh.get_local_rank()) for t in (x, y))
    d = job.device
    return x.to(d), y.to(d), None if pos is None else pos.to(d)


@dataclass
class Job:
    """Everything a step needs, built once per run."""
    plan: Plan
    device: torch.device
    mesh: DeviceMesh
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    data: Stream
    dp_rank: int                      # ranks that see different batches: dp_replicate x dp_shard, row-major
    log: MetricsLog
    ckpt_root: Path
    eval_data: PackedData | None = None
    data_index: dict = field(default_factory=dict)
    pipeline: object = None           # runtime/pp.Pipeline with mesh.pp > 1 (model is then its owner)


def read_marker(path: Path) -> str | None:
    """The text of .shared-check (a 16-hex-digit token), None while it is not there (yet). A
    symlink, FIFO or oversized file at the name is refused (UserError): it was not rank 0's."""
    try:
        return safeio.read_text_bounded(path, limit=64)
    except FileNotFoundError:
        return None


def check_shared_run_dir(run_dir: Path, wait_s: float = 30.0) -> None:
    """Every rank must see rank 0's run dir: all ranks write their DCP shards into one step-N
    dir that rank 0 commits. On node-local disks each node would keep a part of every
    checkpoint and the first resume, hours later, would fail; fail now instead. NFS may show a
    new file on other clients only after its attribute cache expires: poll up to wait_s."""
    marker = run_dir / ".shared-check"
    token = [os.urandom(8).hex() if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        safeio.write_atomic(marker, token[0])      # a planted link there is refused, not followed
    dist.broadcast_object_list(token, src=0)
    deadline = time.monotonic() + wait_s
    while True:
        seen = read_marker(marker)
        if seen == token[0] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), seen == token[0]))
    blind = sorted({h for h, ok in views if not ok})
    if blind:
        raise RuntimeError(f"run dir {safeio.printable(run_dir)} is not shared: ranks on "
                           f"{safeio.printable(', '.join(blind))} do not see the files rank 0 "
                           f"writes there, so checkpoints would be split across node-local disks; set "
                           f"MESHBAKE_RUN_DIR to a directory on a shared filesystem")
    dist.barrier()
    if dist.get_rank() == 0:
        marker.unlink()


def clear_preempted(run_dir: Path) -> None:
    """Remove the last attempt's PREEMPTED (rank 0, at start). Only a regular file is ours to
    remove: a link or FIFO there is refused (the run dir is not this job's alone)."""
    safeio.refuse_odd(run_dir / "PREEMPTED")
    (run_dir / "PREEMPTED").unlink(missing_ok=True)


def mark_preempted(run_dir: Path, step: int) -> None:
    """<run_dir>/PREEMPTED holding the step (job.sbatch requeues when it exists): a fresh file
    renamed over the name, never written through a planted link."""
    safeio.write_atomic(run_dir / "PREEMPTED", f"{step}\n")


def copy_plan(plan_path: Path, run_dir: Path) -> None:
    """The plan the user named (their path, read as given) into <run_dir>/plan.json as a whole:
    a planted plan.json link there is refused, not written through."""
    safeio.write_atomic(run_dir / "plan.json", Path(plan_path).read_bytes())


def setup(plan: Plan, run_dir: Path) -> Job:
    device, mesh = device_for(plan), world_mesh(plan)
    if device.type == "cpu":      # the host allocator serves the compute (keep_host_memory)
        keep_host_memory()
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_preempted(run_dir)
    dist.barrier()
    if plan.checkpoint.every_steps > 0 or plan.checkpoint.per_epoch > 0 or plan.checkpoint.save_on_exit:
        check_shared_run_dir(run_dir)
    data, eval_data, index = load_data(plan, dp=plan.mesh.dp)
    # train.epochs: the step count (and warmup_ratio's warmup) from the windows, before the LR
    # schedule and the console total are built from it; every rank reads the same index
    plan = resolve_steps(plan, data.windows)
    torch.manual_seed(plan.train.seed)
    pipeline = None
    if plan.mesh.pp_enabled:
        from . import pp

        pipeline = pp.build(plan, mesh, device)
        model = pipeline.model
    else:
        model = build(plan, mesh, device)
    opt, sched = build_optimizer(model, plan)
    dp_rank = mesh["dp_replicate"].get_local_rank() * plan.mesh.dp_shard + mesh["dp_shard"].get_local_rank()
    log = MetricsLog(run_dir, enabled=dist.get_rank() == 0, plan=plan)
    return Job(plan, device, mesh, model, opt, sched, data, dp_rank, log, ckpt.ckpt_root(run_dir, plan.checkpoint.dir),
               eval_data, index, pipeline)


def resume(job: Job) -> int:
    """The step to start from: 0, or that of the newest committed checkpoint (any mesh)."""
    found = ckpt.find_resume(job.ckpt_root, job.plan.checkpoint.resume, job.log.info, ckpt.verify_all_ranks,
                             ckpt.set_aside_on_rank0)
    if found is None:
        return 0
    state = ckpt.load(found, job.model, job.opt)
    job.sched.load_state_dict(state["scheduler"])
    # the scheduler's per-group lists are rank 0's of the saving run, whose groups (one per device
    # mesh x decay: compiler-independent) may be more or fewer than this layout's (pp 2 x tp 2's
    # stage 0 of a Qwen2: norms, tp biases, tp weights; pp 1 x dp 4: norms + biases, weights); every
    # group has the same lr (one LambdaLR factor), so each list is the first entry per group here
    n = len(job.opt.param_groups)
    for k in ("base_lrs", "_last_lr"):
        if getattr(job.sched, k, None):
            setattr(job.sched, k, [getattr(job.sched, k)[0]] * n)
    start, steps = state["step"], job.plan.train.steps
    job.data.restore(state.get("data"), start)
    old_fp, new_fp = (state.get("data") or {}).get("fingerprint"), job.data_index.get("fingerprint")
    if old_fp and new_fp and old_fp != new_fp:
        job.log.info(f"data changed since {found.name} (fingerprint {old_fp[:16]} -> {new_fp[:16]}): continuing at "
                     f"sample {job.data.base + start * job.plan.train.global_batch_size} of the new data")
    job.log.info(f"resumed from {found.name} (saved on world {state['world']}), continuing at step {start + 1}"
                 if start < steps else f"resumed from {found.name}: all {steps} steps already done, nothing to train")
    return start


def log_layout(job: Job) -> None:
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    p = job.plan
    job.log.info("ranks by host: " + ", ".join(f"{h}: {rs}" for h, rs in by_host.items()))
    length = (f" ({p.train.epochs:g} epochs of {job.data.windows:,} windows / {p.train.global_batch_size} "
              "per step, rounded up)" if p.train.epochs is not None else "")
    job.log.info(f"{p.name}: world {p.mesh.world} mesh {dict(zip(p.mesh.mesh_dims, p.mesh.shape))}, "
                 f"{p.model.num_params:,} params, {p.train.steps} steps x "
                 f"{tokens_per_step(p.train):,} tokens{length}")
    if job.data_index:
        tr, w = job.data_index["splits"]["train"], job.data.windows or 0
        job.log.info(f"data {p.data.format} {job.data_index['fingerprint'][:16]}: {w:,} windows "
                     f"({w / p.train.global_batch_size:.1f} steps per epoch), packing efficiency "
                     f"{tr['packing_efficiency']:.1%}" + (f", eval {job.eval_data.windows} windows" if job.eval_data else ""))


@dataclass(frozen=True)
class StepOut:
    """One step's results. `stats` stays on the device until read: reading waits for the step
    to finish (a host sync on CUDA), so the loop reads it only when a log line, a checkpoint
    or the stop/finite checks need it (on CUDA the latter one step late, see run)."""
    stats: torch.Tensor               # [world-sum of the token-loss sums, stop flags, (coef x router aux
    #                                    loss, with train.router_aux_loss_coef > 0), grad norm before clipping]
    loss_div: float                   # tp x labelled tokens of the global batch: world-sum / loss_div = mean
    lr: float
    seconds: float                    # host time of the step (its wall time whenever stats were read)

    @property
    def values(self) -> tuple[float, bool, float]:
        """(loss, stop, grad norm); the loss is transformers': cross-entropy + coef x aux."""
        v = self.stats.tolist()
        loss_sum, flag, aux, gnorm = v if len(v) == 4 else (v[0], v[1], 0.0, v[2])
        return loss_sum / self.loss_div + aux, flag > 0, gnorm

    @property
    def aux(self) -> float:           # coef x router aux loss (0 when not added)
        return self.stats[2].item() if self.stats.numel() == 4 else 0.0

    @property
    def loss(self) -> float:          # global mean over every token of the global batch
        return self.values[0]

    @property
    def grad_norm(self) -> float:
        return self.values[2]

    @property
    def stop(self) -> bool:           # some rank got SIGUSR1/SIGTERM
        return self.values[1]


def train_step(job: Job, step: int, stop_requested: bool) -> StepOut:
    """One optimizer step: grad_accum micro-steps (FSDP reduce-scatters after each, or with
    grad_sync last_micro_step after the last only, holding unsharded grads in between),
    global-norm clipping, AdamW, LR schedule."""
    plan, device, accum = job.plan, job.device, job.plan.train.grad_accum
    lp = plan.tp.loss_parallel        # the compiler's decision (off at tp = 1: ParallelDims.tp_flags)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # loss = sum of token losses / labelled tokens of the whole global batch; FSDP averages the
    # gradients over the dp x cp ranks, so each rank's backward is scaled by dp * cp / N
    n_tokens = max(1, job.data.loss_tokens(step))
    scale = plan.mesh.dp * plan.mesh.cp / n_tokens
    # MoE with train.router_aux_loss_coef: + coef x the load-balancing loss of each global
    # micro-step (all ranks' tokens, runtime/fused.py), averaged over the micro-steps
    coef, aux_sum = plan.train.router_aux_loss_coef, torch.zeros((), dtype=torch.float64, device=device)
    if job.pipeline is not None:     # the micro-batches go through the pipeline schedule instead
        accum = 0
        loss_sum += pipeline_micro_steps(job, step, scale)
        if coef > 0:                 # the last stage's coef x aux (x pp: see pp.aux_sum), 0 on the others
            from .pp import aux_sum as pp_aux

            aux_sum += pp_aux(job.pipeline, plan.mesh.pp).to(aux_sum.device)
    for micro in range(accum):
        set_gradient_sync(job.model, micro == accum - 1 or plan.train.grad_sync == "every_micro_step")
        x, y, pos = place_batch(job, job.data.micro_batch(step, micro, job.dp_rank))      # (mbs, T[/cp])
        with compute_context(plan, device):
            loss = forward_loss_sum(job.model, x, y, lp, pos)
        aux = router_aux_loss(job.model, plan.mesh.tp) if coef > 0 else None
        with loss_parallel() if lp else nullcontext():
            if aux is None or not aux[0].requires_grad:     # (LoRA: a frozen router's aux has no gradient)
                (loss * scale).backward()
            else:       # one backward for both; the local aux term is scaled like the CE for FSDP's mean
                torch.autograd.backward([loss * scale, aux[0] * (coef * plan.mesh.dp * plan.mesh.cp / accum)])
            if aux is not None:
                aux_sum += aux[1].detach().to(aux_sum.device) * (coef / accum)
        loss_sum += (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach().double()
    if plan.mesh.tp_enabled and not plan.mesh.fsdp_enabled:
        reduce_partial_grads(job.model)
    if job.pipeline is not None:     # tied embeddings: the two copies' gradients summed (both take one update)
        from . import pp

        pp.tied_grads(job.pipeline)
    # one all-reduce over the world: [loss sum, stop], in flight while clipping and the optimizer
    # step run. The sum is the same on the tp ranks of a dp x cp coordinate, so
    # world-sum / tp / N = the global token mean; any rank's stop flag stops every rank.
    flag = torch.tensor(float(stop_requested), dtype=torch.float64, device=device)
    # aux: the same on every rank; only with the aux loss on (a dense step's all-reduce stays 16 B)
    stats = torch.stack([loss_sum, flag] + ([aux_sum / plan.mesh.world] if coef > 0 else []))
    pending = dist.all_reduce(stats, async_op=True)
    pipe = job.pipeline
    gnorm = clip_grad_norm([p for p in job.model.parameters() if p.requires_grad], plan.train.grad_clip,
                           pipe.pp_group if pipe is not None else None, pipe.norm_skip if pipe is not None else ())
    lr = job.sched.get_last_lr()[0]
    job.opt.step()
    job.sched.step()
    job.opt.zero_grad(set_to_none=True)
    pending.wait()
    stats = torch.cat([stats, gnorm.to(stats.device, torch.float64).view(1)])
    return StepOut(stats, plan.mesh.tp * n_tokens, lr, time.perf_counter() - t0)


def pipeline_micro_steps(job: Job, step: int, scale: float) -> torch.Tensor:
    """mesh.pp > 1: this dp rank's grad_accum micro-batches (the same samples, in the same order,
    as the loop in train_step) stacked to (accum x mbs, T) and run by the pipeline schedule,
    which splits them back into pp.microbatches = grad_accum micro-batches. The loss sum is
    the last stage's (0 on the others; the step's world all-reduce adds them)."""
    from . import pp

    xs, ys, ps = [], [], []
    for micro in range(job.plan.train.grad_accum):
        x, y, pos = place_batch(job, job.data.micro_batch(step, micro, job.dp_rank))
        xs.append(x)
        ys.append(y)
        ps.append(pos)
    # packed data: the per-document position_ids go to every stage as a schedule kwarg
    pos = torch.cat(ps) if ps[0] is not None else None
    return pp.step(job.pipeline, torch.cat(xs), torch.cat(ys), scale, pos)


def evaluate(job: Job) -> dict[str, float] | None:
    """Loss and perplexity over the whole eval split (every rank its dp share, padded to the
    same number of forwards): sum of token losses / labelled tokens, all-reduced."""
    if job.eval_data is None:
        return None
    lp = job.plan.tp.loss_parallel
    acc = torch.zeros(2, dtype=torch.float64, device=job.device)
    job.model.eval()
    with torch.no_grad():
        if job.pipeline is not None:       # forward-only pipeline; sums on the last stage only
            from . import pp

            ce, n = pp.eval_loss(job.pipeline, job.eval_data.eval_batches(job.dp_rank), lambda b: place_batch(job, b))
            acc += torch.stack([ce, n]).to(acc.device)
        for b in job.eval_data.eval_batches(job.dp_rank) if job.pipeline is None else ():
            x, y, pos = place_batch(job, b)
            with compute_context(job.plan, job.device):
                loss = forward_loss_sum(job.model, x, y, lp, pos)
            acc[0] += (loss.full_tensor() if isinstance(loss, DTensor) else loss).double()
            acc[1] += (y != IGNORE).sum().double()
    job.model.train()
    dist.all_reduce(acc)           # tp ranks repeat the same sums: the ratio is unaffected
    if acc[1].item() == 0:         # no labelled eval token: no number beats a made-up 0.0 / ppl 1.0
        return None
    loss = (acc[0] / acc[1]).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(acc[1].item()) // job.plan.mesh.tp}


@dataclass(frozen=True)
class Marks:
    """Which per-epoch marks step n's samples crossed (train.evals_per_epoch, checkpoint.per_epoch;
    runtime/plan.crossed) and the epoch reached after it (samples consumed / windows; None for
    synthetic data). From the samples-consumed counter, so a resume (on any dp size) keeps them."""
    eval: bool = False
    save: bool = False
    epoch: float | None = None


def marks(job: Job, n: int) -> Marks:
    data, plan = job.data, job.plan
    after = data.state(n)["samples_consumed"]
    before = after - data.global_batch
    w = data.windows
    return Marks(crossed(before, after, w, plan.train.evals_per_epoch),
                 crossed(before, after, w, plan.checkpoint.per_epoch), after / w if w else None)


def eval_due(plan: Plan, n: int, mark: Marks = Marks()) -> bool:
    every = plan.train.eval_every
    return bool((every and n % every == 0) or n == plan.train.steps or mark.eval)


def checkpoint_due(plan: Plan, n: int, stop: bool, mark: Marks = Marks()) -> bool:
    """Save after step n? Every `every_steps`, at the per-epoch marks (checkpoint.per_epoch), and
    with save_on_exit also at the last step and on a stop signal, whatever every_steps is:
    every_steps 0 + save_on_exit (the defaults) means "one checkpoint, of the finished model",
    never "no model at the end"."""
    every, last = plan.checkpoint.every_steps, n == plan.train.steps
    return bool((every and n % every == 0) or mark.save or (plan.checkpoint.save_on_exit and (stop or last)))


def read_due(plan: Plan, device: torch.device, n: int, mark: Marks = Marks()) -> bool:
    """Read step n's numbers now? Always on CPU (free); on CUDA only where a log line or a
    possible checkpoint needs them, so the host keeps queueing steps ahead of the GPU."""
    t, every = plan.train, plan.checkpoint.every_steps
    return (device.type != "cuda" or n % t.log_every == 0 or n == t.steps
            or bool(every and n % every == 0) or mark.save or eval_due(plan, n, mark))


def check_finite(job: Job, n: int, loss: float, grad_norm: float) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    # loss and norm are all-reduced, so every rank stops here together. The weights may
    # already hold NaN: saving them would prune the good checkpoints (keep) and a requeue
    # would resume from garbage. Stop before any save; the last commit stays.
    job.log.info(f"step {n}: loss {loss}, grad norm {grad_norm}: not finite; stopping without a checkpoint "
                 "(resume continues from the last committed one; lower train.lr or raise warmup)")
    raise FloatingPointError(f"non-finite loss/grad norm at step {n}")


def run(plan: Plan, run_dir: Path, signals: Signals | None = None) -> Result:
    job = setup(plan, run_dir)
    plan = job.plan               # train.steps resolved (train.epochs: from the prepared windows)
    start = resume(job)
    log_layout(job)
    step_tokens = tokens_per_step(plan.train)
    fpt, peak = flops_per_token(plan), peak_flops(job.device)
    res = Result({}, {}, {}, False, job.model, job.mesh)
    peak_memory(job.device)       # peaks per log window: start-up (full-tensor init) is not training
    unread: tuple[int, StepOut] | None = None     # CUDA: the last step whose numbers were not read yet
    window_t0, window_c0, window_steps = time.perf_counter(), time.process_time(), 0
    for step in range(start, plan.train.steps):
        n = step + 1
        fault_hook("step", n)
        out = train_step(job, step, bool(signals and signals.received))
        res.step_times[n], window_steps = out.seconds, window_steps + 1
        mark = marks(job, n)
        stop = False
        if unread is not None:        # one step late: finished by now, reading it costs no stall
            m, prev = unread
            loss, stop, gnorm = prev.values
            res.losses[m], res.grad_norms[m] = loss, gnorm
            check_finite(job, m, loss, gnorm)
            unread = None
        if not read_due(plan, job.device, n, mark):
            unread = (n, out)
            if not stop:
                continue
        loss, stop_now, gnorm = out.values
        stop = stop or stop_now
        res.losses[n], res.grad_norms[n] = loss, gnorm
        check_finite(job, n, loss, gnorm)
        ev = evaluate(job) if eval_due(plan, n, mark) else None
        if ev:
            res.evals[n] = ev["eval_loss"]
        if n % plan.train.log_every == 0 or n == plan.train.steps or ev:
            seconds = (time.perf_counter() - window_t0) / window_steps   # mean over the steps since the last line
            # this rank's CPU seconds a step (all its threads): on a shared CPU machine the gap to
            # step_time_s is the time it waited for a core or a peer (meshbake calibrate's closed loop)
            cpu_s = (time.process_time() - window_c0) / window_steps
            tps = step_tokens / seconds
            job.log.step({"step": n, **({"epoch": round(mark.epoch, 4)} if mark.epoch is not None else {}),
                          "loss": loss, "lr": out.lr, "grad_norm": gnorm,
                          "step_time_s": seconds, "cpu_time_s": cpu_s, "tokens_per_s": tps,
                          "tokens_per_s_per_device": tps / plan.mesh.world,
                          "mfu": (fpt * tps / plan.mesh.world / peak) if peak else None,
                          **peak_memory(job.device), **moe_metrics(job.model), **(ev or {}),
                          **({"lm_loss": loss - out.aux} if plan.train.router_aux_loss_coef > 0 else {})})
            window_t0, window_c0, window_steps = time.perf_counter(), time.process_time(), 0
        if checkpoint_due(plan, n, stop, mark):
            data_state = dict(job.data.state(n), fingerprint=job.data_index.get("fingerprint"))
            path = ckpt.save(job.ckpt_root, n, job.model, job.opt,
                             {"step": n, "scheduler": job.sched.state_dict(), "data": data_state},
                             plan.checkpoint.keep, lambda where, n=n: fault_hook(where, n))
            job.log.info(f"checkpoint {path.name} committed")
            window_t0, window_c0, window_steps = time.perf_counter(), time.process_time(), 0
        if stop:
            if dist.get_rank() == 0:
                mark_preempted(run_dir, n)
            saved = "saved" if plan.checkpoint.save_on_exit else "NOT saved (checkpoint.save_on_exit: false)"
            job.log.info(f"stop signal: {saved} at step {n}, exiting for requeue")
            res.preempted = True
            break
    job.log.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.train", description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--run-dir", default=None, help="default: $MESHBAKE_RUN_DIR, else plan.run_dir (relative to cwd)")
    args = ap.parse_args(argv)
    signals = Signals()
    signals.install()
    try:          # before the process group: a user error is one line (local rank 0) and exit 3, no group to leave
        plan = load_plan(args.plan)
        problems = preflight.problems(plan)
        if problems:
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print("\n".join(f"meshbake: {safeio.printable(p)}" for p in problems), file=sys.stderr, flush=True)
            return 2
        if plan.data.format != "synthetic":      # prepared, complete, and not stale: or one line, no group
            from .prepare import DataError, locate
            try:
                locate(plan)
            except DataError as e:
                if os.environ.get("LOCAL_RANK", "0") == "0":
                    print(f"meshbake: {safeio.printable(e)}", file=sys.stderr, flush=True)
                return 2
    except UserError as e:
        report_user_error(e)
        return EXIT_USER
    run_dir = Path(args.run_dir or os.environ.get("MESHBAKE_RUN_DIR") or plan.run_dir)
    try:
        # inside the try: gloo's connectFullMesh returns on one rank before its peers finish
        # theirs, so rank 0 can hit a user error (a read-only run dir) and exit while rank 1 is
        # still connecting; rank 1's "Connection closed by peer" is then that error, not a bug
        # (one CI run printed rank 1's traceback under rank 0's one line)
        init_distributed(plan.mesh.backend)
        if dist.get_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            copy_plan(Path(args.plan), run_dir)
        run(plan, run_dir, signals)
    except BaseException as e:         # BaseException: DCP's CheckpointException is one
        user = e if isinstance(e, UserError) else from_os_error(e)
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or (user is None and not user_error_reported()):
            raise                      # a bug, or a fault that is not the user's: the traceback is the report
        # the user's data, paths, permissions or disk: one line from one rank, no traceback on
        # any rank (peers that failed because this rank stopped exit quietly with it)
        report_user_error(user)
        sys.stderr.flush()
        os._exit(EXIT_USER)            # no process-group teardown: peers may be gone
    # every rank leaves its last collective before any rank closes its gloo pairs: a rank that
    # tore down while a peer was still in one aborted that peer at exit ("terminate called
    # without an active exception", SIGABRT, exit 1 after a complete run; seen once under load)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
