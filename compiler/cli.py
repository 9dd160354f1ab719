"""meshbake CLI: check | bundle | plan --json | dryrun | suggest | prepare | pull | verify | export | import | report.

Exit 2 on recipe errors, 3 on the user's data/paths at run time, 70 on a meshbake bug; never a traceback.

Every string that came from a recipe or the disk (a model folder name, a warning quoting one, a
path) goes through `_con` before it reaches the rich console: rich reads `[...]` as markup (a
folder named `ra[/zz]` raised MarkupError after the bundle was written: exit 70) and a terminal
reads escape sequences. Plain prints go through `printable`.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from meshbake.compiler.errors import Err, RecipeError
from meshbake.runtime.safeio import printable
from meshbake.runtime.units import fmt_bytes

EXIT_RECIPE = 2


def _con(v: object) -> str:
    """A value for a rich console string or table cell: shown as text, never read as markup."""
    from rich.markup import escape

    return escape(printable(v))


def _lines(text: str) -> str:
    """Multi-line text for a plain print: each line through printable, the newlines kept."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshbake", description="Compile a training recipe into a launch bundle.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def recipe_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="path to a recipe .yaml, or a name under recipes/")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, YAML-typed (e.g. --set mesh.tp=4)")
        s.add_argument("--cluster", default=None, help="cluster profile: clusters/NAME.yaml or a path")
        return s

    recipe_cmd("check", "validate and resolve; print the plan summary")
    b = recipe_cmd("bundle", "write the launch bundle")
    b.add_argument("-o", "--out", default="out", help="output directory (default: out/)")
    pl = recipe_cmd("plan", "print the resolved plan")
    pl.add_argument("--json", action="store_true", required=True, help="print plan.json to stdout")
    recipe_cmd("pull", "download the Hugging Face Hub files the recipe's run reads (config, tokenizer, weights, "
               "datasets at their pinned commits) into the cache (HF_HUB_CACHE / HF_HOME), so compute nodes "
               "run with HF_HUB_OFFLINE=1")
    pr = recipe_cmd("prepare", "tokenize and pack the recipe's data once (launch.sh also does this)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    dr = recipe_cmd("dryrun", "build the job's model for the real world size on a fake process group (meta "
                    "tensors): start-up errors and per-rank parameters vs the estimate")
    dr.add_argument("--ranks", default="0,-1", help="ranks to build, comma-separated; -1 = the last (default 0,-1)")
    dr.add_argument("--json", action="store_true", help="print the per-rank results as JSON")
    sg = recipe_cmd("suggest", "rank every valid mesh / AC / micro-batch / SP-LP for the recipe's cluster by "
                    "predicted tokens/s (infeasible ones dropped with the reason)")
    sg.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    sg.add_argument("--json", action="store_true", help="print every candidate, ranked and dropped, as JSON")
    e = sub.add_parser("export", help="consolidate a run's checkpoint into a Hugging Face folder")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    e.add_argument("-o", "--out", required=True)
    e.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    r = sub.add_parser("report", help="a run dir's metrics and events as one HTML page + a terminal summary")
    r.add_argument("run_dir")
    r.add_argument("-o", "--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    i = sub.add_parser("import", help="turn another tool's config into a commented meshbake recipe")
    i.add_argument("tool", choices=["axolotl"])
    i.add_argument("config", help="the tool's YAML config")
    i.add_argument("-o", "--out", default=None, help="recipe file to write (default: print it)")
    i.add_argument("--model", default=None, help="model.config to use (catalog name, config.json or HF folder) "
                   "when base_model is a hub id meshbake's catalog does not know")
    i.add_argument("--nodes", type=int, default=None, help="cluster.nodes (Axolotl takes it from its launcher)")
    i.add_argument("--gpus-per-node", type=int, default=None, help="cluster.gpus_per_node")
    i.add_argument("--force", action="store_true", help="replace an existing -o file")
    i.add_argument("--cluster", default=None, help="cluster profile the recipe names (clusters/NAME.yaml or a path)")
    c = sub.add_parser("calibrate", help="measure this machine (GEMM throughput by shape, memory bandwidth, "
                       "collective bus bandwidth + latency with the real backend) into a cluster profile the "
                       "step-time estimate then uses")
    c.add_argument("-o", "--out", default=None, help="profile to write, e.g. clusters/NAME.yaml (default: print it)")
    c.add_argument("--cluster", default=None, help="base profile whose keys the output keeps (clusters/NAME.yaml "
                   "or a path)")
    c.add_argument("--nproc", type=int, default=None, help="processes to measure the collectives with (default: "
                   "the base profile's gpus_per_node, else 4)")
    v = sub.add_parser("verify", help="recompile a bundle from its own recipe.yaml and compare every file byte for "
                       "byte: exit 0 identical, 1 different, 2 the recipe does not compile, 3 not a bundle")
    v.add_argument("bundle_dir", help="the bundle directory (run from where `meshbake bundle` ran: relative "
                   "paths in the recipe, e.g. model.config, are relative to it)")
    return p


def _report(errs: Err, source: str) -> int:
    from meshbake.compiler.validate import format_errors

    n = len(errs.errors)
    print(f"meshbake: {n} problem{'s' if n != 1 else ''} in {printable(source)}:", file=sys.stderr)
    print(_lines(format_errors(errs.errors)), file=sys.stderr)
    return EXIT_RECIPE


def _resolve(args):
    from meshbake.compiler import load
    from meshbake.compiler.pipeline import resolve_data_dict, resolve_dict

    d = load.load_recipe(args.recipe, tuple(args.overrides), args.cluster)
    if isinstance(d, Err):
        return d
    # prepare tokenizes data: it needs the data section and the model's vocab_size, not the model
    # (building it on the meta device imports torch and the modeling code: ~4 s of its start-up);
    # a mesh that does not divide the model, or a model over the GPU's memory, is check's and bundle's error
    return resolve_data_dict(d) if args.cmd == "prepare" else resolve_dict(d)


def _count(n: float) -> str:
    """647488 -> '647.5K', 70553706496 -> '70.55B' (the tiny demo model is not '0.00B')."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _summary(res) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    plan, est = res.plan, res.estimate
    m = plan.mesh
    con = Console()
    con.print(f"[bold]{_con(plan.name)}[/]: {_con(plan.model.source)} ({_count(plan.model.num_params)} params) on "
              f"{m.nodes} x {m.procs_per_node} {m.device} = world {m.world}")
    # SIMPLE_HEAD and no edge padding: fits 80 columns (a pipe, CI log) without cutting headers
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
    pp = ("pp",) if m.pp_enabled else ()          # a column only with a pipeline: other tables as before
    for h in (*pp, "dp_replicate", "dp_shard", "cp", "tp", "grad_accum", "tokens/step", "per rank", "budget"):
        t.add_column(h, no_wrap=True, min_width=len(h))
    t.add_row(*map(_con, (*(m.pp,) * len(pp), m.dp_replicate, m.dp_shard, m.cp, m.tp, plan.train.grad_accum)),
              f"{res.mesh.tokens_per_step:,}", fmt_bytes(est.total_bytes), fmt_bytes(est.budget_bytes))
    con.print(t)
    for w in plan.warnings:
        con.print(f"[yellow]warning[/] {_con(w)}")


def epochs_line(plan) -> str:
    """check's line for a train.epochs recipe: the resolved steps when this directory holds the
    recipe's prepared data, up to date (its index.json gives the windows), else when they will be
    known. Only check reads the prepared dir: plan.json and the bundle never depend on it."""
    from meshbake.runtime.prepare import DataError, current, length_line, read_index

    try:
        folder = current(plan)
    except DataError:              # a planted pointer or dir: prepare and the run say what is wrong
        folder = None
    idx = (read_index(folder) if folder is not None else None) or {}
    windows = ((idx.get("splits") or {}).get("train") or {}).get("windows")
    if isinstance(windows, int) and windows > 0:
        return "prepared data: " + length_line(plan.train, windows)
    return (f"train.epochs {plan.train.epochs:g}: steps known after `meshbake prepare` "
            "(ceil(epochs x windows / global_batch_size))")


def runnable_line(res) -> str:
    """check's last line: runnable, or what the run needs that is not here (a Hub id in no cache,
    a path relative to the launch directory that is not in this one)."""
    from meshbake.runtime import hub

    plan = res.plan
    need = list(getattr(res, "missing", ()))
    said = {m.split(":", 1)[0] for m in need}
    d = plan.data
    refs = [("model.weights", plan.model.weights)]
    if d.format != "synthetic":
        refs += [("data.tokenizer", d.tokenizer)]
        refs += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(d.sources)]
        refs += [(f"data.eval_sources[{i}].path", s.path) for i, s in enumerate(d.eval_sources)]
    for key, ref in refs:
        h = hub.parse(ref)
        if not ref or key in said or (h is not None and h.pinned) or Path(ref).exists():
            continue            # a pinned Hub id was found in the cache (or on the Hub)
        need.append(f"{key}: {ref!r} is not here (a path relative to the launch directory)")
    if not need:
        return "runnable: " + ("model, tokenizer and data found here" if d.format != "synthetic" else
                               "synthetic data") + ("" if plan.model.weights else ", random init")
    return f"not runnable from here yet ({len(need)} missing): " + "; ".join(printable(n) for n in need)


def _prepare(plan, quiet: bool) -> int:
    """The bundle's `python -m runtime.prepare plan.json`, from the recipe (paths relative to cwd);
    plan: pipeline.DataResolved (what prepare reads of a Plan)."""
    from meshbake.runtime.errors import EXIT_USER
    from meshbake.runtime.prepare import DataError, prepare

    if plan.data.format == "synthetic":
        print("data.format is synthetic: nothing to prepare")
        return 0
    try:
        prepare(plan, quiet=quiet)
    except DataError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USER
    return 0


EXIT_INTERNAL = 70         # EX_SOFTWARE: a bug in meshbake, not in the recipe


# the recipe key behind each build step of runtime/parallel.py (an error there traces back to it)
_STAGE_PATHS = {"process group": "mesh", "mesh": "mesh", "model": "model.config", "cp": "mesh.cp", "tp": "tp.plan",
                "lora": "lora", "ac": "train.activation_checkpointing", "compile": "train.compile",
                "fsdp": "mesh.dp_shard"}


def _dryrun(res, args) -> int:
    """Exit 0: every rank built and rank 0 holds exactly the estimated (trainable) parameters; 1: a count
    differs from the estimate; 2: the build fails (the job would fail at start-up)."""
    import json

    from meshbake.compiler.placements import DTYPE_BYTES
    from meshbake.runtime.dryrun import dryrun

    t0 = time.perf_counter()
    out = dryrun(res.plan, [int(r) for r in args.ranks.split(",")])
    est = res.estimate
    want = {"params": est.params_per_rank, "param_bytes": est.params_bytes,
            "trainable": est.grads_bytes // DTYPE_BYTES[res.recipe.model.dtype]}   # grads: one per trainable
    for r in out:
        if r["ok"] and r["rank"] == 0:
            r["estimate"] = want
            r["matches_estimate"] = all(r[k] == v for k, v in want.items())
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"world": res.plan.mesh.world, "seconds": round(seconds, 2), "ranks": out}, indent=1))
    failed = [r for r in out if not r["ok"]]
    if failed:
        errs = tuple(RecipeError(_STAGE_PATHS.get(r["stage"], "mesh"), f"rank {r['rank']} of {res.plan.mesh.world}: "
                                 f"building the model fails at the {r['stage']} step: {r['error']}",
                                 "the job would stop here at start-up; change the recipe value named") for r in failed)
        return _report(Err(errs), args.recipe)
    if not args.json:
        for r in out:
            cmp = ""
            if "estimate" in r:
                cmp = (" = estimate" if r["matches_estimate"] else
                       f" != estimate {r['estimate']['params']:,} params ({r['estimate']['trainable']:,} trainable) / "
                       f"{fmt_bytes(r['estimate']['param_bytes'])}")
            print(f"rank {r['rank']:>5}: {r['params']:,} params ({r['trainable']:,} trainable), "
                  f"{fmt_bytes(r['param_bytes'])} allocated{cmp}")
        print(f"dry run of world {res.plan.mesh.world}: {len(out)} rank(s) built in {seconds:.1f} s")
    return 0 if all(r.get("matches_estimate", True) for r in out) else 1


def _suggest(args, t0: float) -> int:
    """Every candidate through the compiler's own stages; the recipe's own choice may be infeasible."""
    import json

    from meshbake.compiler import load
    from meshbake.compiler.suggest import suggest_dict, to_json

    d = load.load_recipe(args.recipe, tuple(args.overrides), args.cluster)
    s = d if isinstance(d, Err) else suggest_dict(d)
    if isinstance(s, Err):
        return _report(s, args.recipe)
    if args.json:
        print(json.dumps({**to_json(s), "seconds": round(time.perf_counter() - t0, 2)}, indent=1))
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
    # rep x shard x cp x tp in one column, so the table and its reasons fit 80 columns
    for h in ("#", "mesh", "AC", "mbs", "SP/LP", "per rank", "tok/s/GPU", "MFU", "why not first"):
        t.add_column(h, no_wrap=h != "why not first", overflow="fold" if h == "why not first" else "ellipsis")
    def cells(k, *rest: str) -> list[str]:
        pp = f"pp{k.pp} {'I' if k.stages_per_rank > 1 else ''}1F1B " if k.pp > 1 else ""
        ep = f" ep{k.ep}" if k.ep > 1 else ""
        return [_con(x) for x in (f"{pp}{k.dp_replicate}x{k.dp_shard}x{k.cp}x{k.tp}{ep}", k.activation_checkpointing,
                                  str(k.micro_batch_size),
                                  f"{int(k.sequence_parallel)}/{int(k.loss_parallel)}" if k.tp > 1 else "-", *rest)]

    def row(i: int, r) -> None:
        t.add_row(f"{i}*" if r.cand == s.own else str(i),
                  *cells(r.cand, fmt_bytes(r.mem_bytes), f"{r.tokens_per_s_gpu:,.0f}", f"{r.mfu:.1%}",
                         r.lost_because or "best"))

    top = max(0, args.top)
    for i, r in enumerate(s.ranked[:top], 1):
        row(i, r)
    # the recipe's own choice always has its row: ranked below --top, or why it is infeasible
    own_i, own_x = s.own_rank, s.own_dropped
    if own_i is not None and own_i > top:
        t.add_row("...", *[""] * 8)
        row(own_i, s.ranked[own_i - 1])
    elif own_i is None:
        t.add_row("-*", *cells(s.own, "-", "-", "-", f"infeasible: {own_x.path}: {own_x.reason}" if own_x
                               else "not enumerated"))
    con.print("mesh = \\[pp N schedule] dp_replicate x dp_shard x cp x tp \\[ep N: experts over N ranks of dp_shard x "
              "cp x tp] (I1F1B: Interleaved1F1B, 2 stages per rank); * = the recipe's own choice; why not first = step time "
              "beyond #1 in ms (%), split by term in ms; step-time model and its assumptions: compiler/suggest.py")
    con.print(t)
    if s.device == "cuda":
        from meshbake.compiler.perf import band_line

        con.print(f"how sure: the datasheet step-time model is within {band_line()}")
    if s.device != "cuda":
        con.print(f"[yellow]note[/] cluster.device is {_con(s.device)}: the ranking uses the cluster's hardware keys "
                  "(peak_tflops, *_gbps; H100 defaults unless set), not this machine")
    gap = "" if own_i is None else (" (the best)" if own_i == 1 else
                                    f" ({s.slower_than_best(s.ranked[own_i - 1]):.1%} slower than #1)")
    con.print(f"{len(s.ranked)} feasible, {len(s.dropped)} dropped of world {s.world}; the recipe's own choice: "
              + (f"#{own_i}{gap}" if own_i else f"infeasible ({_con(own_x.path)}: {_con(own_x.reason)})" if own_x
                 else "not enumerated")
              + f" ({time.perf_counter() - t0:.1f} s; --json lists every candidate with its reason)")
    return 0


def _without_torchao() -> None:
    """suggest builds one meta-device model and quantizes nothing, but transformers' quantizers
    import torchao whenever it is installed (the qlora extra), with its kernel libraries' load
    warnings: `import torch, transformers.models.llama.modeling_llama` took 5.29 / 6.52 CPU-s with
    it, 4.80 / 5.67 without (two pairs on a loaded 2-core machine: ~10%). A None entry in
    sys.modules is Python's way to make
    `import torchao` fail and importlib.util.find_spec("torchao") return None, so transformers
    takes it as not installed. Only in a process that runs this one command (the console script,
    `python -m meshbake.compiler`): main(argv) from a longer-lived process (the tests) keeps it."""
    sys.modules.setdefault("torchao", None)


# the commands that only compile: one meta-device model and a few thousand small frozen objects
_COMPILE_ONLY = ("check", "plan", "suggest", "bundle")


def _without_collector() -> None:
    """A compile-only command's own process runs without Python's cyclic garbage collector.
    Importing torch and transformers leaves ~350,000 tracked objects, and every full collection
    walks all of them: 7 full collections in a `suggest` of Llama-3.1-70B on 64 GPUs took 0.79 s,
    the shutdown's collections ~0.9 s more (cold: suggest 6.8 -> 4.9 s, check and bundle 5.2 ->
    3.5 s). The compiler makes little cyclic garbage (peak RSS of that suggest 443 -> 452 MB,
    check and bundle 426 -> 434 MB; the bundle is byte-identical). main() freezes what is
    left before it returns (gc.freeze: the shutdown collections skip it); the OS takes the memory
    back. Only where the process runs this one command (the console script, `python -m
    meshbake.compiler`): main(argv) from a longer-lived process (the tests) keeps the collector."""
    gc.disable()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if argv is None and args.cmd == "suggest":
        _without_torchao()
    if argv is None and args.cmd in _COMPILE_ONLY:
        _without_collector()
        try:
            return _main(args)
        finally:
            gc.freeze()
    return _main(args)


def _main(args) -> int:
    if args.cmd == "report":
        from meshbake.compiler.report import main as report_main
        return report_main(args.run_dir, args.out)
    if args.cmd == "import":
        from meshbake.compiler.importers.cli import import_main
        return import_main(args)
    if args.cmd == "calibrate":
        from meshbake.compiler.calibrate import calibrate_main
        return calibrate_main(args)
    if args.cmd == "export":
        from meshbake.runtime.export import main as export_main
        argv2 = ([args.run_dir, "-o", args.out] + ([] if args.step is None else ["--step", str(args.step)])
                 + (["--force"] if args.force else []))
        return export_main(argv2)
    try:
        return _verify(args.bundle_dir) if args.cmd == "verify" else _compile_cmd(args)
    except Exception as e:      # noqa: BLE001 last resort: every recipe mistake is a RecipeError
        import os
        if os.environ.get("MESHBAKE_DEBUG"):
            raise
        what = args.bundle_dir if args.cmd == "verify" else args.recipe
        print(f"meshbake: internal error ({type(e).__name__}: "
              f"{printable(str(e).splitlines()[0][:300]) if str(e) else ''}) while compiling {printable(what)}; "
              "this is a meshbake bug: please report it with the recipe (MESHBAKE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


EXIT_DIFFERS, EXIT_NOT_A_BUNDLE = 1, 3


def _verify(bundle_dir: str) -> int:
    """Recompile BUNDLE_DIR from its recipe.yaml (here, in this working directory: the recipe's
    relative paths mean what they meant to `meshbake bundle` run from the same place) and compare
    every file. 0 identical, 1 any byte differs, 2 the recipe does not compile, 3 not a bundle."""
    import json

    from meshbake.compiler import load
    from meshbake.compiler.pipeline import resolve_dict
    from meshbake.compiler.plan import versions
    from meshbake.compiler.render import render_bundle
    from meshbake.compiler.verify import differences, is_bundle, read_bundle, version_mismatch

    shown = printable(bundle_dir)
    try:
        files = read_bundle(bundle_dir)
    except OSError as e:
        print(f"meshbake verify: cannot read {shown} ({printable(e.strerror or e)})", file=sys.stderr)
        return EXIT_NOT_A_BUNDLE
    if not is_bundle(files):
        print(f"meshbake verify: {shown} is not a bundle (no recipe.yaml and plan.json files in it)", file=sys.stderr)
        return EXIT_NOT_A_BUNDLE
    source = f"{bundle_dir.rstrip('/')}/recipe.yaml"
    try:
        recorded = json.loads(files["plan.json"]).get("versions")
    except (ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        print(f"meshbake verify: {shown}/plan.json records no versions; comparing anyway", file=sys.stderr)
    else:
        off = version_mismatch(recorded, versions())
        if off:
            print(f"meshbake verify: {shown} was compiled with {', '.join(off)}: the recompiled bundle differs at "
                  "least in plan.json and PLAN.md; install the recorded versions to verify it", file=sys.stderr)
    try:
        text = files["recipe.yaml"].decode("utf-8")
    except UnicodeDecodeError as e:
        return _report(Err((RecipeError("$", f"recipe.yaml is not UTF-8 text (byte {e.start})", "recompile the "
                                        "bundle with meshbake bundle"),)), source)
    # the normalized recipe already holds every cluster key of its profile (the recipe wins over
    # the profile for each key), so the profile file is not read again: the bundle verifies
    # without clusters/ and a changed profile cannot change the result
    d = load.parse_yaml(text, source)
    res = d if isinstance(d, Err) else resolve_dict(d)
    if isinstance(res, Err):
        return _report(res, source)
    diffs = differences(files, render_bundle(res))
    for diff in diffs:
        print("\n".join(diff.lines()))
    if diffs:
        print(f"meshbake verify: {len(diffs)} path{'s' if len(diffs) != 1 else ''} of {shown} differ from what its "
              "recipe.yaml compiles to", file=sys.stderr)
        return EXIT_DIFFERS
    print(f"{shown}: identical to what its recipe.yaml compiles to ({len(files)} files)")
    return 0


def _compile_cmd(args) -> int:
    t0 = time.perf_counter()
    if args.cmd == "bundle":             # refuse a bad -o before the 3 s of resolving
        from meshbake.compiler.bundle import check_target
        refused = check_target(args.out)
        if refused is not None:
            return _report(Err((refused,)), args.recipe)
    if args.cmd == "suggest":
        return _suggest(args, t0)
    if args.cmd == "pull":
        from meshbake.compiler.pull import pull_main
        return pull_main(args)
    res = _resolve(args)
    if isinstance(res, Err):
        return _report(res, args.recipe)
    if args.cmd == "check":
        _summary(res)
        if res.plan.train.steps is None:
            print(epochs_line(res.plan))
        if res.weights is not None:            # model.weights' headers: verified, or why not (one line)
            print(printable(res.weights.text))
        print(runnable_line(res))
        return 0
    if args.cmd == "prepare":
        return _prepare(res, args.quiet)
    if args.cmd == "dryrun":
        return _dryrun(res, args)
    if args.cmd == "plan":
        from meshbake.runtime.plan import dumps
        sys.stdout.write(dumps(res.plan))
        return 0
    from meshbake.compiler.bundle import write_bundle
    from meshbake.compiler.render import render_bundle

    out = write_bundle(render_bundle(res), args.out)
    if isinstance(out, Err):
        return _report(out, args.recipe)
    _summary(res)
    print(f"wrote {printable(out)}/ ({time.perf_counter() - t0:.1f} s)")
    return 0


__all__ = ["main", "RecipeError"]
