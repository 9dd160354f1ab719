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

import hashlib
import re
import shlex
from pathlib import Path
from typing import Any

import jinja2
import yaml
from meshbake.compiler.estimate import view as estimate_view
from meshbake.compiler.mesh import view as mesh_view
from meshbake.compiler.placements import placement_rows
from meshbake.runtime import plan as P
from meshbake.runtime.safeio import printable
from meshbake.runtime.sections import SCHEMA_PATH, to_dict
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


def _u(ch: str) -> str:
    return f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}"


def _visible(s: str, esc=_u, keep: str = "") -> str:
    """s with every character runtime.safeio.printable would escape (control Cc, format Cf such
    as U+202E right-to-left override and U+200B zero width space, line/paragraph separators
    Zl/Zp, surrogates, private use, unassigned) shown as \\uXXXX: a reviewer sees them, and
    they cannot reorder or hide the text around them. `keep`: characters left as they are (a
    code block keeps its newlines and tabs). printable decides what is invisible; the \\uXXXX
    spelling stays the one PLAN.md always used for control characters."""
    if s.isprintable() and not keep:
        return s
    return "".join(ch if ch in keep or printable(ch) == ch else esc(ch) for ch in s)


def md(v: Any) -> MdSafe:
    """Text: markup characters backslash-escaped, invisible characters shown as \\uXXXX."""
    s = _MD_SPECIAL.sub(lambda m: "\\" + m.group(), str(v))
    return MdSafe(_visible(s, lambda ch: "\\" + _u(ch)))     # "\\" + "\\u..": markdown shows one backslash


def md_code(v: Any, table: bool = False) -> MdSafe:
    """A code span that nothing inside can end: the fence is one backtick longer than the
    longest run in the value; `|` is escaped in table cells (GFM splits cells first)."""
    s = _visible(str(v))
    if table:
        s = s.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall("`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return MdSafe(f"{fence}{pad}{s}{pad}{fence}")


def md_block(v: Any, info: str = "") -> MdSafe:
    """A fenced code block shown verbatim (newlines and tabs kept, invisible characters as
    \\uXXXX) that no line inside can close: the fence is at least three backticks and one
    longer than the longest backtick run in the value (a closing fence must be as long)."""
    s = _visible(str(v), keep="\n\t")
    fence = "`" * max(3, max((len(r) for r in re.findall("`+", s)), default=0) + 1)
    return MdSafe(f"{fence}{info}\n{s}\n{fence}")


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
    env.filters.update(shquote=shquote, token=token, md_code=md_code, md_block=md_block, gb=_gb, num=lambda n: f"{n:,}",
                       g=lambda x: f"{x:g}")
    return env


def recipe_yaml(recipe) -> str:
    """The normalized recipe: every key with its resolved default, in schema order. Without
    pipeline parallelism (mesh.pp 1, the pp section all defaults; compiler/pp.py refuses any
    other pp key there) mesh.pp and pp are left out: such a recipe reads as before pp existed."""
    d = to_dict(recipe)
    if d["mesh"].get("pp") == 1:
        d["mesh"].pop("pp")
        d.pop("pp", None)
    return "# normalized by meshbake: every default filled in\n" + yaml.safe_dump(d, sort_keys=False, width=100)


def runtime_files() -> dict[str, bytes]:
    """The runtime's sources and the recipe schema its plan classes are generated from."""
    return {f"runtime/{p.relative_to(RUNTIME).as_posix()}": p.read_bytes()
            for p in sorted([*RUNTIME.rglob("*.py"), RUNTIME / SCHEMA_PATH.name]) if "__pycache__" not in p.parts}


_MODEL_FACTS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "vocab_size", "num_experts")


# names that change which program runs or where it reads, writes and sends: a reviewer should look
# twice when cluster.env sets one (validate refuses the worst there: PATH, PYTHONPATH, LD_PRELOAD,
# MESHBAKE_*) or env_setup mentions one (nothing can refuse a shell line: MESHBAKE_RUN_DIR moves
# the run dir, PYTHONPATH puts other code in front of the bundle's runtime/)
_RUNS_WHAT = ("PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "LD_PRELOAD",
              "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "WANDB_BASE_URL", "HF_ENDPOINT", "HF_HOME")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _notable(name: str) -> bool:
    return name.startswith("MESHBAKE_") or name in _RUNS_WHAT


def _mount(m: str) -> dict[str, Any]:
    """pyxis SRC:DST[:FLAGS] -> its parts; read-write unless a flag says ro."""
    src, _, rest = m.partition(":")
    dst, _, flags = rest.partition(":")
    return {"spec": m, "src": src, "dst": dst or src, "ro": "ro" in flags.split("+"),
            "root": src.rstrip("/") == ""}


def _hub_pinned(plan) -> bool:
    """The runtime reads a Hugging Face Hub snapshot pinned to its commit (compiler/hub.py): weights,
    tokenizer or a data source by Hub id. (model.config is read at compile time only: plan.json
    holds it.)"""
    from meshbake.runtime.hub import parse

    d = plan.data
    refs = [plan.model.weights] + ([] if d.format == "synthetic" else
                                   [d.tokenizer, *(s.path for s in (*d.sources, *d.eval_sources))])
    return any((h := parse(r)) is not None and h.pinned for r in refs)


def job_view(plan, cluster: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the plan's numbers that decides what the job runs and where it reads
    and writes, as plain values for PLAN.md's "What the job runs": the shell set-up, the
    environment, the container, the paths (each as the runtime joins it), the trackers."""
    setup = cluster["env_setup"]
    ck = plan.checkpoint.dir
    wb = plan.tracking.wandb
    env = {str(k): str(v) for k, v in cluster["env"].items()}
    return {
        "env_setup": setup,
        # a shell line cannot be judged by reading names out of it; these only point at what to read first
        "setup_names": sorted({n for n in _NAME.findall(setup or "") if _notable(n)}),
        "env": [{"name": k, "value": v, "notable": _notable(k)} for k, v in env.items()],
        "env_pass": list(cluster["env_pass"]),
        "image": cluster["container_image"],
        "mounts": [_mount(m) for m in cluster["container_mounts"]],
        "run_dir": plan.run_dir,
        # validate keeps checkpoint.dir relative and inside the run dir (keep: N prunes there)
        "ckpt_dir": f"{plan.run_dir.rstrip('/')}/{ck}",
        "resume": plan.checkpoint.resume,
        "prepared_dir": plan.data.prepared_dir,
        "synthetic": plan.data.format == "synthetic",
        "sources": [(s.path, s.weight) for s in plan.data.sources],
        "eval_sources": [(s.path, s.weight) for s in plan.data.eval_sources],
        "tokenizer": plan.data.tokenizer,
        "hub_pinned": _hub_pinned(plan),
        "tensorboard": plan.tracking.tensorboard,
        "wandb": None if not wb.project else {
            "project": wb.project, "entity": wb.entity, "name": wb.name or plan.name, "mode": wb.mode,
            "tags": list(wb.tags)},
    }


def context(res) -> dict[str, Any]:
    """The templates' whole input, plain values: the plan (the contract: what runs), the
    recipe's cluster section, and each stage's view (rows and numbers it computed). The
    templates print these; they compute nothing (docs/CONTRACTS.md, Templates)."""
    cluster = to_dict(res.recipe.cluster)
    return {"plan": res.plan, "cluster": cluster, "job": job_view(res.plan, cluster),
            "job_name": f"meshbake-{res.plan.name}",
            "weights_check": res.weights.line if getattr(res, "weights", None) is not None else None,
            "model": {k: getattr(res.model, k) for k in _MODEL_FACTS},
            "mesh": mesh_view(res.mesh),
            "placements": {"rows": placement_rows(res.model, res.placements, res.mesh.tp, res.recipe.model.dtype,
                                                    res.mesh.ep)},
            "est": estimate_view(res.recipe, res.model, res.mesh, res.estimate),
            "pp": pp_view(res),
            # tied embeddings under pp (not ZBV): the last stage holds a copy of the table (runtime/pp.py)
            "tied_copy": bool(res.plan.pp is not None and res.plan.model.tie_word_embeddings
                              and res.plan.pp.schedule != "ZBVZeroBubble")}


def pp_view(res) -> dict[str, Any] | None:
    """PLAN.md's pipeline section: the stage table (compiler/pp.stage_rows) and the rank facts."""
    if res.plan.pp is None:
        return None
    from meshbake.compiler.pp import node_placement, stage_rows

    m, pp = res.plan.mesh, res.plan.pp
    group = m.world // m.pp               # consecutive ranks per stage group (pp outermost)
    bubble = (m.pp - 1) / (pp.microbatches + m.pp - 1) / pp.stages_per_rank
    est = res.estimate
    ranks = [{"rank": r, "params": n, "bytes": b, "peak": r == est.pp_peak_rank} for r, n, b in est.pp_rank_rows]
    return {"stages": stage_rows(res.model, pp, m.pp), "group_ranks": group, "bubble": f"{bubble:.1%}", "ranks": ranks,
            "send_bytes": est.pp_comm_bytes // 2,
            "whole_nodes": group % m.procs_per_node == 0, "group_nodes": group // m.procs_per_node,
            "nodes": node_placement(m)}


def render_bundle(res) -> dict[str, bytes]:
    env = environment()
    ctx = context(res)
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
