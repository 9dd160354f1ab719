"""`meshbake pull RECIPE`: every Hugging Face Hub file the recipe's run reads, at its pinned commit,
into the cache (HF_HUB_CACHE / HF_HOME) that the cluster's shared filesystem holds, so compute
nodes run with HF_HUB_OFFLINE=1 (launch.sh sets it for a plan with Hub ids; compute nodes often
have no internet).

What is fetched, per recipe key (the same pins check and bundle write: compiler/hub.py):
  model.config     config.json (+ tokenizer.json, tokenizer_config.json: what check reads with it)
  model.weights    config.json, *.safetensors, model.safetensors.index.json (no .bin, no .gguf)
  data.tokenizer   the tokenizer files (runtime/hub.TOKENIZER_FILES)
  data sources     the dataset repo's data files runtime/prepare.py reads (runtime/hub.DATASET_FILES)
One snapshot_download per repo and commit with those allow_patterns: huggingface_hub shows the
progress, skips the files already in the cache (a second pull downloads nothing; a pull stopped
half-way fetches only the files it had not finished) and, on a connection that drops mid-file,
resumes that file with an HTTP Range request. Then every file is listed with its size, and the
snapshot is checked the way preflight checks it on the compute node (runtime/hub.snapshot_problems).

Exit 0: everything the run reads is in the cache. 2: a one-line reason per problem (the Hub not
reachable, a gated repo: set HF_TOKEN, a file missing after the download); never a traceback.
HF_TOKEN is read by huggingface_hub from the environment; it is never printed or written.
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path

from meshbake.compiler.errors import Err
from meshbake.runtime import hub as H
from meshbake.runtime.safeio import printable
from meshbake.runtime.units import fmt_bytes


@dataclass(frozen=True)
class Want:
    """One repo at one commit and what the run reads of it."""
    repo: str
    sha: str
    repo_type: str
    keys: tuple[str, ...]             # the recipe keys that name it
    patterns: tuple[str, ...]
    kinds: tuple[str, ...]            # runtime/hub.snapshot_problems kinds

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.sha}"


# each key's patterns cover what every reader of that snapshot asks for (offline, huggingface_hub
# refuses a cached snapshot that lacks a file the reader's allow_patterns match): compiler/hub.py
# reads config.json + tokenizer.json/tokenizer_config.json of model.config, config.json of
# model.weights and .gitattributes of a dataset (to pin them); the runtime the rest
_WHAT = {"model.config": (H.CONFIG_FILES + H.TOKENIZER_FILES[:2], "config"),
         "model.weights": (H.CONFIG_FILES + H.WEIGHT_FILES, "weights"),
         "data.tokenizer": (H.TOKENIZER_FILES, "tokenizer")}
_DATASET = (H.DATASET_FILES + (".gitattributes",), "dataset")


def wants(pinned) -> list[Want]:
    """The pins of a compiler/hub.Pinned grouped by repo and commit (Qwen/Qwen3-8B as config,
    weights and tokenizer is one download)."""
    groups: dict[tuple[str, str, str], dict] = {}
    for p in pinned.pins:
        pats, kind = _WHAT.get(p.path, _DATASET)
        g = groups.setdefault((p.repo_type, p.repo, p.sha), {"keys": [], "patterns": [], "kinds": []})
        g["keys"].append(p.path)
        g["patterns"] += [x for x in pats if x not in g["patterns"]]
        g["kinds"] += [kind] if kind not in g["kinds"] else []
    return [Want(repo, sha, rt, tuple(g["keys"]), tuple(g["patterns"]), tuple(g["kinds"]))
            for (rt, repo, sha), g in groups.items()]


def unpinned(recipe, pinned) -> list[str]:
    """Hub ids of the recipe that could not be pinned: why, one line each (compiler/hub.py said it)."""
    said = {e.path: f"{e.path}: {e.message}; {e.hint}" for e in pinned.errors}
    said.update({m.split(":", 1)[0]: m for m in pinned.missing if m.split(":", 1)[0] not in said})
    m, d = recipe.model, recipe.data
    refs = [("model.config", m.config), ("model.weights", m.weights)]
    if d.format != "synthetic":
        refs += [("data.tokenizer", d.tokenizer)]
        refs += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(d.sources)]
        refs += [(f"data.eval_sources[{i}].path", s.path) for i, s in enumerate(d.eval_sources)]
    out, seen = [], set()
    for key, ref in refs:
        h = H.hub_ref(ref) if ref not in (None, "random") else None
        if h is None or pinned.pin(key) is not None or h.text in seen:
            continue                  # one line per Hub id (model.weights is often model.config's repo)
        seen.add(h.text)
        if key == "model.config" and key not in said:
            from meshbake.compiler.hub import read_config

            _, _, e = read_config(ref)              # pin_recipe leaves its error to the model stage
            said[key] = f"{key}: {e.message}; {e.hint}" if e is not None else ""
        out.append(said.get(key) or f"{key}: {ref} could not be resolved on the Hub or in the Hugging Face cache")
    return out


def _files(folder: Path, patterns: tuple[str, ...]) -> dict[str, int]:
    """{path in the repo: bytes} of the snapshot's files the patterns match (fnmatch on the repo
    path, as huggingface_hub's allow_patterns)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in patterns):
            out[rel] = p.stat().st_size
    return out


def fetch(w: Want) -> tuple[dict[str, int], set[str], list[str]]:
    """({file: bytes}, the files this call downloaded, problems) for one repo at its commit."""
    ref = H.HubRef(w.repo, w.sha)
    before = H.cached_snapshot(ref, w.repo_type)
    had = set(_files(before, w.patterns)) if before is not None else set()
    try:
        folder = H.snapshot(ref, w.repo_type, w.patterns)
    except H.HubMiss as e:
        return {}, set(), [f"{', '.join(w.keys)}: {e}"]
    except Exception as e:      # noqa: BLE001 a network error mid-file (httpx), a full disk: one line, no traceback
        first = (str(e).splitlines() or [""])[0][:200]
        return {}, set(), [f"{', '.join(w.keys)}: {w.ref}: download failed ({type(e).__name__}: {first}); "
                           "run meshbake pull again (finished files are kept)"]
    files = _files(folder, w.patterns)
    bad = [f"{', '.join(w.keys)}: {w.ref}: {what} is missing after the download; run meshbake pull again"
           for kind in w.kinds for what in H.snapshot_problems(folder, kind)]
    return files, set(files) - had, list(dict.fromkeys(bad))


def pull_main(args) -> int:
    from meshbake.compiler import load
    from meshbake.compiler.cli import _report
    from meshbake.compiler.pipeline import _validated_pinned

    d = load.load_recipe(args.recipe, tuple(args.overrides), args.cluster)
    vp = d if isinstance(d, Err) else _validated_pinned(d)
    if isinstance(vp, Err):
        return _report(vp, args.recipe)
    v, pinned = vp
    if v.errors:
        return _report(Err(v.errors), args.recipe)
    problems = unpinned(pinned.recipe, pinned)
    if not pinned.pins and not problems:
        print("the recipe names no Hugging Face Hub ids: nothing to pull")
        return 0
    total = got = n = 0
    for w in wants(pinned):
        files, new, bad = fetch(w)
        problems += bad
        for f, size in files.items():
            print(f"  {printable(w.repo)}@{w.sha[:12]}  {printable(f)}  {fmt_bytes(size)}"
                  f"{'  downloaded' if f in new else ''}")
            total, n = total + size, n + 1
            got += size if f in new else 0
    print(f"{n} file{'s' if n != 1 else ''}, {fmt_bytes(total)} ({fmt_bytes(got)} downloaded now) in "
          f"HF_HUB_CACHE={printable(H.cache_dir())}")
    for p in problems:
        print(f"meshbake pull: {printable(p)}", file=sys.stderr)
    return 2 if problems else 0
