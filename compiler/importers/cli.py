"""`meshbake import axolotl CONFIG.yml [-o RECIPE.yaml]`: read, import, write, then `check` the result.

Exit 0: the recipe was written and passes `meshbake check`. Exit 2: the config cannot be read, it
asks for something meshbake does not train (quantized base weights, QLoRA, QAT: refused, nothing
written), or the recipe was written but does not pass check yet (every reason printed, as `check` would).
"""
from __future__ import annotations

import sys
from pathlib import Path

from meshbake.compiler.errors import Err, RecipeError

EXIT_RECIPE = 2


def _fail(errs: tuple[RecipeError, ...], source: str) -> int:
    from meshbake.compiler.validate import format_errors

    print(f"meshbake import: {len(errs)} problem{'s' if len(errs) != 1 else ''} in {source}:", file=sys.stderr)
    print(format_errors(errs), file=sys.stderr)
    return EXIT_RECIPE


def _read(path: Path):
    from meshbake.compiler import load

    if not path.is_file():
        return Err((RecipeError("$", f"no Axolotl config {str(path)!r}", "give the path of its .yml file"),))
    text = load.read_text(path, "$")
    return text if isinstance(text, Err) else load.parse_yaml(text, str(path))


def check_text(text: str, source: str):
    """The imported recipe through the same pipeline as `meshbake check`: Resolved or Err."""
    from meshbake.compiler.pipeline import resolve_text

    return resolve_text(text, source=source)


def import_main(args) -> int:
    from meshbake.compiler import load
    from meshbake.compiler.importers.axolotl import guess_model, import_axolotl, note_line
    from meshbake.compiler.model import catalog_names

    src = Path(args.config)
    cfg = _read(src)
    if isinstance(cfg, Err):
        return _fail(cfg.errors, args.config)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        return _fail((RecipeError("-o", f"{out} exists", "choose another file or pass --force"),), args.config)
    is_dir = lambda p: Path(p).is_dir()     # noqa: E731
    profile = None
    if args.cluster:
        merged = load.apply_cluster_profile({"cluster": {}}, args.cluster)
        if isinstance(merged, Err):
            return _fail(merged.errors, args.config)
        profile = (args.cluster, merged["cluster"])
    from meshbake.compiler import hub

    ref = args.model or guess_model(cfg.get("base_model_config") or cfg.get("base_model"), catalog_names(), is_dir,
                                    lambda r: hub.read_config(r)[1] is not None)
    model_cfg = load.read_model_config(ref) if ref else None
    imp = import_axolotl(cfg, out.stem if out else src.stem, source=src.name, model_ref=ref,
                         model_config=None if isinstance(model_cfg, Err) else model_cfg,
                         nodes=args.nodes, gpus_per_node=args.gpus_per_node, is_dir=is_dir, profile=profile)
    if imp.refused:
        print(f"meshbake import: {src.name} is refused (no recipe written): {len(imp.refused)} key"
              f"{'s' if len(imp.refused) != 1 else ''} meshbake cannot train as written:", file=sys.stderr)
        for n in imp.refused:
            print(f"  refused      {note_line(n)}", file=sys.stderr)
        return EXIT_RECIPE
    report = sys.stdout
    if out is None:
        sys.stdout.write(imp.text)
        report = sys.stderr
    else:
        try:
            out.write_text(imp.text, encoding="utf-8")
        except OSError as e:
            return _fail((RecipeError("-o", f"cannot write {out} ({e.strerror})", "check the path"),), args.config)
    _print_notes(imp, report)
    res = check_text(imp.text, str(out or "<imported>"))
    where = str(out) if out else "the recipe"
    if isinstance(res, Err):
        print(f"{'wrote ' + str(out) + ': ' if out else ''}{where} does not pass `meshbake check` yet:",
              file=report)
        from meshbake.compiler.validate import format_errors
        print(format_errors(res.errors), file=report)
        return EXIT_RECIPE
    print(f"{'wrote ' + str(out) + '; ' if out else ''}it passes `meshbake check` (world {res.plan.mesh.world}, "
          f"{res.estimate.total_bytes / 1e9:,.1f} GB per rank)", file=report)
    return 0


def _print_notes(imp, f) -> None:
    from meshbake.compiler.importers.axolotl import STATUSES, note_line, shown

    print(f"{len(imp.notes)} Axolotl keys: " + ", ".join(f"{imp.count(s)} {s}" for s in STATUSES if imp.count(s)),
          file=f)
    for s in STATUSES:
        if s == "empty":
            keys = [shown(n.key) for n in imp.notes if n.status == s]
            if keys:
                print(f"  {'empty':<12} {', '.join(keys)}", file=f)
            continue
        for n in (n for n in imp.notes if n.status == s):
            print(f"  {s:<12} {note_line(n, reason=s != 'mapped')}", file=f)
