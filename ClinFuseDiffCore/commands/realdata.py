"""``clinfusediff realdata``: real survival cohorts (tabular blocks) in the all-subsets protocol."""

from __future__ import annotations

import argparse

HELP = "real tabular survival cohorts: blocks as modalities, CV x repeats, C-index + td-AUROC"
DESCRIPTION = (
    "Load real survival cohorts shipped in scikit-survival / SurvSet (the optional benchmark "
    "extra: pip install -e '.[benchmark]'), split their columns into modality blocks by meaning, "
    "and run patient-level stratified K-fold CV x repeats: ClinFuseDiff mean/attention fusion "
    "trained with block dropout, and elastic-net Cox baselines (one per subset, mean imputation, "
    "block dropout) tuned by inner CV on training patients; optionally the decoupled diffusion "
    "imputer (cfd_diffusion) and its MSE control (cfd_regressor) on each fold's frozen "
    "cfd_attention teacher. Every non-empty block subset is "
    "evaluated (Harrell's C, td-AUROC at the median time). Writes <out>/results.json and "
    "results.md (docs/REALDATA.md)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", default="whas500,gbsg2,aids",
                   help="comma-separated: whas500,gbsg2,aids,flchain,smarto,nki70 (default "
                        "whas500,gbsg2,aids)")
    p.add_argument("--out", default="outputs/realdata", help="output folder (default outputs/realdata)")
    p.add_argument("--folds", type=int, default=5, help="CV folds (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="CV repeats (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds, dropout draws, networks")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of cfd_mean,cfd_attention,encox_subset,"
                        "encox_meanimp,encox_dropout,cfd_diffusion,cfd_regressor (default: all "
                        "but cfd_diffusion,cfd_regressor)")
    p.add_argument("--nn-steps", type=int, default=200, help="optimiser steps per network (default 200)")
    p.add_argument("--imputer-steps", type=int, default=4000,
                   help="optimiser steps of the cfd_diffusion / cfd_regressor networks (default 4000, "
                        "the research sweep's)")
    p.add_argument("--imputer-batch", type=int, default=256, help="their batch size (default 256)")
    p.add_argument("--imputer-samples", type=int, default=4,
                   help="K diffusion samples per evaluated row (default 4)")
    p.add_argument("--max-patients", type=int, default=None,
                   help="random subsample of each cohort (smoke runs only)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    import torch

    from ..realdata.run import RunSettings, run_realdata

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    settings = RunSettings(folds=args.folds, repeats=args.repeats, seed=args.seed,
                           nn_steps=args.nn_steps, max_patients=args.max_patients,
                           imputer_steps=args.imputer_steps, imputer_batch=args.imputer_batch,
                           imputer_samples=args.imputer_samples)
    if args.methods:
        settings.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        res = run_realdata(names, args.out, settings, command=shlex.join(["clinfusediff", *sys.argv[1:]]),
                           progress=not args.quiet)
    except ImportError as e:
        raise RuntimeError(str(e)) from e
    print(f"wrote {args.out}/results.json and results.md ({res['seconds']:.0f} s)")
    return 0
