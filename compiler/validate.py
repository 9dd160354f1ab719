"""validate stage: loaded dict -> Recipe (frozen dataclasses) or Err with EVERY problem.

JSON Schema 2020-12 (runtime/recipe.schema.json) checks shapes and ranges; `iter_errors`
yields all violations, each reported at its JSON path (`train.betas[1]`, `tp.plan['x']`).
Unknown keys get a did-you-mean, also across sections (`train.gpus_per_node` ->
`cluster.gpus_per_node`). A few cross-field rules the schema cannot say follow.
"""
from __future__ import annotations

import difflib
import json
import math
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshbake.compiler.errors import Err, RecipeError, Result, reads, run
from meshbake.compiler.recipe import Recipe
from meshbake.runtime.sections import build, is_field, schema


def json_path(parts: Iterable[Any]) -> str:
    """deque(['train', 'betas', 1]) -> 'train.betas[1]'; keys that are not identifiers -> ['k']."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif str(p).isidentifier():
            out += f".{p}" if out else str(p)
        else:
            out += f"[{str(p)!r}]"
    return out or "$"


def _section_schema(path: list[Any]) -> dict[str, Any]:
    """The schema node at a JSON path (array indices go through prefixItems / items)."""
    node = schema()
    for p in path:
        if isinstance(p, int):
            pre = node.get("prefixItems", [])
            node = pre[p] if p < len(pre) else node.get("items") if isinstance(node.get("items"), dict) else {}
        else:
            node = node.get("properties", {}).get(p, {})
    return node


def _describe(path: list[Any]) -> str:
    """Description of the key, or of the array holding the item."""
    for n in range(len(path), 0, -1):
        d = _section_schema(path[:n]).get("description")
        if d:
            return d
    return ""


def _all_keys() -> dict[str, str]:
    """leaf key -> its dotted home, for cross-section hints."""
    homes: dict[str, str] = {}

    def walk(node, prefix):
        for k, v in node.get("properties", {}).items():
            homes.setdefault(k, f"{prefix}{k}")
            if v.get("type") == "object":
                walk(v, f"{prefix}{k}.")
    walk(schema(), "")
    return homes


def _unknown_key_errors(err, path: list[Any]) -> list[RecipeError]:
    node = _section_schema(path)
    allowed = sorted(node.get("properties", {}))
    extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
    out = []
    for key in extra:
        near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        home = _all_keys().get(key)
        if near:
            hint = f"did you mean {json_path(path + [near[0]])!r}?"
        elif home:
            hint = f"{key!r} belongs in {home!r}"
        else:
            hint = f"allowed keys: {', '.join(allowed)}"
        out.append(RecipeError(json_path(path + [key]), UNKNOWN, hint))
    return out


def _schema_error(err) -> list[RecipeError]:
    path = list(err.absolute_path)
    where = json_path(path)
    v = err.validator
    if v == "additionalProperties" and path[:2] == ["tp", "plan"]:
        return [RecipeError(where, f"{err.message}", "styles: colwise, rowwise, sequence_parallel, replicate")]
    if v == "additionalProperties":
        return _unknown_key_errors(err, path)
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return [RecipeError(json_path(path + [missing]), "required key is missing",
                            _section_schema(path + [missing]).get("description", ""))]
    if v == "enum":
        choices = [str(x) for x in err.validator_value]
        alias = ALIASES.get(str(err.instance).lower())
        near = [alias] if alias in choices else difflib.get_close_matches(str(err.instance), choices, n=1)
        hint = f"did you mean {near[0]!r}? (one of: {', '.join(choices)})" if near else f"one of: {', '.join(choices)}"
        return [RecipeError(where, f"{json.dumps(err.instance)} is not allowed", hint)]
    if v == "anyOf" and path[:2] == ["tp", "plan"]:
        return [RecipeError(where, f"{err.instance!r} is not a plan",
                            "use 'auto' or a mapping {module pattern: colwise|rowwise|sequence_parallel|replicate}")]
    return [RecipeError(where, _message(err), _fix(err, path))]


# common spellings of enum values (string similarity would map "gpu" to "cpu")
ALIASES = {"gpu": "cuda", "nvidia": "cuda", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16",
           "float": "float32", "half": "float16", "true": "full", "yes": "full", "false": "none", "no": "none",
           "txt": "text", "json": "jsonl", "sharegpt": "chat", "messages": "chat", "instruct": "alpaca",
           "pretrain": "text", "pretraining": "text", "input_ids": "tokenized"}


def _message(err) -> str:
    """jsonschema's message with JSON spellings (true, null) instead of Python's (True, None)."""
    inst = json.dumps(err.instance) if not isinstance(err.instance, (dict, list)) else "the value"
    v, vv = err.validator, err.validator_value
    if v == "type":
        return f"{inst} is not of type {vv if isinstance(vv, str) else ' or '.join(vv)}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"{inst} is out of range: must be {op} {vv}"
    if v == "pattern":
        return f"{inst} has the wrong format"
    if v in ("anyOf", "oneOf"):
        return f"{inst} is not allowed"
    return err.message


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _pattern_hint(pattern: str) -> str:
    """Schema patterns end in `$(?!\\n)`: Python's `$` alone also matches before a final newline."""
    if "\\u0000" in pattern:
        return "no control characters: NUL, escape, carriage return, or (except in env_setup) newline"
    shown = pattern.removesuffix("(?!\\n)")
    return f"it must match {shown} (one line, ASCII)"


def _fix(err, path: list[Any]) -> str:
    """What to write instead: the key's description plus the rule it broke."""
    desc = _describe(path)
    v, vv = err.validator, err.validator_value
    rule = {"type": lambda: f"write {_a(vv if isinstance(vv, str) else ' or '.join(vv))}"
                            + (" (quote text like '24:00:00' or 'bf16' in YAML)" if vv == "string" else "")
                            + (" (no quotes, no units)" if vv in ("integer", "number") else ""),
            "minimum": lambda: f"use a value >= {vv}", "maximum": lambda: f"use a value <= {vv}",
            "exclusiveMinimum": lambda: f"use a value > {vv}", "exclusiveMaximum": lambda: f"use a value < {vv}",
            "pattern": lambda: _pattern_hint(vv), "minItems": lambda: f"give at least {vv} items",
            "maxItems": lambda: f"give at most {vv} items", "minLength": lambda: "it must not be empty",
            "uniqueItems": lambda: "remove the repeated item"}.get(v)
    parts = [p for p in (desc.rstrip(".") if desc else "", rule() if rule else "") if p]
    return "; ".join(parts) or "see runtime/recipe.schema.json"


def schema_errors(d: Mapping[str, Any]) -> list[RecipeError]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    out: list[RecipeError] = []
    for err in validator.iter_errors(d):
        # anyOf/oneOf wrap their sub-errors; report the most specific ones for tp.plan mappings
        if err.validator == "anyOf" and isinstance(err.instance, dict) and err.context:
            for sub in err.context:
                if sub.validator != "type" and sub.validator != "const":
                    out.extend(_schema_error(sub))
            continue
        out.extend(_schema_error(err))
    out.extend(_non_finite(d, []))
    uniq = {(e.path, e.message): e for e in out}
    return sorted(uniq.values(), key=lambda e: (e.path, e.message))


def _non_finite(value: Any, path: list[Any]) -> list[RecipeError]:
    """YAML's .nan / .inf pass every JSON Schema bound (nan < 0 and nan > 0 are both false) and
    would end up in plan.json, which JSON cannot even represent: refuse them wherever they are."""
    if isinstance(value, float) and not math.isfinite(value):
        return [RecipeError(json_path(path), f"{value} is not a finite number",
                            "write a finite number (YAML reads .nan and .inf as NaN and infinity)")]
    if isinstance(value, Mapping):
        return [e for k, v in value.items() for e in _non_finite(v, [*path, k])]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _non_finite(v, [*path, i])]
    return []


def _defaults(node: dict[str, Any], value: Any) -> Any:
    """Fill schema defaults, recursively, into a copy of value. Integer fields given as whole
    floats (`steps: 1e4`, which JSON Schema accepts as an integer) become ints."""
    types = node.get("type")
    if isinstance(value, float) and value.is_integer() and (types == "integer" or (
            isinstance(types, list) and "integer" in types)):
        return int(value)
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_defaults(node["items"], x) for x in value]
    if node.get("type") != "object" or not isinstance(value, dict):
        return value
    out = dict(value)
    for k, sub in node.get("properties", {}).items():
        if k in out:
            out[k] = _defaults(sub, out[k])
        elif "default" in sub:
            out[k] = sub["default"]
        elif sub.get("type") == "object":
            out[k] = _defaults(sub, {})
    return out


def _data_format(da: dict[str, Any]) -> str:
    """format, or the older `source` spelling, or text when only a path is given."""
    if da.get("format"):
        return da["format"]
    if da.get("source") in ("text", "jsonl"):
        return "text"
    return "text" if (da.get("path") or da.get("sources")) and da.get("source") != "synthetic" else "synthetic"


def _data_errors(da: dict[str, Any], train: dict[str, Any]) -> list[RecipeError]:
    errs = []
    fmt = _data_format(da)
    if da.get("format") and da.get("source"):
        errs.append(RecipeError("data.source", "given together with data.format",
                                "data.source is the older spelling of data.format; keep only format"))
    if da.get("path") and da.get("sources"):
        errs.append(RecipeError("data.path", "given together with data.sources",
                                "data.path is shorthand for one source; list it under data.sources instead"))
    if fmt != "synthetic":
        if not (da.get("path") or da.get("sources")):
            errs.append(RecipeError("data.path", f"required when data.format is {fmt!r}",
                                    "give a file/folder path (relative to where the job is launched) or "
                                    "data.sources, or use data.format: synthetic"))
        if not da.get("tokenizer") and fmt != "tokenized":
            errs.append(RecipeError("data.tokenizer", f"required when data.format is {fmt!r}",
                                    "give the model's Hugging Face tokenizer folder (relative to the launch directory)"))
    if fmt == "synthetic" and (da.get("eval_fraction") or da.get("eval_sources")):
        errs.append(RecipeError("data.eval_fraction", "synthetic data has no eval split",
                                "eval needs real data: set data.format and data.path"))
    if da.get("eval_fraction") and da.get("eval_sources"):
        errs.append(RecipeError("data.eval_fraction", "given together with data.eval_sources",
                                "hold out a fraction of the training data or give a separate eval set, not both"))
    for key in ("eval_every", "evals_per_epoch"):
        if train.get(key) and not (da.get("eval_fraction") or da.get("eval_sources")):
            errs.append(RecipeError(f"train.{key}", "there is no eval split to evaluate on",
                                    "set data.eval_fraction (e.g. 0.05) or data.eval_sources"))
    if da.get("train_on") != "assistant" and fmt not in ("chat", "completion", "alpaca"):
        errs.append(RecipeError("data.train_on", f"has no effect with data.format {fmt!r}",
                                "train_on chooses the trained tokens of chat / completion / alpaca records"))
    return errs


def _cross_field(d: dict[str, Any], aside: frozenset[str] = frozenset()) -> list[RecipeError]:
    """The rules the schema cannot say, over the defaults-filled dict. Each names the fields it
    reads (errors.reads) and is skipped when one of them was set aside."""
    checks = (_data_rules, _lr_floor, _requeue_signal, _resume_keyword, _cluster_env, _container_mounts,
              _wandb_key, _warmup, _inside_dirs, _steps_or_epochs, _epochs_need_windows)
    return [e for check in checks for e in run(check, aside, d)]


@reads("data", "train.eval_every", "train.evals_per_epoch")
def _data_rules(d: dict[str, Any]) -> list[RecipeError]:
    return _data_errors(d["data"], d["train"])


@reads("train.min_lr", "train.lr")
def _lr_floor(d: dict[str, Any]) -> list[RecipeError]:
    train = d["train"]
    if train["min_lr"] > train["lr"]:
        return [RecipeError("train.min_lr", f"{train['min_lr']} is above train.lr={train['lr']}",
                            "min_lr is the floor the schedule decays to; set it <= lr")]
    return []


@reads("tracking.wandb.project", "tracking.wandb.mode", "cluster.env_pass")
def _wandb_key(d: dict[str, Any]) -> list[RecipeError]:
    wb = d["tracking"]["wandb"]
    if wb["project"] and wb["mode"] == "online" and "WANDB_API_KEY" not in d["cluster"]["env_pass"]:
        return [RecipeError("tracking.wandb.mode", "online W&B needs WANDB_API_KEY, and cluster.env_pass does "
                            "not pass it to the job", "add WANDB_API_KEY to cluster.env_pass, or use mode: offline")]
    return []


@reads("train.warmup_steps", "train.warmup_ratio", "train.steps")
def _warmup(d: dict[str, Any]) -> list[RecipeError]:
    train = d["train"]
    if train.get("warmup_ratio") is not None and train["warmup_steps"]:
        return [RecipeError("train.warmup_ratio", f"given together with train.warmup_steps={train['warmup_steps']}",
                            "give one: warmup_ratio (a share of the run's steps) or warmup_steps (a count)")]
    # with train.epochs the step count is known only from the prepared data (the runtime resolves it)
    if train["steps"] is not None and train["warmup_steps"] > train["steps"]:
        return [RecipeError("train.warmup_steps", f"{train['warmup_steps']} exceeds train.steps={train['steps']}",
                            "warm up over a fraction of the run (e.g. 1-5%)")]
    return []


@reads("train.steps", "train.epochs")
def _steps_or_epochs(d: dict[str, Any]) -> list[RecipeError]:
    """One length of the run: steps (a count) or epochs (resolved from the prepared windows). Neither
    is 1000 steps, as before epochs existed (recipes without train.steps stay valid)."""
    train = d["train"]
    if train["steps"] is not None and train["epochs"] is not None:
        return [RecipeError("train.epochs", f"given together with train.steps={train['steps']}",
                            "give one: epochs (passes over the prepared data; steps follow from it) or steps "
                            "(a count); on the command line --set train.steps=null")]
    return []


@reads("train.epochs", "train.evals_per_epoch", "checkpoint.per_epoch", "data")
def _epochs_need_windows(d: dict[str, Any]) -> list[RecipeError]:
    """Epochs count passes over the prepared windows; synthetic data is an endless stream without any."""
    if _data_format(d["data"]) != "synthetic":
        return []
    fix = "use train.steps and checkpoint.every_steps, or real data (data.format and data.sources)"
    return [RecipeError(path, "synthetic data is an endless stream: it has no epochs", fix)
            for path, v in (("train.epochs", d["train"]["epochs"]),
                            ("checkpoint.per_epoch", d["checkpoint"]["per_epoch"])) if v]


def _escapes(path: str) -> bool:
    """Absolute, or out of its parent once '..' is resolved ('a/../../b', '..')."""
    norm = posixpath.normpath(path)
    return path.startswith("/") or norm == ".." or norm.startswith("../")


@reads("checkpoint.dir", "data.prepared_dir")
def _inside_dirs(d: dict[str, Any]) -> list[RecipeError]:
    """The folders the runtime deletes in stay inside their parent: checkpoint.keep prunes old
    steps under checkpoint.dir (an absolute or ../.. one could be another run's), and prepare
    replaces datasets under data.prepared_dir. run_dir, the parent, is the user's to place."""
    errs = []
    ck, prep = d["checkpoint"]["dir"], d["data"]["prepared_dir"]
    if _escapes(ck):
        errs.append(RecipeError("checkpoint.dir", f"{ck!r} is outside the run dir; checkpoint.keep deletes old "
                                "steps there, which could be another run's",
                                "give a folder inside the run dir, e.g. checkpoints (no leading / and no .. "
                                "out of it); to put the checkpoints elsewhere, move run_dir"))
    if _escapes(prep):
        errs.append(RecipeError("data.prepared_dir", f"{prep!r} is outside the launch directory; prepare "
                                "replaces datasets there", "give a folder relative to the launch directory, e.g. "
                                "prepared (no leading / and no .. out of it); launch from the filesystem that "
                                "should hold it"))
    return errs


def time_seconds(t: str) -> int:
    """Slurm time 'D-HH:MM:SS' or 'HH:MM:SS' (already schema-checked) -> seconds."""
    days, _, hms = t.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + sec


@reads("cluster.requeue", "cluster.signal_seconds", "cluster.time")
def _requeue_signal(d: dict[str, Any]) -> list[RecipeError]:
    c = d["cluster"]
    limit = time_seconds(str(c["time"]))
    if c["requeue"] and c["signal_seconds"] >= limit:
        return [RecipeError("cluster.signal_seconds", f"{c['signal_seconds']} s is not shorter than the time "
                            f"limit cluster.time={c['time']} ({limit} s): the USR1 would come at the start",
                            "give the save time the job needs (e.g. 120-600), less than cluster.time")]
    return []


@reads("checkpoint.resume")
def _resume_keyword(d: dict[str, Any]) -> list[RecipeError]:
    # resume is auto | never | a path; `Auto` would silently be read as a checkpoint path
    resume = d["checkpoint"]["resume"]
    if isinstance(resume, str) and resume.lower() in ("auto", "never") and resume not in ("auto", "never"):
        return [RecipeError("checkpoint.resume", f"{resume!r} is not a keyword (they are lower case) and "
                            "not meant as a path", f"did you mean {resume.lower()!r}?")]
    return []


# names the launcher and torch set, or that change how every later line of the job runs
_ENV_RESERVED = {"PATH", "PYTHONPATH", "LD_PRELOAD", "LD_AUDIT", "BASH_ENV", "ENV", "IFS", "PS4", "SHELLOPTS",
                 "BASHOPTS", "HOME", "USER", "SHELL", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "PYTHONSTARTUP", "PYTHONHOME"}
_ENV_RESERVED_PREFIX = ("MESHBAKE_", "SLURM_", "SBATCH_", "SRUN_", "TORCHELASTIC_", "BASH_FUNC_", "PMI_", "PMIX_")
# a secret's name: matched by whole '_' parts (TOKENIZERS_PARALLELISM is no token, MONKEY no key)
_SECRET = re.compile(r"PASSW|SECRET|CREDENTIAL|PASSPHRASE|(?:^|_)(?:TOKENS?|KEYS?|API_?KEY|ACCESS_KEY|PRIVATE_KEY)"
                     r"(?:_|$)")

# cluster.env is an allow-list. Its values are written into job.sbatch, which reviewers read as
# settings, not code: so it takes the tuning variables of the communication libraries and the
# frameworks, and nothing that loads code, redirects where the job's credentials are sent, or
# changes how the shell and python start (those go in cluster.env_setup, a line read as code).
_ENV_TUNING_PREFIX = (
    "NCCL_", "FI_", "UCX_", "GLOO_",            # collectives and their transports (EFA, InfiniBand, sockets)
    "TORCH_", "PYTORCH_", "TORCHINDUCTOR_",     # TORCH_NCCL_*, TORCH_DISTRIBUTED_DEBUG, PYTORCH_CUDA_ALLOC_CONF
    "TRITON_", "CUDA_", "CUBLAS_", "CUDNN_",    # CUDA_DEVICE_MAX_CONNECTIONS, CUBLAS_WORKSPACE_CONFIG
    "NVTE_",                                    # Transformer Engine switches, set by NVIDIA containers' users
    "OMP_", "MKL_")                             # CPU threads (OMP_NUM_THREADS)
# single names outside those prefixes: offline switches for a cluster without internet access
_ENV_TUNING_NAMES = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"}
# names that load code from where the value points (a shared library, plugin, executable or
# python module), under any prefix: LD_LIBRARY_PATH, GCONV_PATH, NCCL_NET_PLUGIN, FI_PROVIDER_PATH,
# TRITON_LIBCUDA_PATH, TRITON_PTXAS_PATH, OMP_TOOL_LIBRARIES, CUDA_INJECTION64_PATH
_ENV_CODE = re.compile(r"(?:^|_)(?:PLUGINS?|LIBRARY|LIBRARIES|LIBS?|PATHS?|PRELOAD|AUDIT|HOOKS?|EXTENSIONS?)(?:_|$)")
# and, within the allowed prefixes, folders and caches compiled kernels are loaded from
# (TORCH_EXTENSIONS_DIR, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, UCX_MODULE_DIR, TORCH_HOME),
# remote kernel caches, and python classes named in a value (TRITON_CACHE_MANAGER)
_ENV_CODE_TUNING = re.compile(r"(?:^|_)(?:DIRS?|HOME|SO|MANAGER|BACKEND|OVERRIDE|REMOTE)(?:_|$)")
_ENV_CODE_NAMES = {
    "NCCL_CONF_FILE",                    # reads further NCCL_* settings (NCCL_NET_PLUGIN) from a file
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",  # torch.load would unpickle (run) whatever a checkpoint holds
    "OMP_TOOL",                          # with OMP_TOOL_LIBRARIES: an OMPT tool library in every process
}
# PYTHONUSERBASE, PYTHONPYCACHEPREFIX, PYTHONBREAKPOINT, PYTHONWARNINGS import code from where they point
_ENV_PYTHON = "PYTHON"
# where the job connects: HF_ENDPOINT, WANDB_BASE_URL, HTTPS_PROXY, REQUESTS_CA_BUNDLE, SSL_CERT_FILE
_ENV_ENDPOINT = re.compile(r"(?:^|_)(?:URL|URI|ENDPOINT|HOST|PROXY|SERVER|CA_BUNDLE|CERT|CERTS)(?:_|$)")


def _env_refusal(name: str, env_pass: list[str]) -> tuple[str, str] | None:
    """(why, fix) when cluster.env may not set `name`, else None."""
    if name in _ENV_RESERVED or name.startswith(_ENV_RESERVED_PREFIX):
        return (f"{name} is set by the launcher, Slurm or the shell, not by a profile",
                "remove it; to change the python, use cluster.env_setup or MESHBAKE_PYTHON")
    if name in env_pass or _SECRET.search(name):
        return (f"{name} looks like a secret; cluster.env values are written into job.sbatch",
                "list the name in cluster.env_pass and export it in the job's environment (where you run sbatch)")
    allowed = name in _ENV_TUNING_NAMES or name.startswith(_ENV_TUNING_PREFIX)
    if name.startswith(_ENV_PYTHON):
        return (f"{name} changes how every python of the job starts, and variables of this kind load code "
                "(PYTHONUSERBASE, PYTHONPYCACHEPREFIX, PYTHONBREAKPOINT, PYTHONWARNINGS)",
                f"remove it; if your site really needs it, set it in cluster.env_setup (e.g. 'export {name}=...'), "
                "the line reviewers read as code")
    if name in _ENV_CODE_NAMES or _ENV_CODE.search(name) or (allowed and _ENV_CODE_TUNING.search(name)):
        return (f"{name} makes the job load code (a library, plugin, executable or compiled kernels) from "
                "where the value points, and job.sbatch reads as settings, not code",
                f"remove it; if your site really needs it, set it in cluster.env_setup (e.g. 'export {name}=...'), "
                "the line reviewers read as code")
    if _ENV_ENDPOINT.search(name):
        return (f"{name} redirects where the job connects, and with it where the credentials of "
                "cluster.env_pass (HF_TOKEN, WANDB_API_KEY) are sent",
                "remove it; a site that runs its own server sets it in the job's environment, not in a profile")
    if not allowed:
        return (f"{name} is not a tuning variable: cluster.env takes names starting with "
                f"{', '.join(_ENV_TUNING_PREFIX)} or one of {', '.join(sorted(_ENV_TUNING_NAMES))}",
                "set anything else in cluster.env_setup (e.g. 'export NAME=value'), or remove it")
    return None


# `NAME=value` / `export NAME=value` in a shell line; the value up to the next blank or ;&|)
_ASSIGN = re.compile(r"(?:^|[\s;&|(`])(?:export\s+|declare\s+-x\s+|readonly\s+)?[\"']?([A-Za-z_][A-Za-z0-9_]*)="
                     r"(\S*)")
_EXPANSION = re.compile(r"\$[({A-Za-z_]")     # $(cat FILE), ${VAR}, $VAR; not $'literal'



def _setup_secrets(line: str) -> list[str]:
    """Secret-named variables env_setup assigns a literal to. `HF_TOKEN=$(cat ~/.hf_token)` or
    `HF_TOKEN="$SITE_TOKEN"` write no secret (the value comes at run time) and pass."""
    out = []
    for m in _ASSIGN.finditer(line):
        name, value = m.group(1), m.group(2).lstrip("\"'")
        if _SECRET.search(name.upper()) and value and not _EXPANSION.match(value):
            out.append(name)
    return out


@reads("cluster.env", "cluster.env_pass", "cluster.env_setup")
def _cluster_env(d: dict[str, Any]) -> list[RecipeError]:
    """cluster.env holds site settings written into job.sbatch: tuning variables only (the
    allow-list above), never a secret, never a name the launcher, Slurm or torch owns.
    cluster.env_setup is the user's own shell line, but a secret written into it would still
    be committed with launch.sh and recipe.yaml."""
    errs, c = [], d["cluster"]
    for name in c["env"]:
        bad = _env_refusal(name, c["env_pass"])
        if bad:
            errs.append(RecipeError(f"cluster.env.{name}", *bad))
    for name in _setup_secrets(c["env_setup"] or ""):
        errs.append(RecipeError("cluster.env_setup", f"sets {name} to a value written in the recipe; launch.sh "
                                "and recipe.yaml, which get committed, would hold the secret",
                                f"list {name} in cluster.env_pass and export it in the job's environment"))
    return errs


# secrets by their shape, wherever they are in the recipe or its cluster profile: the known
# prefixes of HF, GitHub, OpenAI-style, AWS and Slack tokens and PEM private keys. A bare 40-hex
# string is a W&B key only under a secret- or wandb-named key (elsewhere it is a commit id or a
# sha1, e.g. a model revision)
_TOKEN_SHAPES = (
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])")),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("an API key (sk-...)", re.compile(r"(?<![A-Za-z0-9-])sk-(?:[A-Za-z0-9]+-)?[A-Za-z0-9_-]{20,}")),
    ("an AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])")),
    ("a Slack token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}")),
    ("a private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")),
)
_HEX40 = re.compile(r"(?<![0-9A-Fa-f])[0-9a-f]{40}(?![0-9A-Fa-f])")
# `WANDB_API_KEY=<hex>`, `api_key: <hex>`, `wandb login --relogin <hex>`
_WANDB_ASSIGN = re.compile(r"(?i)(?<![a-z0-9])(?:wandb|api)[a-z0-9_]*(?:['\"]?\s*[=:]\s*['\"]?|\s+login\s+(?:--\S+\s+)*)"
                           r"[0-9a-f]{40}(?![0-9a-f])")


def _random(s: str) -> bool:
    """A random token mixes cases and digits; a long name like sk-learn-baseline-experiments does not."""
    return any(c.isdigit() for c in s) and any(c.isupper() for c in s) and any(c.islower() for c in s)


def _token_kind(text: str, key: str) -> str | None:
    for kind, pattern in _TOKEN_SHAPES:
        m = pattern.search(text)
        if m and (kind in ("a private key", "an AWS access key id") or _random(m.group(0))):
            return kind
    wandbish = _SECRET.search(key.upper()) or "WANDB" in key.upper()     # not data.tokenizer (a snapshot path)
    if (wandbish and _HEX40.search(text)) or _WANDB_ASSIGN.search(text):
        return "a W&B API key (40 hex digits after a key-like name)"
    return None


def secret_values(value: Any, path: tuple[Any, ...] = ()) -> list[RecipeError]:
    """Every token-shaped string in the recipe (keys too), at its JSON path. recipe.yaml,
    launch.sh and job.sbatch are committed: a secret is passed by name (cluster.env_pass)."""
    out: list[RecipeError] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            kind = _token_kind(str(k), "")
            if kind:        # reported at the mapping (a path with the key in it would print the secret)
                out.append(_secret_error(json_path(path), f"{kind} as a key name"))
            out += secret_values(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += secret_values(v, (*path, i))
    elif isinstance(value, str):
        key = next((str(p) for p in reversed(path) if not isinstance(p, int)), "")
        kind = _token_kind(value, key)
        if kind:
            out.append(_secret_error(json_path(path), kind))
    return out


def _secret_error(where: str, kind: str) -> RecipeError:
    return RecipeError(where, f"holds what looks like {kind}; recipe.yaml, launch.sh and job.sbatch are "
                       "committed, so the secret would be too",
                       "remove it: list the name in cluster.env_pass and export it in the job's environment "
                       "(where you run sbatch)")


@reads("cluster.container_mounts", "cluster.container_image")
def _container_mounts(d: dict[str, Any]) -> list[RecipeError]:
    c = d["cluster"]
    if c["container_mounts"] and not c["container_image"]:
        return [RecipeError("cluster.container_mounts", "container mounts without cluster.container_image",
                            "set cluster.container_image, or remove the mounts")]
    return []


def _normalize(d: dict[str, Any]) -> dict[str, Any]:
    """The few values the schema cannot say (defaults already filled in), in the Recipe's shape."""
    d = {**d, "model": dict(d["model"]), "tp": dict(d["tp"]), "cluster": dict(d["cluster"])}
    if d["model"]["weights"] == "none":
        d["model"]["weights"] = None
    if d["tp"]["plan"] != "auto":
        d["tp"]["plan"] = dict(sorted(d["tp"]["plan"].items()))
    # environment values are strings (NCCL_IB_TIMEOUT: 22 is written '22')
    d["cluster"]["env"] = {k: str(v) for k, v in sorted(d["cluster"]["env"].items())}
    d["data"] = _data_normal(d["data"])
    d["train"] = _train_normal(d["train"])
    d["run_dir"] = d.get("run_dir") or f"runs/{d['name']}"
    return d


def _train_normal(train: dict[str, Any]) -> dict[str, Any]:
    """The run's length and warmup in steps where they are known at compile time: neither steps nor
    epochs -> 1000 steps; with steps, warmup_ratio -> warmup_steps = round(ratio x steps) (ratio
    null), the count the runtime's schedule (runtime/train.py lr_factor) and the plan use. With
    epochs the ratio stays: the runtime resolves both once it knows the windows (runtime/plan.py
    resolve_steps)."""
    out = dict(train)
    if out["steps"] is None and out["epochs"] is None:
        out["steps"] = 1000
    if out["steps"] is not None and out.get("warmup_ratio") is not None:
        out["warmup_steps"], out["warmup_ratio"] = round(out["warmup_ratio"] * out["steps"]), None
    return out


def _data_normal(da: dict[str, Any]) -> dict[str, Any]:
    """The input-only keys (schema "x-normalized-into": path, source, text_field) rewritten into
    the fields they stand for; format and overlong resolved."""
    fmt = _data_format(da)
    out = {k: v for k, v in da.items() if is_field(schema()["properties"]["data"]["properties"][k])}
    if da.get("text_field"):
        out["fields"] = {**da["fields"], "text": da["text_field"]}
    if da.get("path"):
        out["sources"] = [{"path": da["path"], "weight": 1.0}]
    out["format"] = fmt
    if da["overlong"] == "auto":
        out["overlong"] = "split" if fmt in ("text", "tokenized") else "truncate"
    out["roles"] = dict(sorted(da["roles"].items()))
    return out


@dataclass(frozen=True)
class Validated:
    """The validate stage's whole answer. A field with an error is set aside: an invalid value is
    replaced by its schema default (a stand-in where it has none), so the Recipe is still built and
    the later stages run and report the other fields' errors; every check that reads a set-aside
    field is skipped (errors.reads), so a stand-in causes no follow-on error. Unknown keys are
    dropped (nothing reads them)."""
    recipe: Recipe | None                  # None: nothing to carry on with (e.g. the input is no mapping)
    errors: tuple[RecipeError, ...]
    aside: frozenset[str] = frozenset()    # fields: "train.seq_len", "tp.plan", a whole section "train"


def validate_fields(d: Mapping[str, Any]) -> Validated:
    """Every error of the schema and of the cross-field rules, and the Recipe to carry on with."""
    errs = schema_errors(d)
    repaired = _set_aside(d, errs)
    if repaired is None:
        return Validated(None, tuple(errs))
    full, aside = repaired
    cross = _cross_field(full, aside) + secret_values(d)
    # a field a rule refused keeps its value, but the checks after validate do not read it either
    aside |= {f for f in (_field(e.path) for e in cross) if f}
    return Validated(build(Recipe, _normalize(full)), tuple(errs + cross), frozenset(aside))


def validate(d: Mapping[str, Any]) -> Result[Recipe]:
    """The Recipe when there is no error at all."""
    v = validate_fields(d)
    return v.recipe if v.recipe is not None and not v.errors else Err(v.errors)


UNKNOWN = "unknown key"


def validate_all(d: Mapping[str, Any]) -> tuple[Recipe | None, tuple[RecipeError, ...]]:
    """validate_fields as (recipe or None, every error): the recipe when the only errors are
    unknown keys (typos, keys in the wrong section), which are dropped; None otherwise."""
    v = validate_fields(d)
    ok = v.recipe is not None and all(e.message == UNKNOWN for e in v.errors)
    return (v.recipe if ok else None), v.errors


def _field(path: str) -> str:
    """The recipe field an error is in: the longest run of schema properties its JSON path starts
    with. 'train.betas[1]' -> 'train.betas', "tp.plan['x.*']" -> 'tp.plan', 'cluster.env.X' ->
    'cluster.env', 'mesh.typo' -> 'mesh', '$' -> '' (property names are identifiers: no . or [)."""
    node, out = schema(), []
    for part in path.split("[", 1)[0].split("."):
        props = node.get("properties", {})
        if part not in props:
            break
        out.append(part)
        node = props[part]
    return ".".join(out)


def _parts(field: str) -> list[str]:
    return field.split(".") if field else []


def _unknown_key(d: Mapping[str, Any], field: str, path: str) -> Any:
    """The key of d that `path` names when it is a key of the section `field` that the schema
    does not have (an unknown key, or a value under one); None otherwise."""
    parts, node = _parts(field), d
    if "properties" not in _section_schema(parts):
        return None
    for p in parts:
        node = node.get(p) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping):
        return None
    return next((k for k in node if json_path([*parts, k]) == path), None)


def _without(d: Any, parts: list[Any]) -> Any:
    """A copy of d without the key at parts (copies only the dicts along the way)."""
    if not isinstance(d, Mapping) or parts[0] not in d:
        return d
    if len(parts) == 1:
        return {k: v for k, v in d.items() if k != parts[0]}
    return {**d, parts[0]: _without(d[parts[0]], parts[1:])}


def _with(d: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    if len(parts) == 1:
        return {**d, parts[0]: value}
    return {**d, parts[0]: _with(d.get(parts[0], {}), parts[1:], value)}


# stand-ins for a set-aside field the schema gives no default (name, model.config, global_batch_size):
# valid, so the Recipe can be built; never read, because the checks that read the field are skipped
_STAND_IN = {"string": "unset", "integer": 1, "number": 1.0, "boolean": False, "object": {}}


def _gpu_facts(d: dict[str, Any]) -> dict[str, Any]:
    """cluster.gpu names a catalog GPU (compiler/perf.py GPUS): its datasheet facts go under the
    cluster keys the recipe or its profile leave unset (they win), before the schema defaults
    (H100 SXM) fill the rest."""
    from meshbake.compiler.perf import GPUS

    c = d.get("cluster")
    g = GPUS.get(c.get("gpu")) if isinstance(c, dict) and isinstance(c.get("gpu"), str) else None
    if g is None:
        return d
    facts = {"peak_tflops": g.peak_tflops, "hbm_gbps": g.hbm_gbps, "intra_node_gbps": g.intra_node_gbps,
             "inter_node_gbps": g.inter_node_gbps, "nics_per_node": g.nics_per_node, "gpu_memory_gb": g.memory_gb}
    return {**d, "cluster": {**facts, **c}}


def _set_aside(d: Mapping[str, Any], errs: list[RecipeError]) -> tuple[dict[str, Any], set[str]] | None:
    """d with unknown keys dropped and every field with an error taken out, defaults filled in
    (a stand-in for a required field without one) -> (defaults-filled dict, fields set aside);
    None when that does not give a valid recipe."""
    if not isinstance(d, Mapping):
        return None
    out, aside = dict(d), set()
    for e in errs:
        field = _field(e.path)
        key = _unknown_key(d, field, e.path)
        if key is not None:
            out = _without(out, [*_parts(field), key])
        elif field:
            aside.add(field)
            out = _without(out, _parts(field))
        else:
            return None
    for _ in range(3):                         # a stand-in section {} can lack a required key in turn
        left = schema_errors(out) if errs else []
        if not left:
            return _defaults(schema(), _gpu_facts(out)), aside
        for e in left:
            field = _field(e.path)
            node = _section_schema(_parts(field))
            if e.message != "required key is missing" or not field or node.get("type") not in _STAND_IN:
                return None
            out = _with(out, _parts(field), _STAND_IN[node["type"]])
            aside.add(field)
    return None


def format_errors(errors: Iterable[RecipeError]) -> str:
    lines = []
    for e in errors:
        lines.append(f"  {e.path}: {e.message}")
        if e.hint:
            lines.append(f"      fix: {e.hint}")
    return "\n".join(lines)
