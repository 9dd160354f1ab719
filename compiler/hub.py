"""hub stage: every Hugging Face Hub reference of a recipe pinned to its commit sha.

model.config, model.weights, data.tokenizer and data sources accept `org/name` or
`org/name@rev` (rev: a branch, a tag or a commit). A path that exists here wins over a Hub id
of the same spelling. Each Hub reference is resolved through huggingface_hub, the local cache
first (HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE respected), the Hub when reachable, to the
commit it names now, and the recipe carries `org/name@<sha>` from here on: recipe.yaml,
plan.json and PLAN.md show the sha, the runtime loads exactly that revision, and the bundle's
recipe.yaml compiles to the same bundle a month later (`meshbake verify`).

model.config must be readable now (its config.json is the model stage's input). The other
references are read by the runtime (relative to the launch directory when they are paths), so
an id found neither here nor in the cache is not an error at compile time unless it can only be
a Hub id (an @revision, or the repo model.config names): `meshbake check` lists it as what is
missing before the run can start.

A gated repo uses HF_TOKEN from the environment (huggingface_hub reads it); no token is ever
passed, recorded or printed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from meshbake.compiler.errors import RecipeError
from meshbake.compiler.recipe import Recipe
from meshbake.runtime import hub as H


@dataclass(frozen=True)
class Pin:
    path: str             # the recipe path: "model.config", "data.sources[0].path"
    repo: str             # "Qwen/Qwen3-8B"
    revision: str         # as the recipe said it ("main" when it said none)
    sha: str              # the commit
    repo_type: str        # "model" | "dataset"
    folder: str           # the local snapshot folder (never recorded: a machine's path)

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.sha}"


@dataclass(frozen=True)
class Pinned:
    recipe: Recipe                           # every Hub reference as org/name@<sha>
    pins: tuple[Pin, ...] = ()
    errors: tuple[RecipeError, ...] = ()
    missing: tuple[str, ...] = ()            # "data.tokenizer: 'x/y' is neither ..." (check's last line)

    def pin(self, path: str) -> Pin | None:
        return next((p for p in self.pins if p.path == path), None)


def _has(folder: str | Path, names: tuple[str, ...]) -> bool:
    return any((Path(folder) / n).is_file() for n in names)


_TOKENIZER_CORE = ("tokenizer.json", "vocab.json", "tokenizer.model")


def read_config(ref: str) -> tuple[Pin | None, Path | None, RecipeError | None]:
    """(pin, config.json path, error) of a Hub model id; (None, None, None) when ref is no Hub id."""
    h = H.hub_ref(ref)
    if h is None:
        return None, None, None
    try:
        folder = H.snapshot(h, "model", H.CONFIG_FILES + H.TOKENIZER_FILES[:2])
    except H.HubMiss as e:
        return None, None, RecipeError("model.config", e.message, e.hint)
    pin = Pin("model.config", h.repo, h.revision or "main", folder.name, "model", str(folder))
    cfg = folder / "config.json"
    if not cfg.is_file():
        return pin, None, RecipeError("model.config", f"{h.text} (commit {folder.name[:12]}) has no config.json in "
                                      "the Hugging Face cache", f"run {H.download_hint(h, H.CONFIG_FILES)}")
    return pin, cfg, None


def pin_recipe(recipe: Recipe) -> Pinned:
    """The recipe with its Hub references pinned (model.config is pinned by read_config when the
    model stage reads it; it is pinned here too so that every reference goes one way)."""
    pins: list[Pin] = []
    errs: list[RecipeError] = []
    missing: list[str] = []
    model, data = recipe.model, recipe.data

    cfg_pin = None
    if H.hub_ref(model.config) is not None:
        cfg_pin, _, _ = read_config(model.config)      # its errors: the model stage's (load.read_model_config)
        if cfg_pin is not None:
            pins.append(cfg_pin)
            model = replace(model, config=cfg_pin.ref)
    cfg_repo = cfg_pin.repo if cfg_pin else (H.parse(model.config).repo if H.hub_ref(model.config) else None)

    def one(path: str, value: str | None, repo_type: str, files: tuple[str, ...],
            need: tuple[str, ...]) -> str | None:
        """value pinned (or as it was); need: files one of which the snapshot must hold to be usable."""
        h = H.hub_ref(value)
        if h is None:
            return value
        if cfg_pin is None and repo_type == "model" and h.repo == cfg_repo:
            return value             # model.config's own error says it (once)
        sure = bool(h.revision) or (repo_type == "model" and h.repo == cfg_repo)
        if cfg_pin is not None and h.repo == cfg_pin.repo and (h.revision or "main") == cfg_pin.revision:
            folder: Path | None = Path(cfg_pin.folder)
        else:
            try:
                folder = H.snapshot(h, repo_type, files)
            except H.HubMiss as e:
                if sure:
                    errs.append(RecipeError(path, e.message, e.hint))
                else:
                    fetch = tuple(f for f in files if '*' not in f and f not in _PROBES)
                    missing.append(f"{path}: {value!r} is neither a path here nor in the Hugging Face cache "
                                   f"(HF_HUB_CACHE={H.cache_dir()}); the launch directory must hold it, or run "
                                   f"{H.download_hint(h, fetch, repo_type)}")
                return value
        pin = Pin(path, h.repo, h.revision or "main", folder.name, repo_type, str(folder))
        pins.append(pin)
        if need and not _has(folder, need):
            what = ", ".join(need)
            missing.append(f"{path}: {pin.ref} has none of {what} in the Hugging Face cache (yet); the runtime "
                           f"downloads them when the Hub is reachable, or run {H.download_hint(h, files, repo_type)}")
        return pin.ref

    weights = model.weights
    if weights not in (None, "random"):
        weights = one("model.weights", weights, "model", H.CONFIG_FILES, ())
        if weights != model.weights or H.hub_ref(weights) is not None:
            pin = next((p for p in pins if p.path == "model.weights"), None)
            if pin is not None and not any(Path(pin.folder).glob("*.safetensors")):
                missing.append(f"model.weights: {pin.ref} has no *.safetensors in the Hugging Face cache; the "
                               f"runtime downloads them when the Hub is reachable (HF_HUB_OFFLINE unset), or run "
                               f"`hf download {pin.repo} --revision {pin.sha}`")
        model = replace(model, weights=weights)
    tok = data.tokenizer
    if tok is not None and data.format != "synthetic":
        tok = one("data.tokenizer", tok, "model", H.TOKENIZER_FILES, ())
        pin = next((p for p in pins if p.path == "data.tokenizer"), None)
        if pin is not None and not _has(pin.folder, _TOKENIZER_CORE):
            missing.append(f"data.tokenizer: {pin.ref} has no tokenizer files in the Hugging Face cache (tokenizer.json, "
                           "vocab.json or tokenizer.model), so check could not read it; the runtime downloads them when "
                           f"the Hub is reachable, or run "
                           f"{H.download_hint(H.HubRef(pin.repo, pin.revision), H.TOKENIZER_FILES[:2])}")

    def sources(key: str, srcs):
        out = []
        for i, s in enumerate(srcs):
            path = f"{key}[{i}].path"
            out.append(replace(s, path=one(path, s.path, "dataset", (".gitattributes",), ())))
        return tuple(out)

    if data.format != "synthetic":
        data = replace(data, tokenizer=tok, sources=sources("data.sources", data.sources),
                       eval_sources=sources("data.eval_sources", data.eval_sources))
    return Pinned(replace(recipe, model=model, data=data), tuple(pins), tuple(errs), tuple(missing))


# files looked up only to find a snapshot: never what a download hint should fetch (a dataset's
# .gitattributes alone is useless; `hf download REPO --repo-type dataset` fetches the data)
_PROBES = (".gitattributes",)


def tokenizer_folder(recipe_tokenizer: str | None, pinned: Pinned) -> str | None:
    """The folder the compile-time tokenizer checks read: the pinned snapshot or the path itself."""
    pin = pinned.pin("data.tokenizer")
    return pin.folder if pin is not None else recipe_tokenizer


def chat_template_error(folder: str | None, name: str | None = None) -> RecipeError | None:
    """format chat renders every record through the tokenizer's chat template (prepare would
    refuse it on the cluster): its absence is an error now, when the folder is here."""
    if not folder or not Path(folder).is_dir():
        return None
    p = Path(folder)
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return None
    cfg = p / "tokenizer_config.json"
    try:
        tc = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() and cfg.stat().st_size < 50_000_000 else {}
    except (OSError, ValueError, RecursionError):
        return None                      # the runtime names what is wrong with the file
    if isinstance(tc, dict) and tc.get("chat_template"):
        return None
    if not (p / "tokenizer.json").is_file() and not (p / "vocab.json").is_file():
        return None                      # not a tokenizer folder (yet): prepare says so
    return RecipeError("data.tokenizer", f"{name or folder} has no chat template (tokenizer_config.json "
                       "chat_template or chat_template.jinja), which data.format chat needs",
                       "use the model's instruct/chat tokenizer, or format alpaca / completion")


def random_weights_error(recipe: Recipe) -> RecipeError | None:
    """LoRA or fine-tuning on random weights trains adapters / an instruction format on noise:
    an error unless the recipe says model.weights: random. Synthetic data (smoke tests, no
    tokenizer) and pretraining text stay valid on random init."""
    m, d = recipe.model, recipe.data
    if m.weights is not None or d.format == "synthetic":
        return None
    lora = bool(recipe.lora.rank)
    tune = d.format in ("completion", "alpaca", "chat")
    if not (lora or tune):
        return None
    what = "LoRA" + (f" on data.format {d.format}" if tune else "") if lora else f"fine-tuning (data.format {d.format})"
    return RecipeError("model.weights", f"{what} on random weights: model.weights is not set, so the run would "
                       "start from random init (and say 'random init' only in PLAN.md)",
                       "set model.weights to the base model (a folder of *.safetensors or a Hub id such as "
                       f"{m.config.split('@')[0] if H.parse(m.config) else 'Qwen/Qwen3-8B'}), or write "
                       "`model.weights: random` to train from scratch on purpose")
