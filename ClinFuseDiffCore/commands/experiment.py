"""``clinfusediff experiment``: the powered research experiment (every method, every subset)."""

from __future__ import annotations

import argparse

HELP = "run the research experiment: every fusion method and reference, powered, resumable"
DESCRIPTION = (
    "Generate (or reuse) a large synthetic cohort (sweep.n_train / n_val / n_test patients), "
    "preprocess it in parallel, train the encoders once per stage-1 seed, train every method "
    "(sweep.methods) on the frozen tokens over sweep.seeds, evaluate every modality subset on the "
    "test patients, and write the verdict (results.json, results.md) with hierarchical-bootstrap "
    "intervals over training seeds x patients. Killed runs continue where they stopped: rerun "
    "the same command. Settings: Resources/Configs/research.yaml (sections of the product config "
    "plus 'sweep'); override any key with --set section.key=value."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="research", help="research YAML (default: research)")
    p.add_argument("--out", default="outputs/research", help="experiment folder (default outputs/research)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config or sweep value, e.g. --set sweep.n_test=500 (repeatable)")
    p.add_argument("--external", metavar="COHORT",
                   help="instead of the sweep: score the finished sweep's attention-based models (and MiDl "
                        "TTT) on this external cohort, e.g. one made with 'clinfusediff synth --site-shift "
                        "strong' or 'severe'; its first site tunes TTT, the other sites test. "
                        "Writes into --external-out")
    p.add_argument("--external-out", metavar="DIR",
                   help="folder for --external (default: <out>/external_<cohort folder name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--units-only", action="store_true", help=argparse.SUPPRESS)  # a worker of sweep.jobs


def run(args: argparse.Namespace) -> int:
    from ..experiment.settings import load_research_config
    from ..experiment.sweep import run_sweep

    cfg, sweep = load_research_config(args.config, args.overrides)
    if args.external:
        from pathlib import Path

        from ..experiment.external import run_external

        ext = Path(args.external)
        if not ext.is_dir():
            raise SystemExit(f"clinfusediff experiment: error: --external {ext} is not a folder; give a cohort folder")
        dest = Path(args.external_out) if args.external_out else Path(args.out) / f"external_{ext.name}"
        run_external(cfg, sweep, args.out, ext, dest, progress=not args.no_progress)
        _print_markdown(dest / "results.md")
        print(f"clinfusediff experiment: external verdict in {dest}/results.json and results.md")
        return 0
    res = run_sweep(cfg, sweep, args.out, progress=not args.no_progress, units_only=args.units_only)
    if args.units_only:
        return 0
    from pathlib import Path

    _print_markdown(Path(args.out) / "results.md")
    print(f"clinfusediff experiment: done in {res['wall_seconds'] / 60:.1f} min; "
          f"verdict in {args.out}/results.json and results.md")
    return 0


def _print_markdown(path) -> None:
    import sys

    text = path.read_text(encoding="utf-8")
    enc = sys.stdout.encoding or "utf-8"
    print(text.encode(enc, errors="replace").decode(enc))  # an ASCII terminal gets '?' for Δ
