"""The Axolotl import sweep (`make import-sweep`, not part of `make test`): every example config of an
Axolotl checkout (examples/**/*.yml|yaml) through `meshbake import axolotl` and `meshbake check`,
in one process, offline (HF_HUB_OFFLINE=1; model configs from meshbake's catalog and the Hugging
Face cache HF_HUB_CACHE points at). Each config lands in one class:

  check-ok           imported, and the recipe passes `meshbake check`
  refused            no recipe: the importer refused Axolotl keys meshbake cannot train as written,
                     each named with the reason and a fix (exit 2 of `meshbake import`)
  check-error        imported, but `meshbake check` stops it with RecipeErrors that each name a
                     recipe path and a hint (e.g. a full fine-tune that does not fit 80 GB)
  no-offline-config  base_model is a Hub id with no config.json in the catalog or the cache: the
                     recipe cannot be checked here (not a failure of the importer)
  unreadable         meshbake's strict YAML loader refuses the file itself (a RecipeError)
  bug                a traceback, a key (top level or datasets[i].*) with no note, a key noted with
                     the importer's catch-all "unknown to the importer" reason (nobody decided whether
                     it changes training), or a recipe value that differs from the Axolotl value it
                     came from (the invariants in `mismatches`)

    PYTHONPATH=. .venv/bin/python scripts/import_sweep.py AXOLOTL [--rev HEAD] [--hub-cache DIR]
        [--json bench/results/import_sweep.json] [--md docs/IMPORT_SWEEP.md]

AXOLOTL is a git directory (a clone, or a bare / mirror git dir: read with `git show`, no work tree
needed) or a plain folder holding examples/. The JSON records the commit swept.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("check-ok", "refused", "check-error", "no-offline-config", "unreadable", "bug")
CATCH_ALL = "known to the importer"     # "no meshbake equivalent known to the importer", "... unknown to the importer"
# keys that make the run another training objective: imported, the recipe would silently be SFT
OBJECTIVE_KEYS = ("rl", "reward_model", "process_reward_model", "diffusion", "relora", "lisa_n_layers", "ebft",
                  "use_eaft")


# ------------------------------------------------------------------------------- reading
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def examples(src: Path, rev: str) -> tuple[str, list[tuple[str, str]]]:
    """(commit or "", [(path under the repo, text)]) of every examples/**.yml|yaml."""
    is_git = (src / ".git").exists() or ((src / "HEAD").is_file() and (src / "objects").is_dir())
    if is_git:
        sha = _git(src, "rev-parse", rev).strip()
        names = [n for n in _git(src, "ls-tree", "-r", "--name-only", sha, "examples").splitlines()
                 if n.endswith((".yml", ".yaml"))]
        return sha, [(n, _git(src, "show", f"{sha}:{n}")) for n in sorted(names)]
    files = sorted(p for p in (src / "examples").rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
    return "", [(p.relative_to(src).as_posix(), p.read_text(encoding="utf-8")) for p in files]


# ------------------------------------------------------------------------------ auditing
def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def unaccounted(cfg: dict, notes) -> list[str]:
    """Axolotl keys with no note: top level, and every key of every datasets / pretraining_dataset
    / test_datasets item (a dataset key noted as a whole, 'datasets', covers only its type)."""
    noted = {n.key for n in notes}
    tops = {k.split(".")[0].split("[")[0] for k in noted}
    out = [k for k in cfg if k not in tops and not k.startswith("fsdp_")]
    whole = {n.key for n in notes if n.status in ("not mapped", "refused")}      # a dataset list left out whole
    for key in ("datasets", "pretraining_dataset", "test_datasets"):
        ds = cfg.get(key) if key not in whole else None
        for i, d in enumerate(ds if isinstance(ds, list) else [ds] if isinstance(ds, dict) else []):
            if not isinstance(d, dict):
                continue
            for k in d:
                if k not in ("path", "type") and f"{key}[{i}].{k}" not in noted:
                    out.append(f"{key}[{i}].{k}")
    return out


def mismatches(cfg: dict, r: dict) -> list[str]:
    """Recipe values that differ from the Axolotl values they were imported from."""
    out: list[str] = []
    train, lora, mesh, data = (r.get(k) or {} for k in ("train", "lora", "mesh", "data"))

    def want(path: str, got, exp) -> None:
        if got != exp and not (isinstance(got, float) and isinstance(exp, float) and abs(got - exp) <= 1e-12 * abs(exp)):
            out.append(f"{path}: {got!r}, Axolotl says {exp!r}")

    want("train.seq_len", train.get("seq_len"), int(cfg.get("sequence_len") or 512))
    mbs, ga = int(cfg.get("micro_batch_size") or 1), int(cfg.get("gradient_accumulation_steps") or 1)
    want("train.micro_batch_size", train.get("micro_batch_size"), mbs)
    world = r["cluster"]["nodes"] * r["cluster"].get("gpus_per_node", 8)
    rest = mesh.get("dp_replicate", 1) * mesh.get("cp", 1) * mesh.get("tp", 1)
    dp = mesh.get("dp_replicate", 1) * (mesh["dp_shard"] if mesh.get("dp_shard", -1) > 0 else world // rest)
    want("train.global_batch_size / (micro_batch_size x dp)", train.get("global_batch_size", 0) / (mbs * dp), float(ga))
    if cfg.get("learning_rate") is not None:
        want("train.lr", train.get("lr"), float(_num(cfg["learning_rate"])))
    want("train.weight_decay", train.get("weight_decay"), float(_num(cfg.get("weight_decay") or 0.0)))
    if cfg.get("max_steps"):
        want("train.steps", train.get("steps"), int(cfg["max_steps"]))
    for key, ax in (("tensor_parallel_size", "tp"), ("context_parallel_size", "cp"), ("dp_replicate_size",
                                                                                    "dp_replicate")):
        want(f"mesh.{ax}", mesh.get(ax, 1), int(cfg.get(key) or 1))
    sched = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
    if cfg.get("lr_scheduler") in sched:
        want("train.lr_schedule", train.get("lr_schedule"), sched[cfg["lr_scheduler"]])
    ws = _num(cfg.get("warmup_steps"))
    if isinstance(ws, float) and ws >= 1 and cfg.get("lr_scheduler") != "constant":
        want("train.warmup_steps", train.get("warmup_steps"), int(ws))
    if cfg.get("sample_packing") is not None:
        want("data.packing", data.get("packing", True), bool(cfg["sample_packing"]))
    bf16 = cfg.get("bf16") in (True, "auto", "true")
    want("train.mixed_precision.param_dtype", (train.get("mixed_precision") or {}).get("param_dtype"),
         "bfloat16" if bf16 else "float16" if cfg.get("fp16") else "float32")
    adapter = cfg.get("adapter")
    if adapter in ("lora", "qlora"):
        want("lora.rank", lora.get("rank"), int(cfg.get("lora_r") or 0))
        want("lora.alpha", lora.get("alpha"), float(_num(cfg.get("lora_alpha") or cfg.get("lora_r") or 0)))
        want("lora.dropout", lora.get("dropout"), float(_num(cfg.get("lora_dropout") or 0.0)))
        want("lora.quantize_base", lora.get("quantize_base"),
             "nf4" if adapter == "qlora" or cfg.get("load_in_4bit") else None)
    else:
        want("lora", lora or None, None)
    has_data = any(isinstance(d, dict) and d.get("path") for key in ("datasets", "pretraining_dataset")
                   for d in (cfg.get(key) if isinstance(cfg.get(key), list) else [cfg.get(key)]))
    if has_data and data.get("format", "synthetic") == "synthetic":
        out.append("data.format: synthetic (seeded random tokens), but the Axolotl config trains on datasets")
    for k in OBJECTIVE_KEYS:
        if cfg.get(k):
            out.append(f"{k}: {cfg[k]!r} (another training objective) imported as supervised fine-tuning")
    return out


# ------------------------------------------------------------------------------- one config
def sweep_one(name: str, text: str) -> dict:
    from meshbake.compiler import hub, load
    from meshbake.compiler.errors import Err
    from meshbake.compiler.importers.axolotl import guess_model, import_axolotl
    from meshbake.compiler.importers.cli import check_text
    from meshbake.compiler.model import catalog_names

    rec: dict = {"config": name}
    try:
        cfg = load.parse_yaml(text, name)
        if isinstance(cfg, Err):
            return rec | {"class": "unreadable", "errors": [f"{e.path}: {e.message}" for e in cfg.errors]}
        if not isinstance(cfg, dict):
            return rec | {"class": "unreadable", "errors": [f"$: a YAML {type(cfg).__name__}, not a mapping"]}
        base = cfg.get("base_model_config") or cfg.get("base_model")
        ref = guess_model(base, catalog_names(), lambda p: Path(p).is_dir(),
                          lambda r: hub.read_config(r)[1] is not None)
        mc = load.read_model_config(ref) if ref else None
        imp = import_axolotl(cfg, Path(name).stem, source=Path(name).name, model_ref=ref,
                             model_config=None if isinstance(mc, Err) else mc)
        rec |= {"base_model": str(base), "model": ref}
        if imp.refused:
            bad = [n.key for n in imp.refused if not n.reason]
            return rec | {"class": "bug" if bad else "refused",
                          "refused": [f"{n.key}: {n.reason}" for n in imp.refused],
                          **({"problems": [f"{k}: refused without a reason" for k in bad]} if bad else {})}
        problems = [f"{k}: no note (silently dropped)" for k in unaccounted(cfg, imp.notes)]
        problems += [f"{n.key}: {n.status}, catch-all reason ({n.reason})" for n in imp.notes if CATCH_ALL in n.reason]
        recipe = load.parse_yaml(imp.text, "imported")
        problems += mismatches(cfg, recipe) if isinstance(recipe, dict) else ["the recipe text does not parse"]
        rec["notes"] = dict(Counter(n.status for n in imp.notes))
        res = check_text(imp.text, name)
        if isinstance(res, Err):
            errs = [f"{e.path}: {e.message}" + (f" (hint: {e.hint})" if e.hint else "") for e in res.errors]
            rec["errors"] = errs
            no_cfg = any(e.path == "model.config" for e in res.errors) and (ref is None or isinstance(mc, Err))
            cls = "no-offline-config" if no_cfg else "check-error"
            problems += [f"check error without a hint: {e.path}" for e in res.errors if not e.hint and not no_cfg]
        else:
            cls = "check-ok"
            rec["world"], rec["gb_per_rank"] = res.plan.mesh.world, round(res.estimate.total_bytes / 1e9, 1)
        if problems:
            rec["problems"] = problems
        return rec | {"class": "bug" if problems else cls, **({"would_be": cls} if problems else {})}
    except Exception:       # noqa: BLE001 - a traceback is exactly what the sweep looks for
        return rec | {"class": "bug", "problems": ["traceback: " + traceback.format_exc()[-1500:]]}


# -------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    counts = res["counts"]
    lines = ["# `meshbake import axolotl` over every Axolotl example config",
             "",
             f"Axolotl `{res['axolotl_commit'] or '(no git)'}`, {res['total']} configs "
             f"(examples/**/*.yml|yaml); model configs: meshbake's catalog + the offline Hugging Face "
             f"cache ({res['hub_cache_repos']} model repos). Regenerate: `make import-sweep AXOLOTL=... "
             "HUB_CACHE=...` (scripts/import_sweep.py says what each class means).",
             "",
             "| class | configs |", "|---|---|"]
    before = res.get("before")
    if before:
        lines[-2:] = ["| class | configs | before the fixes |", "|---|---|---|"]
    lines += [f"| {c} | {counts.get(c, 0)} |" + (f" {before['counts'].get(c, 0)} |" if before else "")
              for c in CLASSES]
    if before:
        lines += ["", f"Before: the importer of meshbake {before['meshbake']} over the same configs "
                  f"(bench/results/import_sweep_before.json); {before['problems']}. Without their problems the "
                  f"bugs would have been: {before['would_be']}."]
    lines += ["", "Classes (scripts/import_sweep.py): check-ok = imported and `meshbake check` passes; refused = no "
              "recipe, each Axolotl key named with the reason and a fix; check-error = imported, `check` stops it with "
              "RecipeErrors naming a recipe path and a hint (a model type meshbake does not run, a run that does not "
              "fit 80 GB, or a gap of the offline cache: its gpt-oss tokenizer_config.json has no chat template, "
              "the Hub repo's chat_template.jinja is not in it); no-offline-config = base_model has no config.json "
              "in the catalog or the offline cache; bug = a traceback, a key with no note or with the importer's "
              "catch-all reason, or a recipe value off its Axolotl source."]
    lines += ["", "## Per config", "", "| config | class | model | detail |", "|---|---|---|---|"]
    for r in res["configs"]:
        detail = "; ".join(r.get("problems") or r.get("refused") or r.get("errors") or
                           ([f"world {r['world']}, {r['gb_per_rank']} GB/rank"] if "world" in r else []))
        detail = re.sub(r"\s+", " ", detail).replace("|", "\\|")
        if len(detail) > 300:
            detail = detail[:297] + "..."
        lines.append(f"| {r['config'].removeprefix('examples/')} | {r['class']} | {r.get('model') or ''} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("axolotl", type=Path)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--hub-cache", help="HF_HUB_CACHE for base_model config.json files (default: the environment's)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/import_sweep.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs/IMPORT_SWEEP.md")
    ap.add_argument("--only", help="a regex: sweep only the configs whose path matches")
    ap.add_argument("--before", type=Path, help="an earlier sweep's JSON, whose counts the report shows beside these")
    ap.add_argument("--meshbake", default="", help="what the JSON records as the meshbake commit swept (default: HEAD)")
    a = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if a.hub_cache:
        os.environ["HF_HUB_CACHE"] = str(Path(a.hub_cache).resolve())
    sha, files = examples(a.axolotl, a.rev)
    if a.only:
        files = [f for f in files if re.search(a.only, f[0])]
    t0 = time.time()
    configs = []
    for i, (name, text) in enumerate(files):
        configs.append(sweep_one(name, text))
        print(f"[{i + 1}/{len(files)}] {configs[-1]['class']:<17} {name}", file=sys.stderr)
        for p in configs[-1].get("problems", []) if a.only else []:
            print(f"      {p}", file=sys.stderr)
    cache = Path(os.environ.get("HF_HUB_CACHE", "")) if os.environ.get("HF_HUB_CACHE") else None
    if cache:           # a machine's path has no place in a committed report
        configs = json.loads(json.dumps(configs).replace(json.dumps(str(cache))[1:-1], "$HF_HUB_CACHE"))
    mb = a.meshbake or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
    res = {"axolotl_commit": sha, "meshbake": mb, "total": len(configs),
           "hub_cache_repos": len(list(cache.glob("models--*"))) if cache and cache.is_dir() else 0,
           "counts": dict(Counter(c["class"] for c in configs)), "seconds": round(time.time() - t0, 1),
           "configs": configs}
    if a.before:
        b = json.loads(a.before.read_text(encoding="utf-8"))
        kinds = Counter("traceback" if p.startswith("traceback") else "no note" if "no note" in p else "catch-all"
                        if "catch-all" in p else "value off its source" for c in b["configs"] for p in c.get("problems", []))
        wb = Counter(c.get("would_be") for c in b["configs"] if c["class"] == "bug")
        res["before"] = {"meshbake": b.get("meshbake", "?"), "counts": b["counts"],
                         "would_be": ", ".join(f"{n} {k}" for k, n in wb.most_common()),
                         "problems": ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + " problems"}
    if not a.only:
        a.json.write_text(json.dumps(res, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        a.md.write_text(markdown(res), encoding="utf-8")
    print(json.dumps(res["counts"]), f"{res['seconds']} s", file=sys.stderr)
    return 1 if res["counts"].get("bug") else 0


if __name__ == "__main__":
    sys.exit(main())
