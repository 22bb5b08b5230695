"""``clinfusediff benchmark``: the performance benchmark of issue 7 (prints a table, writes JSON)."""

from __future__ import annotations

import argparse

HELP = "measure TTT overhead, sampling cost, batched TTT, preprocessing, training speed (table + JSON)"
DESCRIPTION = (
    "Measure, in one run and on one trained diffusion checkpoint: predict with TTT vs without, "
    "K=8 samples vs 1, DDIM few steps vs DDPM all steps (time and AUROC on the test set), 32 "
    "patients' TTT batched vs one by one, the cost of sampling without TTT (K=8 vs 1, 32 episodes "
    "batched vs one by one, tabular diffusion vs attention per episode), preprocessing vs plain "
    "SimpleITK and cached vs raw loading, training samples/s and peak memory, and the encoder's "
    "share of the measured matrix-multiply rate. Without --run a short model is trained first "
    "in <out>/train. Writes <out>/benchmark.json and benchmark.txt (docs/BENCHMARK.md explains "
    "the rows)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="config name or YAML path (default demo)")
    p.add_argument("--out", default=None, help="output folder (default outputs/benchmark[_quick])")
    p.add_argument("--run", default=None, metavar="DIR",
                   help="a trained run folder with diffusion/best.pt (e.g. <demo out>/train), or a .pt")
    p.add_argument("--checkpoint", default=None, metavar="PT", help="same as --run with a .pt file")
    p.add_argument("--quick", action="store_true", help="tiny cohort/model, few repeats (CI smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["predict", "midl_ttt", "midl_ttt_at_scale", "full_path", "sampling", "batched_ttt", "sampling_cost", "preprocess",
                            "training", "roofline"],
                   help="measurement groups to leave out")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (for the short training)")


def run(args: argparse.Namespace) -> int:
    import json

    from ..benchmark import format_table, run_benchmark

    if args.run and args.checkpoint:
        raise ValueError("give --run DIR or --checkpoint PT, not both")
    out = args.out or ("outputs/benchmark_quick" if args.quick else "outputs/benchmark")
    res = run_benchmark(args.config, out, overrides=args.overrides, run_dir=args.run or args.checkpoint,
                        quick=args.quick, device=args.device, threads=args.threads, skip=args.skip)
    print()
    print(format_table(res))
    print(f"\nwrote {out}/benchmark.json ({json.dumps(res['seconds'], default=lambda x: round(x, 1))[:200]})")
    return 0
