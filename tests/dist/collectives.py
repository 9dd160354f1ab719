"""Every collective a rank issues, as issued: op, mesh axis, dtype, bytes.

A TorchDispatchMode sees every dispatcher call of the thread, which is where all of them pass:
torch.distributed's Python API (FSDP2's all-gather / reduce-scatter, HSDP's all-reduce, the
train loop's stats) reaches the backend through the `c10d::*` ops; DTensor redistributions,
loss parallel and context parallel issue `_c10d_functional::*` ops. For an op on a DTensor
the mode returns NotImplemented, so DTensor's own dispatch runs with the mode still active and
the collectives it issues inside are seen too; any other op runs with the mode off, so a
collective that calls another one inside (an autograd-aware funcol op) is logged once, as
the outermost. On CPU the backward runs on the calling thread, so its collectives are seen.

bytes is the collective's full-size buffer: an all-gather's output, a reduce-scatter's input,
an all-reduce's (broadcast's) tensor; a ring moves (n-1)/n of it per rank for all-gather and
reduce-scatter and 2(n-1)/n for all-reduce.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# op name -> kind; the c10d names are the in-place backend ops behind ProcessGroup's methods
KINDS = {
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "broadcast": "broadcast", "broadcast_": "broadcast",
    "all_to_all_single": "all_to_all", "alltoall_base_": "all_to_all", "alltoall_": "all_to_all",
    "send": "send", "recv_": "recv",
}
NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def _group_name(args, kwargs) -> str:
    for a in (*args, *kwargs.values()):
        if isinstance(a, str) and a not in ("sum", "avg", "max", "min", "product", "premul_sum"):
            return a                                   # funcol: the group's registered name
        if isinstance(a, torch.ScriptObject) and hasattr(a, "group_name"):
            return a.group_name                        # c10d: the ProcessGroup itself
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.ScriptObject):
            try:
                return torch.distributed.distributed_c10d.ProcessGroup.unbox(a).group_name
            except Exception:   # noqa: BLE001
                pass
    raise ValueError(f"no process group among {args}")


class CollectiveLog(TorchDispatchMode):
    """with CollectiveLog(axes) as log: ... ; log.records. axes: {group_name: axis name}."""

    def __init__(self, axes: dict[str, str]):
        super().__init__()
        self.axes = axes
        self.records: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented                      # DTensor dispatches, this mode still on
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns in NAMESPACES and name in KINDS:
            self.records.append(self._record(func, name, args, kwargs))
        return func(*args, **kwargs)

    def _record(self, func, name: str, args, kwargs) -> dict:
        import torch.distributed as dist

        kind = KINDS[name]
        group = _group_name(args, kwargs)
        pg = dist.distributed_c10d._resolve_process_group(group)
        n = dist.get_world_size(pg)
        # c10d: (outputs, inputs, ...) for the gather / scatter ops, (tensors, ...) for the rest;
        # funcol: (input, ...)
        c10d = func.namespace == "c10d" and kind in ("all_gather", "reduce_scatter", "all_to_all")
        ins = _tensors(args[1] if c10d else args[0])
        sent = sum(t.numel() * t.element_size() for t in ins)
        full = sent * n if kind == "all_gather" else sent
        return {"op": kind, "name": f"{func.namespace}.{name}", "axis": self.axes.get(group, group),
                "group_size": n, "ranks": sorted(dist.get_process_group_ranks(pg)), "dtype": str(ins[0].dtype).removeprefix("torch."),
                "numel": sum(t.numel() for t in ins), "bytes": full,
                "backward": torch._C._current_graph_task_id() != -1}


def mesh_axes(mesh) -> dict[str, str]:
    """{process group name: mesh axis} for every axis of the world mesh, the flattened
    dp_shard_cp when there is one, and the default group ("world")."""
    import torch.distributed as dist

    out = {dist.distributed_c10d._get_default_group().group_name: "world"}
    names = list(mesh.mesh_dim_names or ())
    for dim in names:
        out.setdefault(mesh[dim].get_group().group_name, dim)
    try:
        flat = mesh["dp_shard_cp"]
        out.setdefault(flat.get_group().group_name, "dp_shard_cp")
    except (KeyError, RuntimeError, ValueError):
        pass
    return out
