"""render stage: Resolved -> {relative path: bytes}. Pure: same input, same bytes.

Jinja2 with StrictUndefined (a missing value is an error, never an empty string) and
keep_trailing_newline. One quoting rule for the shell templates, enforced, not hoped for: their
environment's `finalize` lets through only integers and values that went through `shquote`
(one shell word, single-quoted, used OUTSIDE any double quotes: a default inside
"${VAR:-...}" is first assigned to a variable) or `token` (a strict whitelist for #SBATCH
lines and comments, which no quoting can protect: Slurm reads `#SBATCH` lines itself and a
newline ends a comment). Any other string in a `{{ }}` of a shell template is a render error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
from pathlib import Path
from typing import Any

import jinja2
import yaml
from meshbake.runtime import plan as P
from meshbake.runtime.units import fmt_bytes

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
RUNTIME = ROOT / "runtime"
SHELL_TEMPLATES = ("launch.sh", "job.sbatch")


class ShellSafe(str):
    """A string already made safe for its place in a shell script."""


# what an #SBATCH value or a comment may hold: no space, quote, $, backtick, ;, #, newline, non-ASCII
TOKEN = re.compile(r"[A-Za-z0-9_.,:+=&|()\[\]*-]+")


def shquote(v: Any) -> ShellSafe:
    """One shell word: `'...'` with ' as '"'"'. Safe only outside double quotes."""
    return ShellSafe(shlex.quote(str(v)))


def token(v: Any) -> ShellSafe:
    s = str(v)
    if not TOKEN.fullmatch(s):    # the schema refuses these first; this is the last line of defence
        raise ValueError(f"{s!r} may not appear in an #SBATCH line or a shell comment")
    return ShellSafe(s)


def _shell_finalize(v: Any) -> Any:
    if isinstance(v, ShellSafe) or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise ValueError(f"unquoted value {v!r} in a shell template: use | shquote (a shell word) "
                     "or | token (an #SBATCH value or a comment)")


class MdSafe(str):
    """A string already escaped for its place in PLAN.md."""


# CommonMark: a backslash escapes any ASCII punctuation. These can start markup: emphasis, code,
# links, raw HTML (an unclosed `<!--` in model.weights hid the rest of PLAN.md), table cells.
# `_` only at a word boundary (intraword underscores never open emphasis: lm_head stays lm_head).
_MD_SPECIAL = re.compile(r"[\\`*\[\]<>&|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def md(v: Any) -> MdSafe:
    """Text: markup characters backslash-escaped, control characters shown as \\uXXXX."""
    s = _MD_SPECIAL.sub(lambda m: "\\" + m.group(), str(v))
    return MdSafe(_CONTROL.sub(lambda m: f"\\\\u{ord(m.group()):04x}", s))


def md_code(v: Any, table: bool = False) -> MdSafe:
    """A code span that nothing inside can end: the fence is one backtick longer than the
    longest run in the value; `|` is escaped in table cells (GFM splits cells first)."""
    s = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", str(v))
    if table:
        s = s.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall("`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return MdSafe(f"{fence}{pad}{s}{pad}{fence}")


def _md_finalize(v: Any) -> Any:
    if isinstance(v, MdSafe) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    return md(v)


def _gb(x: float) -> str:
    return fmt_bytes(x, digits=2)


def environment(shell: bool = False) -> jinja2.Environment:
    """shell=False: PLAN.md, where every {{ }} is markdown-escaped unless it went through md_code."""
    extra = {"finalize": _shell_finalize if shell else _md_finalize}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False,
                             **extra)
    env.filters.update(shquote=shquote, token=token, md_code=md_code, gb=_gb, num=lambda n: f"{n:,}")
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
    import math

    from meshbake.compiler.placements import DTYPE_BYTES, group_name, local_shape

    rows: dict[str, dict[str, Any]] = {}
    nbytes = DTYPE_BYTES[res.recipe.model.dtype]
    for m in res.model.modules:
        style = res.placements.styles[m.fqn]
        g = group_name(m.fqn)
        loc = local_shape(m.shape, m.kind, style, res.mesh.tp)
        # every parameter the module owns (bias, an expert's down_proj) is split like its weight
        b = m.numel * math.prod(loc) // max(1, math.prod(m.shape)) * nbytes
        if g in rows:
            rows[g]["count"] += 1
            rows[g]["nbytes"] += b
            continue
        fmt = lambda s: " x ".join(map(str, s))  # noqa: E731
        rows[g] = {"group": g, "count": 1, "kind": m.kind, "shape": fmt(m.shape), "style": style,
                   "local": fmt(loc), "nbytes": b}
    for r in rows.values():
        r["bytes"] = f"{r['nbytes'] / 1e6:,.1f} MB" if r["nbytes"] >= 1e5 else f"{r['nbytes'] / 1e3:,.1f} kB"
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
           "gathered": f"top-level module (embeddings, final norm, lm_head) + last block kept gathered in {pd}" if fsdp
                       else "none: no FSDP",
           "activations": f"{res.model.num_layers} layers, mbs {t.micro_batch_size} x seq {t.seq_len}"
                          f"{' / cp ' + str(m.cp) if m.cp > 1 else ''}, AC {t.activation_checkpointing}",
           "logits": ("tokens x vocab / tp x 16 B (loss parallel)" if res.plan.tp.loss_parallel
                      else "tokens x vocab x 12 B (fp32 log-softmax, its grad in and out)")}
    return [{"name": k, "gb": _gb(v), "how": how[k]} for k, v in e.terms.items()]


def _phase_rows(res) -> list[dict[str, str]]:
    e = res.estimate
    return [{"name": name, "gb": _gb(b), "peak": name == e.peak_phase} for name, b in e.phases]


def _step_rows(res) -> tuple:
    from meshbake.compiler.estimate import step_rows

    return step_rows(res.recipe, res.mesh, res.estimate.time) if res.estimate.time else ()


def recipe_yaml(recipe) -> str:
    """The normalized recipe: every key with its resolved default, in schema order."""
    d = dataclasses.asdict(recipe)
    d["train"]["betas"] = list(d["train"]["betas"])
    d["lora"]["targets"] = list(d["lora"]["targets"])
    d["cluster"]["env_pass"] = list(d["cluster"]["env_pass"])
    d["cluster"]["container_mounts"] = list(d["cluster"]["container_mounts"])
    d["cluster"]["env"] = dict(d["cluster"]["env"])
    tr = d.pop("tracking")            # in the schema's shape: tracking.wandb.project, not wandb_project
    d["tracking"] = {"tensorboard": tr["tensorboard"],
                     "wandb": {k.removeprefix("wandb_"): list(v) if k == "wandb_tags" else v
                               for k, v in tr.items() if k.startswith("wandb_")}}
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
               "phase_rows": _phase_rows(res), "step_rows": _step_rows(res)}
    files = {"plan.json": P.dumps(res.plan).encode(), "recipe.yaml": recipe_yaml(res.recipe).encode(),
             "PLAN.md": env.get_template("PLAN.md.j2").render(ctx).encode()}
    shell = environment(shell=True)
    for name in SHELL_TEMPLATES:
        if (TEMPLATES / f"{name}.j2").is_file():
            files[name] = shell.get_template(f"{name}.j2").render(ctx).encode()
    files.update(runtime_files())
    manifest = "".join(f"{hashlib.sha256(files[k]).hexdigest()}  {k}\n" for k in sorted(files))
    files["MANIFEST.sha256"] = manifest.encode()
    return dict(sorted(files.items()))
