"""python -m runtime.dryrun PLAN_JSON [--ranks 0,-1]: the job's own model build, for the real
world size, without GPUs and without memory.

Each rank listed joins a fake process group (torch's FakeProcessGroup: collectives return at
once) of plan.mesh.world ranks and builds the model exactly as runtime/parallel.py does for
the job (meta model -> CP -> TP -> LoRA -> AC -> compile -> FSDP2/HSDP), on meta tensors. An
error the job would hit at start-up is reported with the step it came from; otherwise, per
rank, the parameters it holds: elements (the rank's own rows) and bytes allocated (FSDP2
allocates every shard padded to ceil(rows / (dp_shard x cp)) rows). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .plan import Plan, load_plan


def held(model: torch.nn.Module) -> dict[str, int]:
    out = {"params": 0, "param_bytes": 0, "trainable": 0}
    for p in model.parameters():                   # a tied weight once
        local = p._local_tensor if isinstance(p, DTensor) else p
        out["params"] += local.numel()
        # the storage under the view: FSDP2's padded shard (meta tensors keep their sizes); an
        # NF4 weight (QLoRA, runtime/quant.py) is a wrapper: its packed codes, scalers, factors
        out["param_bytes"] += _nbytes(local)
        out["trainable"] += local.numel() if p.requires_grad else 0
    return out


def _nbytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and hasattr(t, "quantized_data"):
        return sum(getattr(t, n).untyped_storage().nbytes() for n in inner()[0])
    return t.untyped_storage().nbytes()


@contextmanager
def shared_submeshes() -> Iterator[None]:
    """FSDP2 derives two meshes per parameter (fully_shard -> FSDPParam): the dp x tp mesh of a
    TP DTensor (DeviceMesh._concatenate) and, under HSDP, the dp_shard sub-mesh (mesh[name]),
    each a new DeviceMesh with its layout recomputed: half of a 70B build's CPU time for 723
    parameters per rank that all get the same two. Here each (mesh, key) is derived once and
    shared, as equal meshes; FSDP2's checks on them (orthogonal dims, one root mesh) still run."""
    from torch.distributed.device_mesh import DeviceMesh

    concat, getitem = DeviceMesh.__dict__["_concatenate"], DeviceMesh.__dict__["__getitem__"]
    memo: dict = {}          # key -> (the meshes it came from, kept alive so their ids stay theirs; result)

    def _concatenate(meshes):
        key = ("concat", *map(id, meshes))
        if key not in memo:
            memo[key] = (tuple(meshes), concat.__func__(meshes))
        return memo[key][1]

    def _getitem(self, names):
        key = ("item", id(self), names if isinstance(names, str) else tuple(names))
        if key not in memo:
            memo[key] = ((self,), getitem(self, names))
        return memo[key][1]

    DeviceMesh._concatenate, DeviceMesh.__getitem__ = staticmethod(_concatenate), _getitem
    try:
        yield
    finally:
        DeviceMesh._concatenate, DeviceMesh.__getitem__ = concat, getitem


def build_rank(plan: Plan, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .parallel import parallelize

    where = {"stage": "process group"}
    t0 = time.perf_counter()
    # cyclic garbage collection off during the build: a 70B build makes ~10^5 modules, parameters
    # and hooks, and the collector's passes over them (all still alive) were a third of its CPU
    # time; a meta model holds no memory, so its garbage can wait for the next collection
    gc_was = gc.isenabled()
    gc.disable()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=plan.mesh.world)
    try:
        where["stage"] = "mesh"
        mesh = init_device_mesh("cpu", plan.mesh.shape, mesh_dim_names=plan.mesh.mesh_dims)
        with shared_submeshes():
            if plan.mesh.pp_enabled:      # this rank's stages only (runtime/pp.py), as the run builds them
                from .pp import parallelize_stages, stage_ids

                model, _ = parallelize_stages(plan, mesh, stage_ids(plan, mesh["pp"].get_local_rank()),
                                              stage=lambda name: where.update(stage=name))
            else:
                model = parallelize(plan, mesh, stage=lambda name: where.update(stage=name))
        return {"rank": rank, "ok": True, **held(model), "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:   # noqa: BLE001 — the point is to report it, with the step it came from
        return {"rank": rank, "ok": False, "stage": where["stage"], "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=-3)}
    finally:
        dist.destroy_process_group()
        if gc_was:
            gc.enable()


def dryrun(plan: Plan, ranks: list[int]) -> list[dict]:
    world = plan.mesh.world
    return [build_rank(plan, r % world) for r in dict.fromkeys(ranks)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.dryrun", description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--ranks", default="0,-1", help="comma-separated; negative counts from the last rank")
    args = ap.parse_args(argv)
    res = dryrun(load_plan(args.plan), [int(r) for r in args.ranks.split(",")])
    print(json.dumps(res, indent=1))
    return 0 if all(r["ok"] for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
