"""render stage: Resolved -> {relative path: bytes}. Pure: same input, same bytes.

Jinja2 with StrictUndefined (a missing value is an error, never an empty string) and
keep_trailing_newline; every value that lands in a shell script goes through `shquote`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shlex
from pathlib import Path
from typing import Any

import jinja2
import yaml

from runtime import plan as P

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
RUNTIME = ROOT / "runtime"
SHELL_TEMPLATES = ("launch.sh", "job.sbatch")


def shquote(v: Any) -> str:
    return shlex.quote(str(v))


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters.update(shquote=shquote, gb=_gb, num=lambda n: f"{n:,}")
    return env


def _mesh_rows(plan: P.Plan) -> list[dict[str, Any]]:
    m = plan.mesh
    strides = {"tp": 1, "cp": m.tp, "dp_shard": m.tp * m.cp, "dp_replicate": m.tp * m.cp * m.dp_shard}
    roles = {"dp_replicate": "replicas of the sharded model; gradients all-reduced (HSDP)",
             "dp_shard": "FSDP: parameters, gradients, optimizer state sharded",
             "cp": "context parallel: sequence split, K/V gathered; weights FSDP-sharded with dp_shard",
             "tp": "tensor parallel: every block's matmuls split; consecutive ranks, one node"}
    rows = []
    for axis in P.MESH_DIMS:
        size = getattr(m, axis)
        ranks = [i * strides[axis] for i in range(min(size, 4))]
        example = ", ".join(map(str, ranks)) + (", ..." if size > 4 else "")
        rows.append({"axis": axis, "size": size, "example": example, "role": roles[axis]})
    return rows


def _placement_rows(res) -> list[dict[str, Any]]:
    from compiler.placements import group_name, local_shape

    rows: dict[str, dict[str, Any]] = {}
    for m in res.model.modules:
        style = res.placements.styles[m.fqn]
        g = group_name(m.fqn)
        if g in rows:
            rows[g]["count"] += 1
            continue
        fmt = lambda s: " x ".join(map(str, s))  # noqa: E731
        rows[g] = {"group": g, "count": 1, "kind": m.kind, "shape": fmt(m.shape), "style": style,
                   "local": fmt(local_shape(m.shape, m.kind, style, res.mesh.tp))}
    return list(rows.values())


def _memory_rows(res) -> list[dict[str, str]]:
    e, t, m = res.estimate, res.recipe.train, res.mesh
    pd = t.mixed_precision.param_dtype
    fsdp = m.dp_replicate * m.fsdp > 1
    shard = (f"FSDP shards padded to ceil(rows / {m.fsdp}) rows (rank 0, the peak rank)" if fsdp
             else "no FSDP (one-rank data-parallel mesh)")
    how = {"params": f"{e.params_per_rank:,} params x {res.recipe.model.dtype}, after TP; {shard}",
           "grads": "trainable params, sharded like params (from the backward on)",
           "optimizer": "AdamW exp_avg + exp_avg_sq, sharded",
           "accum_grads": f"unsharded grads held between the {m.grad_accum} micro-steps (no reduce-scatter until the last)"
                          if e.accum_grads_bytes else "none: no FSDP gradient accumulation without sync",
           "gathered": f"top-level modules (embeddings, final norm, lm_head) + last block kept gathered in {pd}" if fsdp
                       else "none: no FSDP",
           "activations": f"{res.model.num_layers} layers, mbs {t.micro_batch_size} x seq {t.seq_len}"
                          f"{' / cp ' + str(m.cp) if m.cp > 1 else ''}, AC {t.activation_checkpointing}",
           "logits": ("tokens x vocab / tp x 16 B (loss parallel)" if res.plan.tp.loss_parallel
                      else "tokens x vocab x 12 B (fp32 log-softmax, its grad in and out)")}
    return [{"name": k, "gb": _gb(v), "how": how[k]} for k, v in e.terms.items()]


def _phase_rows(res) -> list[dict[str, str]]:
    e = res.estimate
    return [{"name": name, "gb": _gb(b), "peak": name == e.peak_phase} for name, b in e.phases]


def recipe_yaml(recipe) -> str:
    """The normalized recipe: every key with its resolved default, in schema order."""
    d = dataclasses.asdict(recipe)
    d["train"]["betas"] = list(d["train"]["betas"])
    d["lora"]["targets"] = list(d["lora"]["targets"])
    d["cluster"]["env_pass"] = list(d["cluster"]["env_pass"])
    if not isinstance(d["tp"]["plan"], str):
        d["tp"]["plan"] = dict(d["tp"]["plan"])
    return "# normalized by meshbake: every default filled in\n" + yaml.safe_dump(d, sort_keys=False, width=100)


def runtime_files() -> dict[str, bytes]:
    return {f"runtime/{p.relative_to(RUNTIME).as_posix()}": p.read_bytes()
            for p in sorted(RUNTIME.rglob("*.py")) if "__pycache__" not in p.parts}


def render_bundle(res) -> dict[str, bytes]:
    env = environment()
    ctx = {"plan": res.plan, "cluster": res.recipe.cluster, "model": res.model, "mesh": res.mesh,
           "est": res.estimate, "job_name": f"meshbake-{res.plan.name}", "mesh_rows": _mesh_rows(res.plan),
           "placement_rows": _placement_rows(res), "memory_rows": _memory_rows(res),
               "phase_rows": _phase_rows(res)}
    files = {"plan.json": P.dumps(res.plan).encode(), "recipe.yaml": recipe_yaml(res.recipe).encode(),
             "PLAN.md": env.get_template("PLAN.md.j2").render(ctx).encode()}
    for name in SHELL_TEMPLATES:
        if (TEMPLATES / f"{name}.j2").is_file():
            files[name] = env.get_template(f"{name}.j2").render(ctx).encode()
    files.update(runtime_files())
    manifest = "".join(f"{hashlib.sha256(files[k]).hexdigest()}  {k}\n" for k in sorted(files))
    files["MANIFEST.sha256"] = manifest.encode()
    return dict(sorted(files.items()))
