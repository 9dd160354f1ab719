"""Pipeline parallelism: the model split into stages at decoder-block boundaries and run by a
torch.distributed.pipelining schedule (plan.json `pp`, mesh.pp > 1).

torchtitan's approach (torchtitan/distributed/pipeline_parallel.py): every pp rank builds the
whole model on the meta device, keeps only the parts of its own stages (the embedding with
the first stage, the final norm + lm_head + loss with the last, the blocks the compiler gave
each stage in plan.json pp.stages), parallelizes each stage on its own sub-mesh (TP over
`tp`, FSDP2 over the dp dims of this pp coordinate: mesh["tp"] and the dp mesh of a
("pp", dp_replicate, dp_shard, cp, tp) mesh are the groups of this rank's pp slice), wraps
every stage in a PipelineStage on the pp group, and hands the stages to the schedule
(1F1B / GPipe: one stage per rank; Interleaved1F1B: looped, stage s on rank s % pp; ZBV:
V-shaped, rank r holds stages r and 2 pp - 1 - r).

Names: the rank's kept parts stay in one HF model object (`Pipeline.model`, the "owner")
whose decoder blocks keep their original indices (model.layers.5 is model.layers.5 on every
mesh), so optimizer, clipping, DCP checkpoints and init all see the same fully qualified
names as without pp: init values are identical (seeded per name), and a checkpoint saved under
pp 2 loads under pp 1 and back. A stage is a thin module over the owner's modules: a shallow
copy of the HF base model holding only the stage's blocks (same attribute names, so its
forward is transformers' own: rotary, causal mask, blocks, norm), plus lm_head on the last.

Tied embeddings (Megatron-LM's way): the last stage's rank keeps the owner's embedding module
(in no stage's forward) with lm_head's weight, its copy of the table, so the copy is named
model.embed_tokens.weight as in one process (same init, same checkpoint keys); tied_grads sums
the two copies' gradients over the (first, last) pair before clipping, and the grad norm counts
the table once (Pipeline.norm_skip). ZBV runs both stages on rank 0: one parameter, no copy.

Loss: the last stage's loss_fn returns sum(token CE) x dp x cp / N (N = labelled tokens of
the global batch), exactly the non-pp scaling in runtime/train.py, and schedule grads are
not rescaled (scale_grads=False): the sum over micro-batches is the same gradient. Only the
last stage knows the loss; the step's world all-reduce of the loss sum (0 on other stages)
gives every rank the same global mean, so metrics.jsonl (rank 0) holds the same loss as
without pp.

MoE: the stages' MoE blocks get runtime/fused.py's forward (and with mesh.ep > 1 runtime/ep.py's
dispatch over the ep groups of this rank's stage group: ep.experts_mesh puts pp outermost), the
experts FSDP'd on their own mesh before the blocks. With train.router_aux_loss_coef the stages
carry the aux loss's router sums to the last stage (aux_carry), whose loss adds coef x aux: the
loss and every router's gradient are those of one process (tests/test_pp.py, Mixtral).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from .data import IGNORE
from .plan import Plan
from .roles import plan_roles


def stage_ids(plan: Plan, pp_rank: int) -> list[int]:
    """The stages this pp rank runs, in order (torch's generate_stage_to_rank_mapping)."""
    pp, n = plan.mesh.pp, len(plan.pp.stages)
    if plan.pp.schedule == "ZBVZeroBubble":        # V: r and 2 pp - 1 - r
        return sorted({pp_rank, n - 1 - pp_rank})
    return [s for s in range(n) if s % pp == pp_rank]


def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    head, _, leaf = fqn.rpartition(".")
    return (model.get_submodule(head) if head else model), leaf


def _blocks(layers: list[tuple[int, nn.Module]]) -> nn.ModuleList:
    """A ModuleList whose children keep their model-wide indices as names ("5", "6"), so
    "model.layers.5" stays the name of block 5; iteration and slicing (HF iterates
    self.layers[:num_hidden_layers]) go by position as in any ModuleList."""
    ml = nn.ModuleList()
    for i, layer in layers:
        ml._modules[str(i)] = layer
    return ml


class Stage(nn.Module):
    """One pipeline stage: `model` (a shallow copy of the HF base model with only this stage's
    blocks, no embedding unless first, an identity for the final norm unless last) and the
    lm_head on the last. Its parameter names are the HF model's own (model.layers.5...).

    What crosses between ranks is always a plain tensor (the schedule's send / recv buffers
    and its shape inference are for plain tensors). With sequence parallel the residual stream
    is a DTensor Shard(1) over `tp_mesh`: a stage sends its local shard (mbs, T/tp, H) and the
    next re-wraps it as Shard(1) on receipt (no all-gather at the boundary: tp x less traffic
    than sending the full (mbs, T, H)); to_local / from_local pass the gradient back the same
    way. With loss parallel the last stage's logits are Shard(-1) over the vocab: it returns
    the local (mbs, T, V/tp) and the loss function re-wraps them (runtime/pp.build)."""

    def __init__(self, base: nn.Module, lm_head: nn.Module | None, first: bool, tp_mesh: DeviceMesh | None = None,
                 cp_mesh: DeviceMesh | None = None, seq_len: int = 0):
        super().__init__()
        self.model = base
        self.lm_head = lm_head
        self.first = first
        self.tp_mesh = tp_mesh        # sequence parallel: the mesh of the Shard(1) hidden states
        self.cp_mesh = cp_mesh        # context parallel: the cp group's mesh, and the global T it splits
        self.seq_len = seq_len
        self.aux_experts = 0          # MoE with the router aux loss: E, and the stage carries aux_carry

    def forward(self, x: torch.Tensor, *carry: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # first stage: token ids (mbs, T[/cp]); later stages: the hidden states (mbs, T[/cp][/tp], H).
        # position_ids (mbs, T), packed data: restarting per document; every rank reads its own
        # from the data (the schedule hands kwargs to every stage), so they are never sent.
        # carry: with the router aux loss, the running (2E + 1,) sums of aux_carry from the stages before
        if not self.first and self.tp_mesh is not None:
            from torch.distributed.tensor import DTensor, Shard

            # the global (mbs, T, H) view: HF derives positions and the causal mask from its T
            x = DTensor.from_local(x, self.tp_mesh, (Shard(1),), run_check=False)
        kw = {"input_ids": x} if self.first else {"inputs_embeds": x}
        if self.cp_mesh is not None:
            # cp: position_ids are the micro-batch's GLOBAL ones (mbs, T) (None: one causal
            # sequence); its local ones and its own mask are made here, per stage forward, and the
            # mask rides to cp_attention as a kwarg: the schedule interleaves micro-batches, so
            # one mask kept for "the current" micro-batch (runtime/cp.set_batch) would be another's
            from . import cp

            cp.use_mesh(self.cp_mesh)
            pos, kw["cp_mask"] = cp.masks(self.cp_mesh, self.seq_len, position_ids)
            position_ids = pos[None] if pos.dim() == 1 else pos                 # (1 | mbs, T / cp)
        h = self.model(**kw, position_ids=position_ids, use_cache=False).last_hidden_state   # (mbs, T, H)
        out = self.lm_head(h) if self.lm_head is not None else h         # (mbs, T, V[/tp]) on the last
        out = _local(out, None if self.lm_head is not None else 1)
        return (out, aux_carry(self, carry[0] if carry else None)) if self.aux_experts else out


def aux_carry(stage: nn.Module, prev: torch.Tensor | None) -> torch.Tensor:
    """The router aux loss under pp, exact. transformers' load_balancing_loss_func is ONE formula
    over every MoE layer of a forward (runtime/fused.router_aux_loss):
        aux = E sum_e (C_e / R) (P_e / R),  C_e = sum over layers of top-k counts (no gradient),
        P_e = sum over layers of router probabilities (gradient), R = layers x tokens,
    so the gradient reaching layer l's router, E C_e / R^2 per probability, needs every layer's
    counts, and the last stage's loss needs every layer's P. Each stage adds its layers' (P, C,
    R) of this micro-batch to the running sums it received and sends them on beside the hidden
    states, (2E + 1,) floats: [P (E, differentiable) | C (E) | R]. The last stage's loss takes
    the whole-model sums; the schedule's backward carries d aux / d P back through the same
    tensor to every stage's routers (the boundaries are ordinary autograd edges), so each
    router gets exactly its single-process gradient, with no extra communication but these
    2E + 1 floats per micro-batch and hop. Counts and rows get a gradient too, which goes
    nowhere (they are detached). This keeps transformers' loss, as without pp (torchtitan's MoE
    balances with an auxiliary-loss-free expert bias, its load_balance_coeff; how it treats an
    aux loss under pp was not checked)."""
    blocks = [m for m in stage.modules() if getattr(m, "_meshbake_aux", None) is not None]
    terms = [t for b in blocks for t in b._meshbake_aux]
    for b in blocks:
        b._meshbake_aux = []
    e = stage.aux_experts
    if prev is None:
        dev = next((p.device for p in stage.parameters()), None)
        prev = torch.zeros(2 * e + 1, dtype=torch.float32, device=dev)
    if not terms:                      # a stage of dense blocks, or no grad (eval): the sums pass on
        return prev
    probs = sum(t[1] for t in terms).float()                                      # (E,), differentiable
    counts = sum(t[0] for t in terms).float()
    rows = torch.tensor([float(sum(t[2] for t in terms))], dtype=torch.float32, device=probs.device)
    return prev + torch.cat([probs, counts.detach(), rows])


def _local(t: torch.Tensor, seq_dim: int | None) -> torch.Tensor:
    """A stage output as the plain tensor the schedule sends: a DTensor's local shard, made
    Shard(seq_dim) first where the receiver re-wraps it so (a no-op for the residual stream,
    which the rowwise down_proj already leaves Shard(1)). The hidden states are copied out of
    to_local's view: ZBV's split backward detach_()es a stage's outputs in place, which a view
    refuses (one (mbs, T/tp, H) copy per micro-batch and stage, small beside the blocks)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t
    if seq_dim is None:
        return t.to_local()
    if tuple(t.placements) != (Shard(seq_dim),):
        t = t.redistribute(placements=(Shard(seq_dim),))
    return t.to_local().clone()


def _shell(base: nn.Module, fqn_layers: str, layers: nn.ModuleList, embedding: str | None, norm: str | None) -> nn.Module:
    """A shallow copy of the base model (its own module dict) holding `layers`; embedding /
    norm: the attribute names to drop (None: keep)."""
    shell = copy.copy(base)
    shell._modules = dict(base._modules)
    shell._parameters = dict(base._parameters)
    shell._buffers = dict(base._buffers)
    shell._modules[fqn_layers] = layers
    types = getattr(base.config, "layer_types", None)
    if types is not None:
        # Qwen2 / Qwen3 pick each block's mask by its position in the loop (config.layer_types[i]
        # for the i-th block the base model holds): the stage's blocks 5, 6 must read types 5, 6,
        # not 0, 1 (a sliding-window block would get the full causal mask, or the reverse)
        shell.config = copy.copy(base.config)
        shell.config.layer_types = [types[int(i)] for i in layers._modules]
    if embedding:
        shell._modules[embedding] = None
    if norm:
        shell._modules[norm] = nn.Identity()
    return shell


@dataclass
class Pipeline:
    model: nn.Module                  # the owner: this rank's parts under their HF names
    stages: list[nn.Module]           # Stage modules (FSDP roots when fsdp is on), this rank's, in order
    stage_ids: list[int]
    schedule: object                  # a torch.distributed.pipelining schedule
    has_first: bool
    has_last: bool
    pp_group: object                  # the pp process group (grad-norm all-reduce)
    loss_sums: list[torch.Tensor] = field(default_factory=list)   # this step's CE sums (last stage)
    aux_sums: list[torch.Tensor] = field(default_factory=list)    # coef x aux / microbatches each (last stage)
    scale: list[float] = field(default_factory=lambda: [1.0])     # dp x cp / N of this step
    loss_parallel: bool = False       # tp.loss_parallel: the last stage's logits are vocab-sharded
    tied_group: object = None         # tied embeddings: the (first stage, last stage) pair's group
    tied: str = ""                    # the embedding's fqn (this rank's table or its copy)
    norm_skip: frozenset = frozenset()   # ids of parameters left out of the grad norm (the copy)


def split_model(model: nn.Module, plan: Plan, ids: list[int], tp_mesh: DeviceMesh | None = None,
                cp_mesh: DeviceMesh | None = None) -> list[Stage]:
    """Prune `model` (meta, HF names) to the parts of stages `ids` and return their Stage
    modules. Roles from plan.json: the blocks' parent (model.layers), embedding, final norm,
    lm_head. tp_mesh: sequence parallel's; cp_mesh: context parallel's (see Stage)."""
    roles = plan_roles(plan)
    n = len(plan.pp.stages)
    base_fqn, _, layers_attr = roles.block_prefix.rpartition(".")
    base = model.get_submodule(base_fqn)
    all_layers = list(base.get_submodule(layers_attr))
    emb_parent, emb_attr = _parent(model, roles.embedding)
    norm_parent, norm_attr = _parent(model, roles.final_norm)
    if emb_parent is not base or norm_parent is not base or "." in roles.lm_head:
        raise RuntimeError(f"pipeline split: {roles.embedding} / {roles.final_norm} are not children of {base_fqn}")
    stages = []
    for s in ids:
        a, b = plan.pp.stages[s]
        first, last = s == 0, s == n - 1
        layers = _blocks([(i, all_layers[i]) for i in range(a, b)])
        shell = _shell(base, layers_attr, layers, None if first else emb_attr, None if last else norm_attr)
        stages.append(Stage(shell, model.get_submodule(roles.lm_head) if last else None, first, tp_mesh,
                            cp_mesh, plan.train.seq_len))
    mine = sorted({i for s in ids for i in range(*plan.pp.stages[s])})
    base._modules[layers_attr] = _blocks([(i, all_layers[i]) for i in mine])
    # tied embeddings: the last stage's rank keeps the embedding module in the owner (not in any
    # stage's forward) so its lm_head weight, the rank's copy of the table, is named
    # model.embed_tokens.weight as in the single-process model: same seeded init / load, one
    # checkpoint key (runtime/pp.tied_grads sums the two copies' gradients every step)
    if 0 not in ids and not (roles.tied and n - 1 in ids):
        base._modules[emb_attr] = None
    if n - 1 not in ids:
        base._modules[norm_attr] = None
        setattr(model, roles.lm_head, None)
    return stages


def parallelize_stages(plan: Plan, mesh: DeviceMesh, ids: list[int],
                       stage=lambda name: None) -> tuple[nn.Module, list[Stage]]:
    """The owner model and the Stage modules of stages `ids` on the meta device, TP'd, AC'd and
    FSDP'd on this rank's sub-mesh, nothing allocated (build materializes; the dry run stops
    here). stage(name) names the step (the dry run reports the one that failed)."""
    from dataclasses import replace

    from .parallel import apply_ac, apply_tp, dp_mesh, meta_model

    stage("model")
    model = meta_model(plan)
    if plan.mesh.cp_enabled:          # before the split: the stages' shells (and Qwen's config copies) inherit it
        from . import cp

        stage("cp")
        cp.install(model)
    # AC on the whole model before the split: transformers marks each block (applied later it
    # works the same, but a stage without the embedding makes transformers warn that it cannot
    # find the input embeddings); the order TP -> AC matters only for wrappers, HF's AC is a flag
    stage("ac")
    apply_ac(model, plan.train.activation_checkpointing)
    stage("pp")
    stages = split_model(model, plan, ids, mesh["tp"] if plan.tp.sequence_parallel else None,
                         mesh["cp"] if plan.mesh.cp_enabled else None)
    if plan.mesh.tp_enabled:          # the placements of the modules this rank holds
        stage("tp")
        held = {n for n, _ in model.named_modules()}
        apply_tp(model, mesh["tp"], replace(plan, tp=replace(plan.tp, placements={
            f: s for f, s in plan.tp.placements.items() if f in held})))
    held = {n for n, _ in model.named_modules()}
    if plan.model.layouts:            # after TP, as without pp: the fused / MoE forwards of the modules held
        from . import fused

        fused.install(model, {f: k for f, k in plan.model.layouts.items() if f in held},
                      mesh["tp"] if plan.mesh.tp_enabled else None, aux=plan.train.router_aux_loss_coef > 0)
    if plan.train.router_aux_loss_coef > 0:     # the stages carry the aux loss's sums (aux_carry)
        from .fused import n_experts

        for st in stages:
            st.aux_experts = n_experts(model.config.to_dict().get)
    if plan.mesh.ep_enabled:          # the experts this rank's stages hold, by index over ep in the stage's slice
        from . import ep

        stage("ep")
        model._meshbake_experts_mesh = ep.experts_mesh(plan)
        ep.install(model, model._meshbake_experts_mesh, plan.mesh.tp)
    if plan.lora.rank > 0:            # after TP (the adapters follow W's layout), before FSDP, as without pp
        from .lora import apply_lora

        stage("lora")
        apply_lora(model, plan, {n for n, _ in model.named_modules()})
    if plan.mesh.fsdp_enabled:
        stage("fsdp")
        _shard(stages, dp_mesh(mesh, plan.mesh), plan, getattr(model, "_meshbake_experts_mesh", None))
    retie(model, plan, ids)
    return model, stages


def retie(model: nn.Module, plan: Plan, ids: list[int]) -> None:
    """Tied embeddings: the owner's embedding and lm_head modules share one parameter again
    wherever this rank holds both. fully_shard (the last stage's root holds lm_head, not the
    owner's embedding) and to_empty (plain tensors get new Parameters) each leave the two
    modules with separate parameters; the stage that runs the weight wins: the embedding's on
    the first stage's rank (ZBV: rank 0 runs both, one parameter, its gradient the sum of
    both uses), lm_head's on the last stage's rank (its copy of the table)."""
    roles = plan_roles(plan)
    if not roles.tied:
        return
    emb, head = _held(model, roles.embedding), _held(model, roles.lm_head)
    if emb is None or head is None or emb.weight is head.weight:
        return
    if 0 in ids:
        head.weight = emb.weight
    else:
        emb.weight = head.weight


def _held(model: nn.Module, fqn: str) -> nn.Module | None:
    parent, leaf = _parent(model, fqn)
    return parent._modules.get(leaf)


def tied_group(plan: Plan, mesh: DeviceMesh):
    """The process group over which the two copies of a tied table sum their gradients
    (Megatron-LM's embedding group: the first and the last stage of each pipeline), None where
    no rank holds a copy apart from the embedding (untied, or ZBV: rank 0 runs both stages).
    With pp 2 it is the pp group; with more, one group per pipeline of its pp ranks 0 and
    last, created collectively (every rank takes part in every new_group call)."""
    n = len(plan.pp.stages)
    last = stage_rank(plan, n - 1)
    if not plan_roles(plan).tied or last == 0:
        return None
    pp_mesh = mesh["pp"]
    if plan.mesh.pp == 2:
        return pp_mesh.get_group()
    import torch.distributed as dist

    cols = mesh.mesh.reshape(plan.mesh.pp, -1).T.tolist()    # each column: one pipeline's ranks by pp rank
    group, _ = dist.new_subgroups_by_enumeration([[c[0], c[last]] for c in cols])
    return group                       # None on the middle stages' ranks


def stage_rank(plan: Plan, s: int) -> int:
    return next(r for r in range(plan.mesh.pp) if s in stage_ids(plan, r))


def tied_grads(pipe: Pipeline) -> None:
    """Sum the tied table's gradient over the (first stage, last stage) pair, after the
    schedule's backward (FSDP's reduce-scatters done) and before clipping and the optimizer:
    the embedding's rank holds d(loss)/d(table) through the lookup, the last stage's through
    lm_head, and the single-process model's one parameter gets their sum. Both copies are
    placed alike (TP Shard(0) over the vocab for the table and the head, FSDP Shard(0) over the
    same dp coordinates), so the local shards are the same block of the full gradient and the
    sum is elementwise over the local tensors: vocab x hidden / (tp x dp_shard) elements."""
    if pipe.tied_group is None:
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    p = pipe.model.get_submodule(pipe.tied).weight
    g = p.grad
    if g is None:                      # a frozen table (LoRA): nothing to sum
        return
    if isinstance(g, DTensor) and g.placements != p.placements:
        # the rowwise embedding's backward leaves a Replicate (V, H) gradient beside its Shard(0)
        # table (tp without FSDP): its own block first, a local slice (no communication), so
        # both sides sum the same (V/tp, H) block
        g = p.grad = g.redistribute(p.device_mesh, p.placements)
    dist.all_reduce(g._local_tensor if isinstance(g, DTensor) else g, group=pipe.tied_group)


def build(plan: Plan, mesh: DeviceMesh, device: torch.device) -> Pipeline:
    """Meta model -> AC -> this rank's stages -> TP -> FSDP per stage -> materialized and
    initialized (or loaded) under the full model's names -> PipelineStages -> schedule."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

    from .parallel import materialize

    pp_mesh = mesh["pp"]
    ids = stage_ids(plan, pp_mesh.get_local_rank())
    model, stages = parallelize_stages(plan, mesh, ids)
    for st in stages:                 # each stage's FSDP root moves its own parameters (all of the owner's)
        st.to_empty(device=device)
    retie(model, plan, ids)           # before any weight is written: both modules get the same values
    materialize(model, plan)
    model.train()
    n = len(plan.pp.stages)
    group = pp_mesh.get_group()
    pstages = [PipelineStage(st, s, n, device, group=group) for st, s in zip(stages, ids)]
    pipe = Pipeline(model, stages, ids, None, 0 in ids, n - 1 in ids, group, loss_parallel=plan.tp.loss_parallel)
    pipe.tied_group = tied_group(plan, mesh)
    if pipe.tied_group is not None:
        pipe.tied = plan_roles(plan).embedding
        if 0 not in ids:              # the last stage's copy: clipped, but its norm counted once (on the first)
            pipe.norm_skip = frozenset({id(model.get_submodule(pipe.tied).weight)})

    lp_mesh = mesh["tp"] if plan.tp.loss_parallel else None
    coef, m = plan.train.router_aux_loss_coef, plan.mesh
    # the ranks of this pp coordinate (every dp / cp / tp rank of the stage group): the aux loss's
    # counts are over all of their tokens, as runtime/fused.router_aux_loss's world all-reduce without pp
    slice_dims = tuple(d for d in m.mesh_dims if d != "pp")
    aux_group = mesh[slice_dims]._flatten("pp_slice").get_group() if coef > 0 and m.world > m.pp else None

    def aux_loss(carry: torch.Tensor) -> torch.Tensor | None:
        """coef x aux of one micro-batch from the whole-model sums (aux_carry), as the local term
        whose gradient over the stage group's ranks sums to the single-process one (scaled like
        the CE for FSDP's mean, as runtime/train.py does without pp); its global value goes to
        pipe.aux_sums. None without a recorded forward (eval)."""
        e = (carry.shape[0] - 1) // 2
        stats = carry.detach().double()
        if aux_group is not None:
            stats = stats.clone()
            torch.distributed.all_reduce(stats, group=aux_group)
        stats = stats / m.tp           # the tp ranks of a coordinate routed the same tokens
        p_glob, c_glob, rows = stats[:e], stats[e:2 * e], stats[-1]
        if not torch.is_grad_enabled() or float(rows) == 0:
            return None
        f = c_glob / rows
        local = e * (f.to(carry.dtype) * carry[:e]).sum() / rows.to(carry.dtype)
        pipe.aux_sums.append(e * (f * p_glob / rows).sum() * (coef / plan.pp.microbatches))
        return local * (coef * m.dp * m.cp / plan.pp.microbatches)

    def loss_fn(logits, y: torch.Tensor) -> torch.Tensor:
        carry = None
        if isinstance(logits, tuple):  # (logits, aux_carry) with the router aux loss
            logits, carry = logits
        if lp_mesh is not None:       # the stage sent its vocab shard (mbs, T, V/tp): the global view again
            from torch.distributed.tensor import DTensor, Shard

            logits = DTensor.from_local(logits, lp_mesh, (Shard(-1),), run_check=False)
        # under loss parallel (pp.step holds the context over forward and backward) the sharded
        # log-softmax: all-reduces of (mbs x T) maxima and sums, never the (mbs, T, V) logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(0, 1), ignore_index=IGNORE, reduction="sum")
        pipe.loss_sums.append(_local(ce, None).detach().double())   # Replicate: every tp rank's full sum
        aux = aux_loss(carry) if carry is not None else None
        if aux is None:
            return ce * pipe.scale[0]
        if lp_mesh is not None:       # the loss-parallel CE is a Replicate DTensor; aux is the same on every tp rank
            from torch.distributed.tensor import DTensor, Replicate

            aux = DTensor.from_local(aux, lp_mesh, (Replicate(),), run_check=False)
        return ce * pipe.scale[0] + aux

    cls = get_schedule_class(plan.pp.schedule)
    multi = issubclass(cls, PipelineScheduleMulti)
    pipe.schedule = cls(pstages if multi else pstages[0], n_microbatches=plan.pp.microbatches,
                        loss_fn=loss_fn, scale_grads=False)
    return pipe


def _shard(stages: list[Stage], dp: DeviceMesh, plan: Plan, experts: DeviceMesh | None = None) -> None:
    """FSDP2 per block, then each stage as a root (its embedding / norm / lm_head). Blocks are
    not resharded after forward (torchtitan's default under pp): with m micro-batches in
    flight a resharded block would be all-gathered again for every micro-batch's backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .parallel import DTYPES

    mp = plan.train.mixed_precision
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[mp.param_dtype], reduce_dtype=DTYPES[mp.reduce_dtype])
    if plan.mesh.ep_enabled:          # experts first, on their own mesh; the blocks' FSDP then skips them
        from . import ep

        for st in stages:
            ep.shard_experts(st, experts, policy)
    for st in stages:
        for layer in st.model.get_submodule(plan_roles(plan).block_prefix.rpartition(".")[2]):
            fully_shard(layer, mesh=dp, mp_policy=policy, reshard_after_forward=False)
        fully_shard(st, mesh=dp, mp_policy=policy, reshard_after_forward=False)


def step(pipe: Pipeline, x: torch.Tensor, y: torch.Tensor, scale: float, pos: torch.Tensor | None = None,
         train: bool = True) -> torch.Tensor:
    """One optimizer step's forward + backward over the step's micro-batches: x, y (and the
    packed data's position_ids pos) are this dp rank's (microbatches x mbs, T) (the schedule
    splits them along dim 0, in order). Returns the sum of token losses on the last stage (0
    elsewhere), float64. train=False: forward only (eval; the caller holds no_grad)."""
    from contextlib import nullcontext

    from torch.distributed.tensor.parallel import loss_parallel

    pipe.loss_sums.clear()
    pipe.aux_sums.clear()
    pipe.scale[0] = scale
    run = pipe.schedule.step if train else pipe.schedule.eval
    # return_outputs=False (torchtitan's call): otherwise the last stage keeps every micro-batch's
    # logits (mbs x T x V each) in output_chunks until the step ends and then torch.cat's them all
    # into one more copy nobody reads (measured, tiny-llama pp 2 x tp 2, 4 micro-batches: 36.7 MB
    # peak at that cat); eval passes it on to step
    kw = {"position_ids": pos} if pos is not None else {}
    # the loss's backward runs inside the schedule: loss parallel must hold over the whole step
    with loss_parallel() if pipe.loss_parallel else nullcontext():
        if pipe.has_first:
            run(x, target=y, losses=[], return_outputs=False, **kw)
        else:
            run(target=y, losses=[], return_outputs=False, **kw)
    if not pipe.has_last:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    # the last microbatches calls: the first step's shape inference runs the loss once more on
    # a probe micro-batch before them (no backward; counting it inflated step 1's loss by 1/m)
    return torch.stack(pipe.loss_sums[-pipe.schedule._n_microbatches:]).sum()


def aux_sum(pipe: Pipeline, pp: int) -> torch.Tensor:
    """This step's coef x router aux loss (the mean over its micro-batches) x pp on the last
    stage, 0 elsewhere: runtime/train.py divides the world-sum by the world, and only world / pp
    ranks hold it (the last micro-batches entries: the first step's shape-inference probe adds one)."""
    m = pipe.schedule._n_microbatches
    if not pipe.has_last or not pipe.aux_sums:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(pipe.aux_sums[-m:]).sum().double().cpu() * pp


def eval_loss(pipe: Pipeline, batches: list, place) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, labelled tokens) of this dp rank's eval micro-batches, forward
    only, in groups of pp.microbatches (the schedule's fixed split), the last group padded with
    copies of the first batch whose labels are all IGNORE (no token counted). Both are 0 off the
    last stage, so the caller's world all-reduce counts every token once per tp rank, as
    without pp. place(batch) -> (x, y, pos) on the device."""
    m = pipe.schedule._n_microbatches
    ce = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for g in range(0, len(batches), m):
        group = [place(b) for b in batches[g:g + m]]
        while len(group) < m:             # filler: every rank runs the same number of schedule steps
            x, y, pos = group[0]
            group.append((x, torch.full_like(y, IGNORE), pos))
        x, y = torch.cat([t[0] for t in group]), torch.cat([t[1] for t in group])
        pos = torch.cat([t[2] for t in group]) if group[0][2] is not None else None
        ce += step(pipe, x, y, 0.0, pos, train=False).cpu()
        if pipe.has_last:
            tokens += (y != IGNORE).sum().double().cpu()
    return ce, tokens
