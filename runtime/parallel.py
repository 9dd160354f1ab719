"""Build the model and parallelize it exactly as plan.json says.

Order (torchtitan's): meta model -> TP (parallelize_module with the plan's placements) ->
activation checkpointing -> torch.compile per block -> FSDP2 fully_shard per block, then the
root (skipped when the data-parallel mesh is one rank: ParallelDims.fsdp_enabled) -> materialize (to_empty)
-> a tied lm_head made the embedding's parameter again (retie) -> weights: deterministic init or the user's safetensors.

Random init produces each tensor FULL, one at a time, and every rank keeps its own slice
(`distribute_tensor(..., src_data_rank=None)` slices locally, no communication). So a run
on any mesh starts from bit-identical weights, which is what the parity tests rely on; the
peak extra memory is one full tensor (the 70B embedding: 128256 x 8192 x 4 B = 4.2 GB).
Weights from safetensors are read as this rank's block only (lazy slices), where the shard
is one block of the full tensor, as it is for FSDP x TP Linears and embeddings.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from . import hub, safeio
from .dims import SHARD_CP, ParallelDims
from .errors import UserError
from .plan import Plan
from .roles import SHARD_DIM, attention_name, mlp_name, plan_roles, transposed_experts
from .safeio import printable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


# config keys transformers resolves to code: an attention / experts implementation "org/repo" is a
# Hub kernel that from_config downloads and runs. The plan's attention (plan.model.attn_implementation)
# is set on the config by the caller; a plan.json carrying these keys (written by hand, or by an
# older compiler) must not reach the kernel loader, here or in export. Same set as compiler/model.py.
KERNEL_KEYS = frozenset({"attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                         "experts_implementation", "_experts_implementation", "_experts_implementation_internal"})


def _without_kernel_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy without KERNEL_KEYS, in sub-configs too; a nested dict without them stays the same object."""
    def nested(v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = _without_kernel_keys(v)
        return v if out == v else out
    return {k: nested(v) for k, v in config.items() if k not in KERNEL_KEYS}


def hf_config(config: dict[str, Any]):
    from transformers import AutoConfig

    cfg = _without_kernel_keys(config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    return AutoConfig.for_model(model_type, **cfg)


def meta_model(plan: Plan) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = hf_config(plan.model.config)
    cfg._attn_implementation = plan.model.attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[plan.train.dtype])
    model.config.use_cache = False
    model.config.output_router_logits = False    # MoE: the runtime adds the aux loss itself (runtime/fused.py)
    return model


def decoder_layers(model: nn.Module, plan: Plan) -> list[nn.Module]:
    """The decoder blocks the compiler found (plan.json model.roles: model.layers.0 ...); with
    pipeline parallelism the ones this rank's stages hold (runtime/pp.py keeps their names)."""
    blocks = plan_roles(plan).blocks
    if plan.mesh.pp_enabled:
        held = {n for n, _ in model.named_modules()}
        blocks = tuple(b for b in blocks if b in held)
    return [model.get_submodule(b) for b in blocks]


# ---------------------------------------------------------------------------------------- TP
def tp_plan(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """plan.json placements -> {fqn: ParallelStyle}. Shapes below for one decoder block, B x T
    tokens, tp ranks: with sequence parallel the residual stream between blocks is a DTensor
    Shard(1) (B, T/tp, H), kept as a DTensor (use_local_output=False) so HF derives positions
    and the causal mask from the global T; each block gathers it to (B, T, H) on entry."""
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    sp, lp = plan.tp.sequence_parallel, plan.tp.loss_parallel
    roles = plan_roles(plan)
    resid = Shard(1) if sp else Replicate()
    styles: dict[str, Any] = {}
    for fqn, style in plan.tp.placements.items():
        mod = model.get_submodule(fqn)
        if style == "replicate":
            continue
        if isinstance(mod, nn.Embedding):          # vocab-sharded table, partial sums reduced (-scattered)
            styles[fqn] = RowwiseParallel(input_layouts=Replicate(), output_layouts=resid, use_local_output=not sp)
        elif fqn == roles.lm_head:                 # logits (B, T, V/tp) stay sharded for loss parallel
            styles[fqn] = ColwiseParallel(input_layouts=resid, output_layouts=Shard(-1) if lp else Replicate(),
                                          use_local_output=not lp)
        elif style == "colwise":
            styles[fqn] = ColwiseParallel()
        elif style == "rowwise":
            styles[fqn] = RowwiseParallel(output_layouts=resid, use_local_output=not sp)
        elif style == "sequence_parallel":
            styles[fqn] = SequenceParallel()
        elif style == "latent":
            # kv_a_proj_with_mqa's output is [kv latent (kv_lora_rank) | shared rope key (qk_rope_head_dim)]
            rope = getattr(model.config, "qk_rope_head_dim", 0) if fqn.endswith("kv_a_proj_with_mqa") else 0
            styles[fqn] = _latent(rope)
        elif style in EXTRA_STYLES:
            styles[fqn] = EXTRA_STYLES[style]()
    if sp:
        # under pp the model holds this rank's stages' blocks only (runtime/pp.split_model)
        held = {n for n, _ in model.named_modules()}
        for name in (b for b in roles.blocks if b in held):
            # HF calls self_attn(hidden_states=...) by keyword and mlp(x) positionally (GPT-NeoX's
            # attention(x, ...) positionally too). The gathered input stays a DTensor: in backward
            # the q/k/v (gate/up) input grads are Partial sums that add up locally and
            # reduce-scatter ONCE; a local tensor here would make every colwise Linear all-reduce
            # its own input grad (5 extra all-reduces per block, -7% tok/s)
            block = model.get_submodule(name)
            attn = f"{name}.{attention_name(block)}"
            # GPT-OSS's attention holds its sinks (style sinks): both styles go on the one module
            styles[attn] = _both(styles[attn], _gathered_input()) if attn in styles else _gathered_input()
            styles[f"{name}.{mlp_name(block)}"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                       desired_input_layouts=(Replicate(),), use_local_output=False)
    return styles


def _gathered_input():
    """The block's attention gets the sequence-sharded residual stream (Shard(1)) gathered to a
    Replicate DTensor, whether HF passes it by keyword (hidden_states=, Llama) or as the first
    positional argument (GPT-NeoX)."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class _Style(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            def gather(x):
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, mesh, (Shard(1),), run_check=False)
                return x.redistribute(placements=(Replicate(),))

            def hook(mod, args, kwargs):
                if args:
                    return (gather(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": gather(kwargs["hidden_states"])}

            module.register_forward_pre_hook(hook, with_kwargs=True)
            return module

    return _Style()


def _sharded_norm():
    """colwise_norm: a norm over a whole colwise projection (OLMo-2 q_norm over H x D). The
    rank's local (..., HD/tp) output becomes a Shard(-1) DTensor, the weight Shard(0): the
    mean of squares over the sharded dim is an all-reduce (DTensor's Partial avg), the rest
    elementwise; the output goes back to a local tensor for the local heads."""
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    dim = SHARD_DIM["colwise_norm"]["norm"]

    def part(name, mod, mesh):
        for n, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(n, nn.Parameter(distribute_tensor(p, mesh, [Shard(dim)])))

    def inp(mod, inputs, mesh):
        x = inputs[0]
        return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Shard(x.ndim - 1)], run_check=False),
                *inputs[1:])

    class _Style(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            return distribute_module(module, mesh, part, inp, lambda mod, out, mesh: out.to_local())

    return _Style()


def _local_heads():
    """local_heads: a norm over head_dim applied to the rank's own heads (Qwen3 q/k norm). The
    local input is declared Shard(0) (any non-normalised dim would do: the norm is per row),
    the weight Replicate: its gradient is a Partial sum over tp, all-reduced like any
    replicated weight. Output back to local. A plain replicated weight instead would leave the
    tp ranks with different gradients (each sees only its heads), then different weights."""
    from torch.distributed.tensor.parallel import SequenceParallel

    return SequenceParallel(sequence_dim=0, use_local_output=True)


def _experts():
    """experts: each expert's intermediate dim over tp; gate_up (E, 2I, H) rows are (gate, up)
    pairs (runtime/fused.py) so Shard(1) keeps pairs together; down (E, H, I) Shard(2). GPT-OSS
    stores them transposed (experts_hf): gate_up (E, H, 2I) Shard(2) and its bias (E, 2I)
    Shard(1) (HF's columns are already pairs), down (E, I, H) Shard(1); the down bias (E, H)
    stays a whole plain tensor (runtime/fused.py adds it once and sums its gradient over tp)."""
    from torch.distributed.tensor.parallel import ParallelStyle

    dims = SHARD_DIM["experts"]

    class _Style(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            split = ((("gate_up_proj", 2), ("gate_up_proj_bias", 1), ("down_proj", 1))
                     if transposed_experts(module) else
                     (("gate_up_proj", dims["experts"]), ("down_proj", dims["experts.down_proj"])))
            for n, dim in split:
                p = getattr(module, n, None)
                if p is None:              # Llama-4's transposed experts have no biases
                    continue
                module.register_parameter(n, nn.Parameter(distribute_tensor(p, mesh, [Shard(dim)])))
            return module

    return _Style()


class _SumGradCols(torch.autograd.Function):
    """Identity forward; backward, the last `cols` columns of the gradient summed over the tp group."""

    @staticmethod
    def forward(ctx, x, group, cols):
        ctx.group, ctx.cols = group, cols
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        part = g[..., -ctx.cols:].contiguous()
        torch.distributed.all_reduce(part, group=ctx.group)
        g[..., -ctx.cols:] = part
        return g, None, None


def _latent(rope: int):
    """latent: an MLA low-rank down-projection (DeepSeek-V3 q_a_proj, kv_a_proj_with_mqa), whole
    on every tp rank. Its input, the block's gathered sequence (a Replicate DTensor under sequence
    parallel), is taken as a local tensor; its output feeds a norm and a colwise up-projection
    (q_b_proj / kv_b_proj) on every rank, whose input gradient ColwiseParallel all-reduces: full on
    every rank, so the weight's gradient is the same on every tp rank, as for a router. The
    exception: kv_a_proj_with_mqa's last `rope` columns are the rope key every head shares
    (expanded to the rank's H/tp heads), so their gradient is a partial sum over the tp ranks'
    heads: summed here (B x T x qk_rope_head_dim per layer, backward)."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class _Style(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            def local(mod, args):
                x = args[0]
                return (x.to_local() if isinstance(x, DTensor) else x, *args[1:])

            module.register_forward_pre_hook(local)
            if rope:
                group = mesh.get_group()
                module.register_forward_hook(lambda mod, args, out: _SumGradCols.apply(out, group, rope))
            return module

    return _Style()


def _sinks():
    """sinks: GPT-OSS's per-head attention sinks (H,), Shard(0) like q_proj's colwise heads, so
    rank r holds the sinks of its heads [r H/tp, (r+1) H/tp). transformers' eager attention reads
    `module.sinks` and reshapes it to the local head count: for the forward the local tensor is
    put in the module's __dict__ (found before nn.Module's parameter lookup) and removed after;
    to_local's backward makes the gradient a Shard(0) DTensor again. The DTensor is read from
    _parameters at each forward, so FSDP's unsharded parameter is the one used."""
    from torch.distributed.tensor.parallel import ParallelStyle

    dim = SHARD_DIM["sinks"]["sinks"]

    def pre(mod, args, kwargs):
        p = mod._parameters["sinks"]
        mod.__dict__["sinks"] = p.to_local() if isinstance(p, DTensor) else p

    def post(mod, args, kwargs, out):
        mod.__dict__.pop("sinks", None)

    class _Style(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            module.register_parameter("sinks", nn.Parameter(distribute_tensor(module.sinks, mesh, [Shard(dim)])))
            module.register_forward_pre_hook(pre, with_kwargs=True)
            module.register_forward_hook(post, with_kwargs=True, always_call=True)
            return module

    return _Style()


def _both(first, second):
    """Two styles on one module, in this order."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class _Style(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            return second._apply(first._apply(module, mesh), mesh)

    return _Style()


def _colwise():
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel()


# styles beyond the four basic ones (fused projections, sharded norms, local heads, MoE experts);
# fused rows are in meshbake order, so a plain colwise split is right for them
EXTRA_STYLES = {"colwise_qkv": _colwise, "colwise_gate_up": _colwise, "colwise_norm": _sharded_norm,
                "local_heads": _local_heads, "experts": _experts, "sinks": _sinks}


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: Plan) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    roles = plan_roles(plan)
    # each style straight onto its module: the same calls parallelize_module(model, mesh, plan)
    # makes, without matching every key's path against the children at each level by fnmatch
    # (4,000 keys x 80 blocks for a 70B: a quarter of the TP step)
    for fqn, style in tp_plan(model, plan).items():
        parallelize_module(model.get_submodule(fqn), tp_mesh, style)
    if roles.tied and {roles.embedding, roles.lm_head} <= {n for n, _ in model.named_modules()}:
        # distribute_module gave embed_tokens and lm_head separate DTensor parameters; both
        # are Shard(0) over the vocab (rowwise table, colwise head), so one parameter serves
        # both again: one weight, one gradient, exactly as in the unsharded model (under pp
        # the first stage's rank holds no lm_head: runtime/pp.py keeps its copy placed alike)
        emb, head = model.get_submodule(roles.embedding), model.get_submodule(roles.lm_head)
        if type(emb.weight) is not type(head.weight) or (
                isinstance(emb.weight, DTensor) and emb.weight.placements != head.weight.placements):
            raise RuntimeError("tied embeddings need the same placement on embed_tokens and lm_head")
        head.weight = emb.weight


# --------------------------------------------------------------------- AC, compile, FSDP2
def apply_ac(model: nn.Module, mode: str) -> None:
    """full: recompute each decoder block in backward. selective: recompute all but the
    matmul/attention outputs (op-level SAC, torchtitan's policy): most of the memory saving of
    full at a fraction of the recompute."""
    if mode == "none":
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        from functools import partial

        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten._scaled_dot_product_efficient_attention.default,
                torch.ops.aten._scaled_dot_product_flash_attention.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    # transformers 5.24 renamed it (the old name warns a FutureWarning into every AC run's log and
    # `meshbake dryrun`'s output); the old name stays for the earlier 5.x that pyproject admits
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_compile(model: nn.Module, plan: Plan) -> None:
    for layer in decoder_layers(model, plan):   # per block: same graph for every layer, compiled once
        layer.compile()


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, plan: Plan) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = plan.train.mixed_precision
    # both dtypes explicit: FSDP2 drops a param_dtype equal to the master dtype itself, but a
    # reduce_dtype of None means "reduce in param_dtype" (bf16 gradients for bf16 compute over
    # fp32 masters), not "reduce in the master dtype"
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[mp.param_dtype], reduce_dtype=DTYPES[mp.reduce_dtype])
    layers = decoder_layers(model, plan)
    if plan.mesh.ep_enabled:       # experts first, on their own mesh; the blocks' FSDP then skips them
        from . import ep

        ep.shard_experts(model, model._meshbake_experts_mesh, policy)
    for i, layer in enumerate(layers):
        # the last block's params are needed again at once by backward: keep them gathered
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)   # root: embeddings, final norm, lm_head


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh fully_shard gets, dims.fsdp_mesh_dims: FSDP shards over dp_shard x cp (cp ranks
    hold the same weights, different tokens), flattened to one dim; HSDP adds dp_replicate
    (all-reduce across replicas)."""
    if dims.cp_enabled:
        mesh[dims.fsdp_shard_dims]._flatten(SHARD_CP)
    names = dims.fsdp_mesh_dims
    return mesh[names[0]] if len(names) == 1 else mesh[names]


def compute_context(plan: Plan, device: torch.device):
    """Forward in param_dtype: FSDP2 casts the gathered params itself; without FSDP (a one-rank
    data-parallel mesh, ParallelDims.fsdp_enabled), autocast (matmuls in param_dtype, reductions
    such as norms and softmax kept in float32)."""
    from contextlib import nullcontext

    param = DTYPES[plan.train.mixed_precision.param_dtype]
    if plan.mesh.fsdp_enabled or param == DTYPES[plan.train.dtype]:
        return nullcontext()
    return torch.autocast(device.type, dtype=param)


def reduce_partial_grads(model: nn.Module) -> None:
    """Without FSDP, a parameter replicated over tp (sequence-parallel norms, LoRA's A beside a
    colwise / B beside a rowwise Linear) gets a Partial gradient: each rank's sum over its own
    tokens or heads. Reduce it once, after the last micro-step; left Partial, the clipping norm
    and each AdamW op would all-reduce it again (4 all-reduces per parameter and step instead
    of 1). FSDP2 reduces such gradients itself before its reduce-scatter."""
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)


def set_gradient_sync(model: nn.Module, on: bool) -> None:
    """FSDP2: reduce-scatter only on the last micro-step. Without FSDP gradients just add up."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(on)


# ---------------------------------------------------------------------------------- weights
def init_tensor(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """The full value of parameter `name`: independent of mesh, rank and creation order."""
    from .lora import lora_init

    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    adapter = lora_init(name, shape, g)
    return adapter if adapter is not None else torch.randn(shape, generator=g) * std


def set_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's slice of a full tensor into a (possibly sharded) parameter."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)


def init_weights(model: nn.Module, seed: int, layouts: dict[str, str] | None = None,
                 only: set[str] | None = None, buffers: bool = True) -> None:
    """only: these parameter names (QLoRA's block-by-block build); buffers: reset them too."""
    std = getattr(model.config, "initializer_range", 0.02)
    fused = _fused_params(layouts)
    for name, p in model.named_parameters():      # a tied weight appears once
        if only is not None and name not in only:
            continue
        full = init_tensor(name, p.shape, seed, std)   # HF order: the same values a plain HF model gets
        set_full(p, _to_runtime(name, full, fused, model.config))
    if buffers:
        _reset_buffers(model)
        _reset_rotary(model)


def _fused_params(layouts: dict[str, str] | None) -> dict[str, str]:
    from .fused import param_layouts

    return param_layouts(layouts or {})


def _to_runtime(name: str, full: torch.Tensor, fused: dict[str, str], cfg) -> torch.Tensor:
    from .fused import to_runtime

    return to_runtime(fused[name], full, cfg) if name in fused else full


def _reset_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (Gemma's embed_scale = sqrt(hidden), ...) are garbage after
    to_empty and in no checkpoint; transformers sets them in _init_weights. Run that per
    module with its parameters swapped for meta placeholders, so only the buffers are
    written (parameter init there is a no-op on meta; ours comes after)."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    for mod in model.modules():
        # non-persistent buffers, and persistent ones (DeepSeek-V3's e_score_correction_bias, zeros
        # in transformers' init; load_weights then reads it from the checkpoint)
        if not getattr(mod, "_non_persistent_buffers_set", None) and not mod._buffers:
            continue
        saved = dict(mod._parameters)
        mod._parameters = {n: (nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), p.requires_grad)
                               if p is not None else None) for n, p in saved.items()}
        try:
            with torch.no_grad():
                init(mod)
        finally:
            mod._parameters = saved


def _reset_rotary(model: nn.Module) -> None:
    """Rotary inv_freq is a non-persistent buffer: to_empty left garbage, no checkpoint has it."""
    for m in model.modules():
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "config"):
            with torch.device("cpu"):
                fresh = type(m)(m.config)      # recomputes inv_freq from the config
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(m, name).copy_(buf)


def safetensors_index(folder: str) -> dict[str, Path]:
    """{tensor: its shard} of model.weights: the index's weight_map (every name inside the folder:
    hub.weight_map), else every *.safetensors. Each shard is checked to be a regular file (or a
    link to one: a cache snapshot) before safe_open, which would block on a FIFO planted there."""
    from safetensors import safe_open

    root = Path(folder)
    try:
        weight_map = hub.weight_map(root)
    except hub.BadWeights as e:
        raise UserError(printable(folder), str(e), "point model.weights at a Hugging Face model folder as "
                        "save_pretrained writes it (re-download or re-save it)") from None
    if weight_map is not None:
        out = {k: root / v for k, v in weight_map.items()}
        for f in sorted(set(out.values())):
            safeio.open_regular(f, follow=True).close()
        return out
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        safeio.open_regular(f, follow=True).close()
        with safe_open(str(f), framework="pt") as st:
            out.update({k: f for k in st.keys()})
    if not out:
        raise FileNotFoundError(f"model.weights: no *.safetensors in {folder}")
    return out


def local_slice(param: torch.Tensor) -> tuple[slice, ...] | None:
    """The block of the full tensor this rank holds, or None if it is not one block (then the
    full tensor is read and sliced). FSDP x TP shards of a Linear are contiguous row/column
    blocks, so a rank reads 1/world of the checkpoint, not all of it."""
    if not isinstance(param, DTensor):      # a plain (unsharded) tensor: its block is all of it
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    try:
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    except Exception:   # noqa: BLE001 — an exotic placement: fall back to the full tensor
        return None
    if tuple(shape) != tuple(param.to_local().shape):
        return None
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


LOAD_STATS = {"block": 0, "full": 0}    # how the last load_weights read its tensors (tests)


def load_weights(model: nn.Module, folder: str, seed: int, layouts: dict[str, str] | None = None,
                 only: set[str] | None = None, buffers: bool = True) -> None:
    """The base model from the user's safetensors, each rank reading only its own block where
    possible (safetensors slices lazily); LoRA adapters (not in them) start fresh. Grouped MoE
    experts are assembled from the per-expert tensors hub checkpoints hold."""
    from contextlib import ExitStack

    from safetensors import safe_open

    from .fused import assemble, checkpoint_sources, n_experts

    params = {n: p for n, p in model.named_parameters() if only is None or n in only}
    base = [n for n in params if ".lora_" not in n]
    index = safetensors_index(folder)
    sources = checkpoint_sources(base, n_experts(lambda k: getattr(model.config, k, None)), index.__contains__)
    missing = [n for n, src in sources.items() if src is None]
    if missing:
        raise KeyError(f"model.weights {folder}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
    LOAD_STATS.update(block=0, full=0)
    fused = _fused_params(layouts)
    with torch.no_grad(), ExitStack() as stack:
        files: dict[Path, Any] = {}

        def st(key: str):
            f = index[key]
            if f not in files:
                files[f] = stack.enter_context(safe_open(str(f), framework="pt"))
            return files[f]

        for name in base:
            p, src = params[name], sources[name]
            # a fused tensor's rows are reordered (runtime/fused.py): read whole, reorder
            one = len(src) == 1 and len(src[0]) == 1      # one checkpoint key (its own name or an alias)
            block = local_slice(p) if one and name not in fused else None
            if block is None:
                full = assemble([[st(k).get_tensor(k) for k in ks] for ks in src])
                set_full(p, _to_runtime(name, full, fused, model.config))
            else:
                key = src[0][0]
                (p.to_local() if isinstance(p, DTensor) else p).copy_(st(key).get_slice(key)[block])
            LOAD_STATS["full" if block is None else "block"] += 1
    for name in sorted(set(params) - set(base)):
        set_full(params[name], init_tensor(name, params[name].shape, seed, 0.0))
    if buffers:
        _reset_buffers(model)
        _reset_rotary(model)
        _load_buffers(model, index)


def _load_buffers(model: nn.Module, index: dict[str, Path]) -> None:
    """Persistent buffers the checkpoint holds (DeepSeek-V3's router e_score_correction_bias):
    plain tensors, whole on every rank."""
    from safetensors import safe_open

    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in index:
                with safe_open(str(index[name]), framework="pt") as st:
                    buf.copy_(st.get_tensor(name))


def iter_full_weights(folder: str, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors by name (single-process readers: the parity reference)."""
    from safetensors import safe_open

    index = safetensors_index(folder)
    for n in names:
        with safe_open(str(index[n]), framework="pt") as st:
            yield n, st.get_tensor(n)


def parallelize(plan: Plan, mesh: DeviceMesh, stage=lambda name: None, fsdp: bool = True) -> nn.Module:
    """The model on the meta device with every parallelism applied, nothing allocated.
    stage(name) is called before each step (the dry run names the step that failed).
    QLoRA (plan.lora.quantize_base nf4): the targets' weights become NF4 before FSDP, here on
    meta (the dry run), or, with fsdp=False, in build() once the real weights are loaded."""
    stage("model")
    model = meta_model(plan)
    if plan.mesh.cp_enabled:
        from . import cp

        stage("cp")
        cp.install(model)
    if plan.mesh.tp_enabled:
        stage("tp")
        apply_tp(model, mesh["tp"], plan)
    if plan.model.layouts:     # after TP: the fused hooks must see the local (to_local'd) outputs
        from . import fused

        fused.install(model, plan.model.layouts, mesh["tp"] if plan.mesh.tp_enabled else None,
                      aux=plan.train.router_aux_loss_coef > 0)
    if plan.mesh.ep_enabled:       # experts by index over ep, all-to-all dispatch (runtime/ep.py)
        from . import ep

        stage("ep")
        model._meshbake_experts_mesh = ep.experts_mesh(plan)
        ep.install(model, model._meshbake_experts_mesh, plan.mesh.tp)
    if plan.lora.rank > 0:
        from .lora import apply_lora

        stage("lora")
        apply_lora(model, plan)
    stage("ac")
    apply_ac(model, plan.train.activation_checkpointing)
    if plan.train.compile:
        stage("compile")
        apply_compile(model, plan)
    if fsdp:
        quantize_and_shard(model, mesh, plan, stage)
    return model


def quantize_and_shard(model: nn.Module, mesh: DeviceMesh, plan: Plan, stage=lambda name: None) -> None:
    if quantized(plan):
        from .quant import quantize_base

        stage("quantize")
        quantize_base(model, plan)
    stage("fsdp")
    if plan.mesh.fsdp_enabled:
        apply_fsdp(model, dp_mesh(mesh, plan.mesh), plan)


def quantized(plan: Plan) -> bool:
    return plan.lora.rank > 0 and plan.lora.quantize_base != "none"


def retie(model: nn.Module, plan: Plan) -> None:
    """A tied lm_head is the embedding's parameter again after to_empty. nn.Module._apply
    cannot move a plain meta tensor to a device in place, so it gives embed_tokens and lm_head
    each a new Parameter: without TP or FSDP on the embedding (world 1, or a tp-replicated table
    without FSDP) the tie was silently gone, and init_weights then seeded lm_head.weight by its
    own name, other values than on a mesh where the tie survived (DTensor parameters are moved
    in place), and training ran an untied model. Tied here, before any weight is written, the
    pair is one parameter named by the embedding (first in named_parameters) on every mesh."""
    roles = plan_roles(plan)
    if not roles.tied:
        return
    emb, head = model.get_submodule(roles.embedding), model.get_submodule(roles.lm_head)
    if head.weight is not emb.weight:
        if isinstance(emb.weight, DTensor) or isinstance(head.weight, DTensor):
            raise RuntimeError("tied embeddings: embed_tokens and lm_head are separate sharded parameters")
        head.weight = emb.weight


def build(plan: Plan, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    if quantized(plan):
        model = build_quantized(plan, mesh, device)
    else:
        model = parallelize(plan, mesh)
        model.to_empty(device=device)
        retie(model, plan)
        materialize(model, plan)
    model.train()
    return model


def build_quantized(plan: Plan, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """QLoRA: NF4 needs the real weights, so the model is materialized block by block: each
    decoder block is allocated, loaded (model.weights or the seeded init), its targets quantized
    and fully_shard'ed before the next; then the root (embeddings, final norm, lm_head). A rank
    holds one block (or the root) in model.dtype at a time beside the NF4 shards (the estimate's
    'weight load (QLoRA)' phase). Same shards and policy as apply_fsdp (tp, HSDP, ep refused)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .quant import quantize_base

    model = parallelize(plan, mesh, fsdp=False)
    layers = decoder_layers(model, plan)
    fsdp = plan.mesh.fsdp_enabled
    mp = plan.train.mixed_precision
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[mp.param_dtype], reduce_dtype=DTYPES[mp.reduce_dtype])
    shard_mesh = dp_mesh(mesh, plan.mesh) if fsdp else None
    in_blocks = {id(m) for layer in layers for m in layer.modules()}
    for i, (fqn, layer) in enumerate(zip(plan_roles(plan).blocks, layers)):
        layer.to_empty(device=device)
        mine = {f"{fqn}.{n}" for n, _ in layer.named_parameters()}
        materialize(model, plan, mine, buffers=False)
        quantize_base(model, plan, {n.rsplit(".", 1)[0] for n in mine})
        if fsdp:
            fully_shard(layer, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    for m in model.modules():
        if id(m) not in in_blocks:
            m.to_empty(device=device, recurse=False)
    retie(model, plan)
    blocks = tuple(b + "." for b in plan_roles(plan).blocks)
    materialize(model, plan, {n for n, _ in model.named_parameters() if not n.startswith(blocks)})
    if fsdp:
        fully_shard(model, mesh=shard_mesh, mp_policy=policy)
    return model


def materialize(model: nn.Module, plan: Plan, only: set[str] | None = None, buffers: bool = True) -> None:
    """The base weights (model.weights, or the seeded init) and fresh adapters, in runtime order;
    only: these parameter names (the rest stays as it is)."""
    if plan.model.weights:      # a Hub id pinned to its commit (org/name@sha): that revision's snapshot
        load_weights(model, hub.local_folder(plan.model.weights, "model", hub.WEIGHT_FILES), plan.train.seed,
                     plan.model.layouts, only, buffers)
    else:
        init_weights(model, plan.train.seed, plan.model.layouts, only, buffers)
