"""Hugging Face Hub references: `org/name` or `org/name@revision` (a branch, a tag or a commit).

The compiler (compiler/hub.py) pins every Hub reference of a recipe to its commit sha
(`org/name@<sha>` in recipe.yaml and plan.json); the runtime reads exactly that revision from the
local cache (HF_HUB_CACHE / HF_HOME honoured), or from the Hub when it is reachable and
HF_HUB_OFFLINE is not set. A gated repo uses HF_TOKEN from the environment (huggingface_hub reads
it itself); no token is passed, stored or logged here.

A path that exists wins over a Hub id of the same spelling (`models/Llama-3.1-8B` on disk is that
folder). stdlib + huggingface_hub only (it comes with transformers): the runtime never imports
the compiler.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .safeio import plain_name, printable, read_bounded

# a repo id is `org/name` (letters, digits, - _ .); a revision is a branch, tag or commit
# (`refs/pr/1` has slashes)
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})"
                 r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9_./-]{0,254}))?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
# names that are files, not repos (a data file `data/train.jsonl` that is not here yet)
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".md", ".yaml", ".yml", ".safetensors",
                  ".bin", ".model", ".arrow", ".gz", ".zst")

CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
INDEX = "model.safetensors.index.json"
WEIGHT_FILES = ("*.safetensors", INDEX)
# DeepSeek-V3's index (163 shards, ~91k tensors) is ~9 MB: 64 MB is no real index, and a bigger
# file is not held in memory to find that out
_INDEX_LIMIT = 64 << 20
# a dataset repo's files runtime/prepare.py can read (prepare.FILE_KINDS, save_to_disk's .arrow
# + its json, the card whose `configs:` names the data files): what `meshbake pull` fetches
DATASET_FILES = ("*.jsonl", "*.ndjson", "*.json", "*.parquet", "*.csv", "*.tsv", "*.txt", "*.md", "*.text",
                 "*.arrow")


class HubMiss(Exception):
    """Why a Hub reference cannot be had here, and what to do (str: both on one line; the caller
    puts the recipe path in front)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(f"{message}; {hint}" if hint else message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class HubRef:
    repo: str                     # "Qwen/Qwen3-8B"
    revision: str | None          # "main", "v1.0", a commit sha; None = main

    @property
    def text(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")

    @property
    def pinned(self) -> bool:
        return bool(self.revision and _SHA.match(self.revision))


def parse(ref: str | None) -> HubRef | None:
    """The Hub reference `ref` spells, or None (a local path, a catalog name, a file name)."""
    if not isinstance(ref, str):
        return None
    m = _ID.match(ref)
    if not m or m["repo"].lower().endswith(_FILE_SUFFIXES) or ".." in m["repo"]:
        return None
    return HubRef(m["repo"], m["rev"])


def hub_ref(ref: str | None) -> HubRef | None:
    """parse(ref) when no local path of that spelling exists (a local path wins)."""
    if not isinstance(ref, str) or Path(ref).exists():
        return None
    return parse(ref)


def _true(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now (huggingface_hub reads it at import)."""
    return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
    """huggingface_hub's cache folder, read now: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub."""
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(k):
            return os.path.expandvars(os.path.expanduser(os.environ[k]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")


def download_hint(ref: HubRef, files: tuple[str, ...], repo_type: str = "model") -> str:
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    rev = f" --revision {ref.revision}" if ref.revision else ""
    names = " ".join(f for f in files if "*" not in f)
    return f"`hf download {ref.repo}{kind}{rev}{' ' + names if names else ''}`"


def snapshot(ref: HubRef, repo_type: str = "model", files: tuple[str, ...] | None = None) -> Path:
    """The local snapshot folder of ref (its name is the commit sha): the cache first, the Hub
    when reachable (downloading only `files`, glob patterns; None: the whole repo). HubMiss with
    one line when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, off = cache_dir(), offline()
    what = f"{ref.text}{' (a dataset)' if repo_type == 'dataset' else ''}"
    try:
        folder = snapshot_download(ref.repo, repo_type=repo_type, revision=ref.revision or "main",
                                   cache_dir=cache, local_files_only=off,
                                   allow_patterns=list(files) if files is not None else None)
    except GatedRepoError:
        raise HubMiss(f"{what} is gated", "accept its licence on huggingface.co and set HF_TOKEN in the "
                      "environment") from None
    except RevisionNotFoundError:
        raise HubMiss(f"{ref.repo} has no revision {ref.revision!r} on the Hub", "name a branch, tag or commit it has") from None
    except RepositoryNotFoundError:
        raise HubMiss(f"{what} is not a repository on the Hub", "check the id; a private repo needs HF_TOKEN exported") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        why = "HF_HUB_OFFLINE is set" if off else "the Hub is not reachable"
        if isinstance(e, ValueError) and not isinstance(e, HfHubHTTPError):
            raise HubMiss(f"{what}: {(str(e).splitlines() or [''])[0][:200]}", "check the id and revision") from None
        raise HubMiss(f"{what} is not in the Hugging Face cache (HF_HUB_CACHE={cache}) and {why}",
                      f"run {download_hint(ref, files or (), repo_type)} or set HF_HUB_CACHE") from None
    return Path(folder)


def local_folder(ref: str, repo_type: str = "model", files: tuple[str, ...] | None = None) -> str:
    """What the runtime opens for a recipe value: the path itself when it exists (or is no Hub
    id), else the snapshot folder of the pinned Hub revision (HubMiss when it cannot be had)."""
    h = hub_ref(ref)
    return ref if h is None else str(snapshot(h, repo_type, files))


def cached_snapshot(ref: HubRef, repo_type: str = "model") -> Path | None:
    """The cache's snapshot folder of a pinned ref, without huggingface_hub (preflight is stdlib)."""
    if not ref.pinned:
        return None
    folder = Path(cache_dir()) / f"{repo_type}s--{ref.repo.replace('/', '--')}" / "snapshots" / str(ref.revision)
    return folder if folder.is_dir() else None


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files of a Hub snapshot (a model repo's snapshot also holds its weights)."""
    return sorted(p for n in TOKENIZER_FILES if (p := Path(folder) / n).is_file())


class BadWeights(ValueError):
    """A model folder's index is not what save_pretrained writes: why, one phrase naming the file."""


def shard_name(name: object) -> bool:
    """A weight_map value that stays inside the model folder: a relative path ('model-00001-of-00004
    .safetensors', 'sub/x.safetensors') with no '..', '.' or empty part, no backslash, NUL or
    control character. The index is a file of the folder (a Hub repo's, a colleague's): an
    absolute or `../` name would make the check and the load read a file the user never named."""
    return isinstance(name, str) and all(plain_name(p) for p in name.split("/"))   # "/x": an empty first part


def weight_map(folder: str | Path) -> dict[str, str] | None:
    """{tensor: shard file name} of folder's model.safetensors.index.json, every name inside the
    folder (shard_name); None when there is no index (or its cache blob is gone: snapshot_problems
    says so). The index is read as a regular file (a link to one, as in a cache snapshot), bounded:
    a FIFO there neither blocks nor is read. BadWeights when it is not such an index."""
    index = Path(folder) / INDEX
    if not os.path.lexists(index):
        return None
    what = f"{INDEX} has no weight_map of tensor -> file name"
    try:
        wm = json.loads(read_bounded(index, _INDEX_LIMIT, follow=True))["weight_map"]
    except FileNotFoundError:
        return None
    except UserError as e:
        raise BadWeights(f"{INDEX} {e.problem}") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BadWeights(what) from None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise BadWeights(what)
    bad = sorted({v for v in wm.values() if not shard_name(v)})
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BadWeights(f"{INDEX} names the shard {printable(bad[0])!r}{more}, which is not a file name inside "
                         "the model folder (save_pretrained writes plain names such as "
                         "model-00001-of-00002.safetensors)")
    return wm


_TOKENIZER_CONFIG_LIMIT = 64 << 20       # added_tokens_decoder of a 256k vocabulary is a few MB


def tokenizer_config_problem(folder: str | Path) -> str | None:
    """Why folder's tokenizer_config.json would make transformers read a file outside the folder,
    or None. Its `fast_tokenizer_files` list picks the tokenizer file by version, and
    AutoTokenizer.from_pretrained (transformers 5.24) opens the chosen name joined to the folder
    as it is: `../x/tokenizer.1.json` or `/abs/tokenizer.1.json` load a tokenizer from elsewhere
    (transformers already ignores vocab_file / merges_file / tokenizer_file values there). A file
    that cannot be read or parsed is left to the tokenizer loader's own message."""
    cfg = Path(folder) / "tokenizer_config.json"
    try:
        tc = json.loads(read_bounded(cfg, _TOKENIZER_CONFIG_LIMIT, follow=True))
    except (OSError, UserError, ValueError, RecursionError):
        return None
    names = tc.get("fast_tokenizer_files") if isinstance(tc, dict) else None
    if names is None:
        return None
    bad = [n for n in names if not (isinstance(n, str) and plain_name(n))] \
        if isinstance(names, list) else [names]
    if not bad:
        return None
    return (f"tokenizer_config.json's fast_tokenizer_files names {printable(repr(bad[0]))[:200]}, which is not a "
            "file name inside the tokenizer folder (transformers would load a tokenizer from wherever it points)")


def snapshot_problems(folder: Path, kind: str) -> list[str]:
    """What a cached snapshot lacks for its use (kind: "weights", "tokenizer", "dataset", "config"),
    one phrase per file: a file whose blob is gone (the snapshot's symlink dangles: a cleaned or
    half-copied cache), a shard model.safetensors.index.json names that is absent, no file of the
    kind at all. stdlib only: preflight runs it before torchrun; `meshbake pull` after downloading."""
    import fnmatch

    # a model repo's snapshot serves several readers: the tokenizer does not need the weights
    mine = {"weights": WEIGHT_FILES, "tokenizer": TOKENIZER_FILES, "config": CONFIG_FILES}.get(kind, ("*",))
    out = [f"{rel} (its blob is gone from the cache)" for p in sorted(folder.rglob("*"))
           if p.is_symlink() and not p.exists()
           and any(fnmatch.fnmatch(rel := p.relative_to(folder).as_posix(), m) for m in mine)]
    if kind == "weights":
        try:
            wm = weight_map(folder)
        except BadWeights as e:
            return out + [f"{INDEX} (not a usable index: it {str(e).removeprefix(INDEX + ' ')})"]
        if wm is not None:
            out += [f"{f} (named by {INDEX})" for f in sorted(set(wm.values()))
                    if not (folder / f).exists() and not (folder / f).is_symlink()]
        elif not any(p.exists() for p in folder.glob("*.safetensors")) and not out:
            out.append("*.safetensors (no weights file)")
    elif kind == "tokenizer" and not any((folder / n).exists() for n in ("tokenizer.json", "vocab.json",
                                                                       "tokenizer.model")) and not out:
        out.append("tokenizer.json (or vocab.json / tokenizer.model)")
    elif kind == "config" and not (folder / "config.json").exists() and not out:
        out.append("config.json")
    return out
