"""``clinfusediff evaluate``: every modality subset x every method x seeds, from checkpoints."""

from __future__ import annotations

import argparse

HELP = "all-subsets robustness evaluation of trained checkpoints (mean, attention, diffusion, +TTT)"
DESCRIPTION = (
    "Evaluate every one of the 2^M-1 modality subsets for every method over several seeds, from "
    "cached encoder features. --checkpoint takes a training output folder (<fusion>/best.pt inside; "
    "several folders = several training seeds) or name=path.pt pairs, e.g. --checkpoint "
    "mean=a.pt attention=b.pt diffusion=c.pt (a diffusion checkpoint gives diffusion and "
    "diffusion+ttt). Scores the training split's test part (--part val: its validation part); "
    "prints how many patients each part has. Writes results.json (docs/RESULTS_SCHEMA.md), "
    "results.csv, results.md, PNG plots and predictions.csv (one row per seed x method x subset "
    "x patient: prob_* / risk / value, uncertainty, the modalities used and the outcome, to score "
    "with your own tools) into --out."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="SPEC",
                   help="RUN_DIR | name=path.pt | path.pt (repeatable)")
    p.add_argument("--data", default=None, help="cohort folder (default: the training run's cohort)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/evaluation)")
    p.add_argument("--seeds", type=int, default=3,
                   help="evaluation seeds when one run is given (default 3)")
    p.add_argument("--samples", type=int, default=None, help="K diffusion samples (default: config)")
    p.add_argument("--no-ttt", action="store_true", help="skip diffusion+TTT")
    p.add_argument("--part", default="test", choices=["test", "val"],
                   help="split part to evaluate (val for tuning; default test)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--chunk-size", type=int, default=1024, help="episodes per batched call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="evaluate checkpoints whose training did not finish (refused by default; "
                        "each is named in the output)")
    p.add_argument("--no-progress", action="store_true", help="quiet")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..evaluation.protocol import evaluate_checkpoints, resolve_checkpoints
    from ..utils import check_output_dir

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = args.out
    if out is None:
        first = next(iter(resolve_checkpoints(args.checkpoint)[0].values()))
        out = Path(first).resolve().parent.parent / "evaluation"
    check_output_dir(out, "--out")  # before the (long) evaluation
    evaluate_checkpoints(
        args.checkpoint, out, data_root=args.data, seeds=args.seeds, samples=args.samples,
        ttt=not args.no_ttt, device=args.device, part=args.part, chunk_size=args.chunk_size,
        show_progress=not args.no_progress, allow_unfinished=args.allow_unfinished,
    )
    print(f"results in {out}")
    return 0
