"""ParallelDims: the device mesh as one small value with its derived facts.

The compiler's mesh stage resolves it (compiler/mesh.MeshSpec extends it with compile-only
facts), plan.json carries its fields under `mesh`, and the runtime, the templates and the
estimate read the facts below instead of re-deriving them. Modelled on torchtitan's
ParallelDims (torchtitan/distributed/parallel_dims.py), but frozen and without asserts: the
mesh stage validates (errors as values), this object only states what a valid mesh means.

Axis order is fixed outer -> inner: [pp,] dp_replicate, dp_shard, cp, tp (torchtitan's order).
Ranks are laid out row-major over that shape (torch.arange(world).view(pp, dp_replicate,
dp_shard, cp, tp)), so a TP group is `tp` consecutive ranks and stays on one node when tp
divides the GPUs per node, and pp is the outermost axis: a pipeline stage's ranks are
world / pp consecutive ranks (whole nodes when world / pp is a multiple of the GPUs per node),
so the only traffic that crosses between stage groups is the point-to-point activation send /
recv of each micro-batch (B x T x H per hop), never an FSDP or TP collective. pp is in the
mesh only when > 1: a pp-1 plan's mesh, plan.json and device mesh are those of before pp.
Stdlib only (runtime/plan.py imports it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")     # outer -> inner; tp innermost = one node
PP_DIMS = ("pp",) + DIMS                             # with pipeline parallelism: pp outermost (across nodes)
SHARD_CP = "dp_shard_cp"        # dp_shard x cp flattened into one mesh dim: FSDP's shard dim under cp


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    nodes: int
    procs_per_node: int
    device: str                     # "cuda" or "cpu"
    backend: str                    # "nccl" or "gloo" (backend_for(device))
    ep: int = 1                     # expert parallel: carved from dp_shard x cp x tp (not a factor of world; runtime/ep.py)
    pp: int = 1                     # pipeline stages groups (runtime/pp.py); outermost axis

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def mesh_dims(self) -> tuple[str, ...]:
        """The mesh dim names, outer -> inner: PP_DIMS with pipeline parallelism, else DIMS."""
        return PP_DIMS if self.pp_enabled else DIMS

    @property
    def shape(self) -> tuple[int, ...]:
        """init_device_mesh's shape, in self.mesh_dims order."""
        return tuple(getattr(self, d) for d in self.mesh_dims)

    @property
    def world(self) -> int:
        return math.prod(self.shape)

    @property
    def strides(self) -> dict[str, int]:
        """Rank distance between neighbours along each axis (row-major): tp 1, cp tp, ..."""
        out, step = {}, 1
        for d in reversed(PP_DIMS):
            out[d], step = step, step * getattr(self, d)
        return {d: out[d] for d in self.mesh_dims}

    @property
    def dp(self) -> int:
        """Ranks that see different data: dp_replicate x dp_shard (cp and tp ranks share a batch)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks a parameter is sharded over by FSDP: dp_shard x cp (cp ranks hold the same weights)."""
        return self.dp_shard * self.cp

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def experts_fsdp(self) -> int:
        """Ranks one expert is FSDP-sharded over under expert parallelism: efsdp = dp_shard x cp x
        tp / ep (ep is carved from the flattened dp_shard x cp x tp, ep inner, torchtitan's etp = 1:
        the experts whole on each tp rank; runtime/ep.py)."""
        return self.fsdp * self.tp // self.ep

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def hsdp(self) -> bool:
        """Replicas of the FSDP-sharded model, gradients all-reduced across them."""
        return self.dp_replicate > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 only when some rank holds another shard or another batch of the same weights:
        dp_replicate x dp_shard x cp > 1. Over a one-rank data-parallel mesh (world 1, TP-only
        plans like 8b_tp) fully_shard would only add its hooks, copies and a no-op
        reduce-scatter (0.81-0.87 of a plain loop's tokens/s at world 1 on CPU); torchtitan
        skips it there too. Unlike torchtitan's fsdp_enabled this counts dp_replicate: HSDP
        with dp_shard 1 is still fully_shard (over the replicate dim)."""
        return self.dp_replicate * self.fsdp > 1

    @property
    def fsdp_shard_dims(self) -> tuple[str, ...]:
        """The mesh dims FSDP shards over; with cp they are flattened into one, SHARD_CP."""
        return ("dp_shard", "cp") if self.cp_enabled else ("dp_shard",)

    @property
    def fsdp_mesh_dims(self) -> tuple[str, ...]:
        """Names of the mesh fully_shard gets: (dp_replicate,) for HSDP, then the shard dim."""
        shard = SHARD_CP if self.cp_enabled else "dp_shard"
        return ("dp_replicate", shard) if self.hsdp else (shard,)

    @property
    def fsdp_dims(self) -> tuple[str, ...]:
        """The axes of fsdp_mesh_dims, unflattened: dp_replicate? x dp_shard x cp?."""
        return (("dp_replicate",) if self.hsdp else ()) + self.fsdp_shard_dims

    @property
    def cp_chunks(self) -> int:
        """Load-balanced CP splits every sequence into 2 x cp chunks, two per cp rank."""
        return 2 * self.cp if self.cp_enabled else 1

    def tp_flags(self, sequence_parallel: bool, loss_parallel: bool) -> tuple[bool, bool]:
        """The effective (sequence_parallel, loss_parallel) on this mesh (see tp_flags below)."""
        return tp_flags(self.tp, sequence_parallel, loss_parallel)

    def seq_len_divisor(self, sequence_parallel: bool) -> int:
        """seq_len must be a multiple of this: 2 x cp chunks (load-balanced CP), and sequence
        parallel then splits each cp shard over tp. `sequence_parallel` is the effective flag."""
        return self.cp_chunks * (self.tp if sequence_parallel and self.tp_enabled else 1)


def tp_flags(tp: int, sequence_parallel: bool, loss_parallel: bool) -> tuple[bool, bool]:
    """The effective (sequence_parallel, loss_parallel): both split over tp ranks, so with
    tp = 1 there is nothing to split and both are off. The one place this is decided."""
    return sequence_parallel and tp > 1, loss_parallel and tp > 1


def tokens_per_rank(train, dims: ParallelDims) -> int:
    """Tokens one rank runs per micro-step: micro_batch_size x seq_len / cp (cp ranks split
    each sequence; tp ranks see the same tokens)."""
    return train.micro_batch_size * train.seq_len // dims.cp


def tokens_per_step(train) -> int:
    """Tokens per optimizer step over all ranks: global_batch_size x seq_len
    (= micro_batch_size x grad_accum x dp x seq_len). `train` is the recipe's or the plan's."""
    return train.global_batch_size * train.seq_len
