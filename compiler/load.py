"""load stage: the only compiler module that reads files.

Recipe YAML is read strictly: duplicate keys are errors (PyYAML silently keeps the last one),
and `3e-4` is a float (YAML 1.1, which PyYAML implements, needs a dot: `3.0e-4`).
Merge order for the cluster section: profile file < recipe `cluster:` < `--set`.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from meshbake.compiler.errors import Err, RecipeError, Result

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CLUSTERS = ROOT / "clusters"

_FLOAT = re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)


class _DupKey(Exception):
    def __init__(self, path: str, line: int):
        self.path, self.line = path, line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader + exponent floats without a dot + duplicate keys rejected."""


# `name: 2024-01-01` stays a string (YAML 1.1 makes it a datetime.date, which no JSON holds).
# YAML 1.1 also reads 24:00:00 as the base-60 integer 86400 (a Slurm time limit!) and 0x10 as
# 16: integers here are plain decimal (with _ separators), the rest stays a string
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$")
_StrictLoader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int",
                                     "tag:yaml.org,2002:timestamp")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))


def _construct_mapping(loader, node, deep=False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DupKey(str(key), key_node.start_mark.line + 1)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# A recipe is ~100 values 3 levels deep. Aliases are references in the composed tree, so a
# 590-byte file of nested aliases ("billion laughs", 9 levels x 9 references) expands to 10^9
# values when constructed: the expanded size is counted on the tree first (memoized, linear
# in the text) and refused above these bounds, as are recursive aliases and deep nesting.
MAX_NODES = 10_000
MAX_DEPTH = 32
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class _Refused(Exception):
    def __init__(self, path: str, message: str, hint: str):
        self.path, self.message, self.hint = path, message, hint


def _key_name(key: yaml.Node, path: tuple) -> str:
    from meshbake.compiler.validate import json_path

    where = f"line {key.start_mark.line + 1}"
    if not isinstance(key, yaml.ScalarNode):
        raise _Refused(json_path(path), f"a {'list' if isinstance(key, yaml.SequenceNode) else 'mapping'} "
                       f"used as a key ({where})", "keys are plain names, e.g. `steps: 10`")
    if key.tag != "tag:yaml.org,2002:str":
        kind = key.tag.rsplit(":", 1)[-1]
        why = "; YAML 1.1 reads on/off/yes/no as booleans" if kind == "bool" else ""
        raise _Refused(json_path(path + (key.value,)), f"key {key.value!r} is read as a YAML {kind}, not a "
                       f"name ({where}{why})", f"quote it: '{key.value}':")
    return key.value


def _check_tree(root: yaml.Node) -> None:
    """Raise _Refused for non-JSON tags, non-string keys, recursive aliases, too deep or too big."""
    from meshbake.compiler.validate import json_path

    sizes: dict[int, int] = {}       # id(node) -> values it expands to
    open_: set[int] = set()          # nodes on the current path (an alias back to one is a cycle)

    def walk(node: yaml.Node, path: tuple, depth: int) -> int:
        if id(node) in open_:
            raise _Refused(json_path(path), "a YAML alias refers to a node that contains it (recursive alias)",
                           "aliases (*name) may only copy values defined before and outside them")
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > MAX_DEPTH:
            raise _Refused(json_path(path[:1]), f"nested more than {MAX_DEPTH} levels deep", "a recipe is a few levels "
                           "of sections and values")
        if node.tag not in _PLAIN_TAGS and node.tag != "tag:yaml.org,2002:merge":
            raise _Refused(json_path(path), f"YAML tag {node.tag!r} (line {node.start_mark.line + 1}) is not "
                           "allowed", "use plain strings, numbers, booleans, lists and mappings")
        open_.add(id(node))
        n = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                name = "<<" if k.tag == "tag:yaml.org,2002:merge" else _key_name(k, path)
                n += walk(v, path + (name,), depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                n += walk(v, path + (i,), depth + 1)
        open_.discard(id(node))
        sizes[id(node)] = n
        if n > MAX_NODES:
            raise _Refused(json_path(path), f"expands to more than {MAX_NODES:,} values (nested YAML aliases)",
                           "write the values out; a recipe needs no aliases of aliases")
        return n

    walk(root, (), 0)


MAX_TEXT = 200_000          # characters; recipes are a few KB (PyYAML reads ~1 MB/s)


def _flow_depth(text: str) -> int:
    """Most [ and { open at once, counted over the raw text (quotes ignored: an over-count only
    refuses a value holding dozens of brackets). PyYAML's scanner is quadratic in flow nesting
    (1000 levels: 2.5 s before the composer's RecursionError), so this is checked first."""
    depth = top = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            top = max(top, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return top


def _load(text: str) -> Any:
    """yaml.load with _StrictLoader, after _check_tree has passed the composed tree."""
    if len(text) > MAX_TEXT:
        raise _Refused("$", f"{len(text):,} characters; a recipe is a few KB (limit {MAX_TEXT:,})",
                       "put data in files the recipe names, not in the recipe")
    if _flow_depth(text) > 2 * MAX_DEPTH:
        raise _Refused("$", f"more than {2 * MAX_DEPTH} [ or {{ open at once (nested more than "
                       f"{MAX_DEPTH} levels deep)", "a recipe is a few levels of sections and values")
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise _Refused("$", f"nested more than {MAX_DEPTH} levels deep", "a recipe is a few levels "
                           "of sections and values") from None
        if node is None:
            return None
        _check_tree(node)
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as e:     # int('9' * 5000): Python's 4300-digit limit
            raise _Refused("$", f"a value cannot be read ({str(e).splitlines()[0][:200]})",
                           "write plain decimal numbers of sensible size") from None
    finally:
        loader.dispose()


def _dup_path(node: yaml.Node, prefix: tuple = ()) -> str | None:
    """JSON path of the first duplicated key in a composed YAML tree."""
    from meshbake.compiler.validate import json_path

    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            key = k.value
            if key in seen:
                return json_path(prefix + (key,))
            seen.add(key)
            found = _dup_path(v, prefix + (key,))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found = _dup_path(v, prefix + (i,))
            if found:
                return found
    return None


def parse_yaml(text: str, source: str) -> Result[dict[str, Any]]:
    try:
        d = _load(text)
    except _Refused as e:
        return Err((RecipeError(e.path, f"{source}: {e.message}", e.hint),))
    except _DupKey as e:
        path = _dup_path(yaml.compose(text, Loader=yaml.SafeLoader)) or e.path
        return Err((RecipeError(path, f"duplicate key (line {e.line} of {source}); YAML would silently "
                                "keep only the last value", "remove one of them"),))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return Err((RecipeError("$", f"{source} is not valid YAML{where}: {getattr(e, 'problem', e)}",
                                "check the indentation and quoting"),))
    if not isinstance(d, dict):
        return Err((RecipeError("$", f"{source}: a recipe is a YAML mapping, got {type(d).__name__}",
                                "start with `name: ...`, `model: ...`"),))
    return d


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> Result[dict[str, Any]]:
    """`--set a.b=value`: value parsed as YAML (so `mesh.tp=4` is an int). Returns a new dict."""
    out = copy.deepcopy(d)
    errs = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            errs.append(RecipeError("--set", f"{item!r} is not KEY=VALUE", "e.g. --set mesh.tp=4"))
            continue
        try:
            value = _load(raw) if raw.strip() else None
        except _Refused as e:
            errs.append(RecipeError("--set", f"{item!r}: {e.message}", e.hint))
            continue
        except (yaml.YAMLError, _DupKey) as e:
            why = getattr(e, "problem", None) or str(e).splitlines()[0]
            errs.append(RecipeError("--set", f"{item!r}: value is not YAML ({why})", "quote strings with '...'"))
            continue
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                errs.append(RecipeError(".".join(parts[:i + 1]), f"--set {key}: this is a "
                                        f"{type(nxt).__name__}, not a section", "set the key itself"))
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return Err(tuple(errs)) if errs else out


def _profile_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") else CLUSTERS / f"{name}.yaml"


def read_profile(path: Path, json_path: str) -> Result[dict[str, Any]]:
    """A cluster profile file as a mapping, through the recipe's own YAML loader (parse_yaml: no
    tags, no alias bombs, no duplicate keys): a profile is a file someone hands over."""
    text = read_text(path, json_path)
    return text if isinstance(text, Err) else parse_yaml(text, str(path.name))


def apply_cluster_profile(d: dict[str, Any], cli_profile: str | None) -> Result[dict[str, Any]]:
    """Merge clusters/<profile>.yaml under the recipe's cluster keys (the recipe wins)."""
    cluster = d.get("cluster") if isinstance(d.get("cluster"), dict) else {}
    name = cli_profile or cluster.get("profile")
    if not name:
        return d
    path = _profile_path(str(name))
    if not path.is_file():
        avail = sorted(p.stem for p in CLUSTERS.glob("*.yaml"))
        near = difflib.get_close_matches(str(name), avail, n=1)
        return Err((RecipeError("cluster.profile", f"no cluster profile {name!r} ({path.name} not found)",
                                f"did you mean {near[0]!r}?" if near else f"available: {', '.join(avail) or 'none'}"),))
    prof = read_profile(path, "cluster.profile")
    if isinstance(prof, Err):
        return Err(tuple(RecipeError(f"cluster.profile ({path.name}) {e.path}", e.message, e.hint)
                         for e in prof.errors))
    prof.pop("profile", None)
    out = copy.deepcopy(d)
    out["cluster"] = {**prof, **cluster, "profile": str(name)}
    return out


def resolve_recipe_path(name_or_path: str) -> Result[Path]:
    p = Path(name_or_path)
    if p.is_file():
        return p
    by_name = p.suffix not in (".yaml", ".yml") and len(p.parts) == 1    # `70b_hsdp_tp`, not a path
    named = RECIPES / f"{name_or_path}.yaml"
    if by_name and named.is_file():
        return named
    avail = sorted(x.stem for x in RECIPES.glob("*.yaml"))
    near = difflib.get_close_matches(name_or_path, avail, n=2, cutoff=0.4)
    hint = (f"name a recipe .yaml inside {name_or_path}" if p.is_dir() else
            f"did you mean {' or '.join(near)}?" if near else f"recipes: {', '.join(avail)}")
    what = "a directory" if p.is_dir() else f"not a file, not recipes/{named.name}" if by_name else "not a file"
    return Err((RecipeError("$", f"no recipe {name_or_path!r} ({what})", hint),))


def read_text(path: Path, json_path: str) -> Result[str]:
    """A recipe or profile as text; unreadable or non-UTF-8 bytes are an error, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return Err((RecipeError(json_path, f"{path} is not UTF-8 text (byte {e.start}: {e.reason})",
                                "save the recipe as UTF-8 YAML"),))
    except OSError as e:
        return Err((RecipeError(json_path, f"cannot read {path} ({e.strerror})", "check the path and permissions"),))


def load_recipe(name_or_path: str, overrides: tuple[str, ...] = (),
                cluster: str | None = None) -> Result[dict[str, Any]]:
    path = resolve_recipe_path(name_or_path)
    if isinstance(path, Err):
        return path
    text = read_text(path, "$")
    if isinstance(text, Err):
        return text
    return recipe_from_text(text, str(path), overrides, cluster)


def recipe_from_text(text: str, source: str, overrides: tuple[str, ...] = (),
                     cluster: str | None = None) -> Result[dict[str, Any]]:
    """Recipe text -> dict: parse, --set overrides, cluster profile. The one chain that the CLI,
    compile_recipe, the importer's check and the tests all go through."""
    d = parse_yaml(text, source)
    if isinstance(d, Err):
        return d
    d = apply_overrides(d, list(overrides))
    if isinstance(d, Err):
        return d
    return apply_cluster_profile(d, cluster)


MAX_CONFIG_BYTES = 1_000_000
MAX_TOKENIZER_BYTES = 200_000_000    # Llama-3's tokenizer.json is 9 MB


def _no_constant(name: str):
    """json.loads accepts NaN and Infinity, which are not JSON: plan.json would carry them on."""
    raise ValueError(f"{name} is not a JSON number")


def read_model_config(ref: str) -> Result[dict[str, Any]]:
    """model.config: a catalog name, a config.json path, an HF model folder, or a Hugging Face
    Hub id `org/name[@rev]` (compiler/hub.py: the cached or downloaded config.json of that
    commit, also when the catalog holds a model of that name: the catalog is a convenience, not
    a gate). A path that exists wins over a Hub id of the same spelling."""
    from meshbake.compiler import hub
    from meshbake.compiler.model import CATALOG_DIR, catalog_names, catalog_near, without_kernel_keys

    cat = CATALOG_DIR / f"{ref}.json"
    p = Path(ref)
    path = cat if cat.is_file() else p / "config.json" if p.is_dir() else p
    if not path.is_file():
        _, hub_path, err = hub.read_config(ref)
        if err is not None:
            return Err((err,))
        if hub_path is not None:
            path = hub_path
    if not path.is_file():
        near = catalog_near(ref, catalog_names())        # same family and version only
        return Err((RecipeError("model.config", f"{ref!r} is not a catalog model, a config.json, an HF folder "
                                "or a Hugging Face Hub id (org/name)",
                                f"did you mean {' or '.join(near)}?" if near else
                                "no catalog model of the same family and version (another one has other "
                                "config.json facts): point model.config at the model's config.json or HF folder; "
                                f"catalog: {', '.join(catalog_names())}"),))
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return Err((RecipeError("model.config", f"{path}: {path.stat().st_size:,} bytes is not a config.json "
                                    f"(real ones are a few KB; limit {MAX_CONFIG_BYTES:,})", "check the path"),))
        cfg = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as e:   # ValueError: JSONDecodeError, UnicodeDecodeError
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        return Err((RecipeError("model.config", f"{path}: cannot read config.json ({why})", "check the file"),))
    if not isinstance(cfg, dict):
        return Err((RecipeError("model.config", f"{path}: config.json is not an object", "check the file"),))
    # an attn_implementation "org/repo" would make transformers fetch and run a Hub kernel
    return without_kernel_keys(cfg)


def _template_text(p: Path) -> str:
    """The texts that name tokens a run emits besides the data's own words: the chat template(s)
    and the bos / eos / pad / unk tokens of tokenizer_config.json (not its added_tokens_decoder,
    which lists every token). Bounded reads; unreadable parts count as absent."""
    out: list[str] = []

    def read(name: str) -> str | None:
        f = p / name
        try:
            if f.is_file() and f.stat().st_size <= MAX_TOKENIZER_BYTES:
                return f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            pass
        return None

    def strings(v: Any) -> list[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, dict):                 # AddedToken form {"content": ...} / template {"template": ...}
            return [x for k in ("content", "template") if isinstance(x := v.get(k), str)]
        if isinstance(v, list):                 # named templates [{"name", "template"}]
            return [x for e in v for x in strings(e)]
        return []

    try:
        tc = json.loads(read("tokenizer_config.json") or "{}")
    except (ValueError, RecursionError):
        tc = {}
    if isinstance(tc, dict):
        for k in ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token"):
            out += strings(tc.get(k))
    out += [t for t in (read("chat_template.jinja"),) if t]
    try:
        out += strings(json.loads(read("chat_template.json") or "{}").get("chat_template"))
    except (ValueError, AttributeError, RecursionError):
        pass
    return "\n".join(out)


def tokenizer_vocab(folder: str) -> Result[int | None]:
    """Ids the tokenizer in `folder` produces for a run (max id + 1), from tokenizer.json (fast)
    or vocab.json + added_tokens.json (slow BPE). None when the folder is not here (data paths are
    relative to the launch directory, checked again there) or holds another format
    (SentencePiece tokenizer.model).

    A special added token counts only when the run emits it: named by the chat template or as the
    bos / eos / pad / unk token. Gemma 3's tokenizer carries `<image_soft_token>` (id 262144) that
    only its image processor inserts, one past the text model's 262,144-row embedding; counting it
    refused every text recipe of gemma-3 (Axolotl trains them). Such a token in the data itself is
    still caught, by `meshbake prepare` (token id >= vocab_size), before any step."""
    p = Path(folder)
    fast, slow = p / "tokenizer.json", p / "vocab.json"
    try:
        if fast.is_file():
            if fast.stat().st_size > MAX_TOKENIZER_BYTES:
                return None              # not judged here; the runtime loads it
            tj = json.loads(fast.read_text(encoding="utf-8"))
            vocab = (tj.get("model") or {}).get("vocab")
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
            added = [t for t in tj.get("added_tokens") or [] if isinstance(t, dict)]
            special = [t for t in added if t.get("special") is True]
            ids += [t.get("id") for t in added if t.get("special") is not True]
            if special:
                text = _template_text(p)
                ids += [t.get("id") for t in special if isinstance(t.get("content"), str) and t["content"] in text]
        elif slow.is_file():
            ids = list(json.loads(slow.read_text(encoding="utf-8")).values())
            added = p / "added_tokens.json"
            if added.is_file():
                ids += list(json.loads(added.read_text(encoding="utf-8")).values())
        else:
            return None
    except (OSError, ValueError, AttributeError, TypeError, RecursionError) as e:
        return Err((RecipeError("data.tokenizer", f"{folder}: cannot read the tokenizer ({e})",
                                "point data.tokenizer at a Hugging Face tokenizer folder"),))
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ids) + 1 if ids else None


def tokenizer_errors(source: str, tokenizer: str | None, config: dict[str, Any]) -> tuple[RecipeError, ...]:
    """A tokenizer whose ids reach past the model's embedding was found only at run time."""
    from meshbake.runtime import hub

    if source != "synthetic" and tokenizer and Path(tokenizer).is_dir() \
            and (problem := hub.tokenizer_config_problem(tokenizer)) is not None:
        return (RecipeError("data.tokenizer", f"{tokenizer}: {problem}",
                            "remove fast_tokenizer_files from tokenizer_config.json (save_pretrained writes "
                            "tokenizer.json beside it), or use a tokenizer folder you trust"),)
    vocab = config.get("vocab_size")
    if source == "synthetic" or not tokenizer or not isinstance(vocab, int):
        return ()
    n = tokenizer_vocab(tokenizer)
    if isinstance(n, Err):
        return n.errors
    if n is not None and n > vocab:
        return (RecipeError("data.tokenizer", f"{tokenizer} produces token ids up to {n - 1}, but the model's "
                            f"vocab_size is {vocab} (the embedding has no row for them)",
                            "use the model's own tokenizer, or resize the embeddings to the tokenizer "
                            "(model.resize_token_embeddings) and point model.config at the result"),)
    return ()
