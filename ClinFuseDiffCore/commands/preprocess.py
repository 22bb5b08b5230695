"""``clinfusediff preprocess``: preprocess a cohort into the content-addressed cache."""

from __future__ import annotations

import argparse

HELP = "preprocess a cohort folder into a cache (canonical RAS, resample, mask, crop, normalise)"
DESCRIPTION = (
    "Find the patients under --data (generic or BraTS layout), preprocess every image modality "
    "with the config's preprocessing section and store the results in the cache folder --out "
    "(keyed by input file contents and parameters: a second run reuses them, a changed file or "
    "parameter is rebuilt). Ends with a summary of what was built, reused and skipped, and why. "
    "Input folders are only read."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="cohort folder (overrides data.root)")
    p.add_argument("--out", default=None,
                   help="cache folder (default: data.cache_dir, else "
                        "<experiment.output_dir>/cache)")
    p.add_argument("--config", default="demo",
                   help="YAML path or a name in Resources/Configs (default: demo)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides, "
                                                "e.g. preprocessing.spacing=[2,2,2]")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from ..config import load_config
    from ..data.cache import build_cache
    from ..data.discovery import discover_patients
    from ..utils import check_output_dir

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.root={args.data}")
    cfg = load_config(args.config, overrides)
    if cfg.data.root is None:
        raise ValueError("no cohort folder: give --data DIR (or data.root=DIR); `clinfusediff "
                         "synth` writes a synthetic one")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give 1 or more")
    out = Path(args.out or cfg.data.cache_dir or Path(cfg.experiment.output_dir) / "cache")
    data = Path(cfg.data.root).resolve()
    if out.resolve() == data or data in out.resolve().parents:
        raise ValueError(f"--out {out} is inside the cohort folder {data}; the input folder is "
                         "never written to, choose a cache folder elsewhere")
    check_output_dir(out, "--out")

    records, skips = discover_patients(data, cfg.data.layout, cfg.data.modalities)
    if not records:
        print(f"no usable patient under {data}")
        for s in skips:
            print(f"  skipped {s}")
        return 1
    report = build_cache(records, cfg.preprocessing, out, workers=args.workers,
                         progress=not args.no_progress)

    c = report.counts()
    for s in skips:
        print(f"  skipped {s}")
    for pid, reason in report.failed:
        print(f"  failed {pid}: {reason}")
    # The last line says how many patients are NOT in the cache (also in <out>/index.json).
    print(f"preprocessed {len(records)} patients into {out} in {report.seconds:.1f} s: "
          f"{c['built']} built, {c['hit']} reused from the cache, {c['rebuilt']} rebuilt "
          f"(corrupt entry), {c['failed']} failed (bad patient data, listed above and in "
          f"{Path(out) / 'index.json'}); {len(skips)} folders skipped by discovery")
    return 0 if report.statuses else 1
