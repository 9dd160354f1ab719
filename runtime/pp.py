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

Loss: the last stage's loss_fn returns sum(token CE) x dp x cp / N (N = labelled tokens of
the global batch), exactly the non-pp scaling in runtime/train.py, and schedule grads are
not rescaled (scale_grads=False): the sum over micro-batches is the same gradient. Only the
last stage knows the loss; the step's world all-reduce of the loss sum (0 on other stages)
gives every rank the same global mean, so metrics.jsonl (rank 0) holds the same loss as
without pp.
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
    lm_head on the last. Its parameter names are the HF model's own (model.layers.5...)."""

    def __init__(self, base: nn.Module, lm_head: nn.Module | None, first: bool):
        super().__init__()
        self.model = base
        self.lm_head = lm_head
        self.first = first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # first stage: token ids (mbs, T); later stages: the hidden states (mbs, T, H)
        kw = {"input_ids": x} if self.first else {"inputs_embeds": x}
        h = self.model(**kw, use_cache=False).last_hidden_state          # (mbs, T, H)
        return self.lm_head(h) if self.lm_head is not None else h         # (mbs, T, V) on the last


def _shell(base: nn.Module, fqn_layers: str, layers: nn.ModuleList, embedding: str | None, norm: str | None) -> nn.Module:
    """A shallow copy of the base model (its own module dict) holding `layers`; embedding /
    norm: the attribute names to drop (None: keep)."""
    shell = copy.copy(base)
    shell._modules = dict(base._modules)
    shell._parameters = dict(base._parameters)
    shell._buffers = dict(base._buffers)
    shell._modules[fqn_layers] = layers
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
    scale: list[float] = field(default_factory=lambda: [1.0])     # dp x cp / N of this step


def split_model(model: nn.Module, plan: Plan, ids: list[int]) -> list[Stage]:
    """Prune `model` (meta, HF names) to the parts of stages `ids` and return their Stage
    modules. Roles from plan.json: the blocks' parent (model.layers), embedding, final norm,
    lm_head."""
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
        stages.append(Stage(shell, model.get_submodule(roles.lm_head) if last else None, first))
    mine = sorted({i for s in ids for i in range(*plan.pp.stages[s])})
    base._modules[layers_attr] = _blocks([(i, all_layers[i]) for i in mine])
    if 0 not in ids:
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
    # AC on the whole model before the split: transformers marks each block (applied later it
    # works the same, but a stage without the embedding makes transformers warn that it cannot
    # find the input embeddings); the order TP -> AC matters only for wrappers, HF's AC is a flag
    stage("ac")
    apply_ac(model, plan.train.activation_checkpointing)
    stage("pp")
    stages = split_model(model, plan, ids)
    if plan.mesh.tp_enabled:          # the placements of the modules this rank holds
        stage("tp")
        held = {n for n, _ in model.named_modules()}
        apply_tp(model, mesh["tp"], replace(plan, tp=replace(plan.tp, placements={
            f: s for f, s in plan.tp.placements.items() if f in held})))
    if plan.mesh.fsdp_enabled:
        stage("fsdp")
        _shard(stages, dp_mesh(mesh, plan.mesh), plan)
    return model, stages


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
    materialize(model, plan)
    model.train()
    n = len(plan.pp.stages)
    group = pp_mesh.get_group()
    pstages = [PipelineStage(st, s, n, device, group=group) for st, s in zip(stages, ids)]
    pipe = Pipeline(model, stages, ids, None, 0 in ids, n - 1 in ids, group)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(0, 1), ignore_index=IGNORE, reduction="sum")
        pipe.loss_sums.append(ce.detach().double())
        return ce * pipe.scale[0]

    cls = get_schedule_class(plan.pp.schedule)
    multi = issubclass(cls, PipelineScheduleMulti)
    pipe.schedule = cls(pstages if multi else pstages[0], n_microbatches=plan.pp.microbatches,
                        loss_fn=loss_fn, scale_grads=False)
    return pipe


def _shard(stages: list[Stage], dp: DeviceMesh, plan: Plan) -> None:
    """FSDP2 per block, then each stage as a root (its embedding / norm / lm_head). Blocks are
    not resharded after forward (torchtitan's default under pp): with m micro-batches in
    flight a resharded block would be all-gathered again for every micro-batch's backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .parallel import DTYPES

    mp = plan.train.mixed_precision
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[mp.param_dtype], reduce_dtype=DTYPES[mp.reduce_dtype])
    for st in stages:
        for layer in st.model.get_submodule(plan_roles(plan).block_prefix.rpartition(".")[2]):
            fully_shard(layer, mesh=dp, mp_policy=policy, reshard_after_forward=False)
        fully_shard(st, mesh=dp, mp_policy=policy, reshard_after_forward=False)


def step(pipe: Pipeline, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """One optimizer step's forward + backward over the step's micro-batches: x, y are this dp
    rank's (microbatches x mbs, T) (the schedule splits them along dim 0, in order). Returns the
    sum of token losses on the last stage (0 elsewhere), float64."""
    pipe.loss_sums.clear()
    pipe.scale[0] = scale
    # return_outputs=False (torchtitan's call): otherwise the last stage keeps every micro-batch's
    # logits (mbs x T x V each) in output_chunks until the step ends and then torch.cat's them all
    # into one more copy nobody reads (measured, tiny-llama pp 2 x tp 2, 4 micro-batches: 36.7 MB
    # peak at that cat)
    if pipe.has_first:
        pipe.schedule.step(x, target=y, losses=[], return_outputs=False)
    else:
        pipe.schedule.step(target=y, losses=[], return_outputs=False)
    if not pipe.has_last:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    # the last microbatches calls: the first step's shape inference runs the loss once more on
    # a probe micro-batch before them (no backward; counting it inflated step 1's loss by 1/m)
    return torch.stack(pipe.loss_sums[-pipe.schedule._n_microbatches:]).sum()
