"""The earlier laptop-scale experiments (issue 5 item 5) on a demo run; results in docs/RESULTS.md.

Superseded as the method comparison by ``clinfusediff experiment`` (the powered research
experiment, ``ClinFuseDiffCore/experiment/``); kept here because it still reproduces
docs/RESULTS.md and its unseen-combination and site-shift runs, which that command does not run.

Every experiment starts from the main run that ``clinfusediff demo --out BASE`` wrote (its cohort,
preprocessing cache, split and stage-1 encoders), so the numbers of all experiments refer to the
same synthetic cohort:

* ``main`` (claims a and d): no new training; tables from ``BASE/eval/results.json`` — every
  modality subset for mean / attention / diffusion / diffusion+TTT (mean, worst subset, drop vs
  full, hurt rate, 95% intervals over seeds), uncertainty and ECE per number of available
  modalities.
* ``unseen`` (claim b, ``unseen.yaml`` beside this file): the fusions (stage 2) are re-trained with
  ``data.excluded_combinations`` (never drawn by modality dropout) on the main run's encoders and
  split, then evaluated on every subset: seen vs unseen combinations.
* ``site`` (claim c, ``site.yaml`` beside this file): the whole two-stage training is repeated on the
  patients of the training sites only (``site.train_sites``; val drawn from them), and the test
  part is every patient of the held-out site (``site.test_sites``, read from ``manifest.csv``).

Usage::

    python training/demo_experiments/run_experiment.py main   --base outputs/demo
    python training/demo_experiments/run_experiment.py unseen --base outputs/demo --out outputs/experiments/unseen
    python training/demo_experiments/run_experiment.py site   --base outputs/demo --out outputs/experiments/site

Each run writes ``<out>/eval/results.{json,md,csv}`` and ``<out>/tables.md`` (the tables in
docs/RESULTS.md). Model choices are made on validation data only (best checkpoint by
``training.monitor`` on the validation part; nothing is selected on test data).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ClinFuseDiffCore.config import Config
from ClinFuseDiffCore.evaluation.protocol import interval
from ClinFuseDiffCore.utils import atomic_write_json, atomic_write_text

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# Config: the main run's config + an experiment YAML (sections merged key by key)
# --------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def experiment_config(base_dir: Path, exp_yaml: Path | None) -> tuple[Config, dict[str, Any]]:
    """The main run's resolved config with the experiment's sections merged in.

    Returns:
        (config, the experiment's own non-config section ``experiment_options`` or {}).
    """
    raw = yaml.safe_load((base_dir / "config.yaml").read_text(encoding="utf-8"))
    opts: dict[str, Any] = {}
    if exp_yaml is not None:
        extra = yaml.safe_load(Path(exp_yaml).read_text(encoding="utf-8")) or {}
        opts = extra.pop("experiment_options", {}) or {}
        raw = _merge(raw, extra)
    train = base_dir / "train"
    raw["data"]["root"] = str(train / "cohort")
    raw["data"]["cache_dir"] = str(train / "cache")
    return Config.from_dict(raw), opts


def site_split(cohort_root: Path, train_sites: list[str], test_sites: list[str], val_fraction: float,
               seed: int, path: Path) -> dict[str, list[str]]:
    """A split whose test part is every patient of ``test_sites`` (manifest.csv ``site``) and whose
    train/val parts are drawn (stratified by label) from ``train_sites``."""
    from ClinFuseDiffCore.data.dataset import make_split

    with open(cohort_root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sites = sorted({r["site"] for r in rows})
    bad = sorted(set(train_sites + test_sites) - set(sites))
    if bad:
        raise ValueError(f"sites {bad} are not in {cohort_root / 'manifest.csv'}; it has {sites}")
    tr = [r for r in rows if r["site"] in train_sites]
    te = sorted(r["patient_id"] for r in rows if r["site"] in test_sites)
    sp = make_split([r["patient_id"] for r in tr], [int(r["label"]) for r in tr], val_fraction, 0.0, seed)
    split = {"train": sorted(sp["train"]), "val": sorted(sp["val"]), "test": te,
             "train_sites": train_sites, "test_sites": test_sites}
    atomic_write_json(path, split)
    return split


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _f(iv: Mapping[str, Any] | None, d: int = 3) -> str:
    if not iv or iv.get("mean") is None or iv["mean"] != iv["mean"]:
        return "–"
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    if lo is None or math.isnan(lo):
        return f"{iv['mean']:.{d}f}"
    return f"{iv['mean']:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def by_size(results: Mapping[str, Any], metric: str) -> dict[str, dict[int, dict[str, float]]]:
    """Per method and number of available modalities: the metric averaged over the subsets of
    that size, one value per seed, then mean and 95% interval over seeds."""
    sizes = {k: results["per_subset"][results["methods"][0]][k]["size"] for k in results["subsets"]}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for m in results["methods"]:
        per_size: dict[int, list[float]] = {}
        for s in results["seeds"]:
            rows = results["per_seed"][str(s)][m]
            acc: dict[int, list[float]] = {}
            for k, e in rows.items():
                v = e["metrics"].get(metric)
                if v is not None and not math.isnan(v):
                    acc.setdefault(sizes[k], []).append(v)
            for n, vals in acc.items():
                per_size.setdefault(n, []).append(float(np.mean(vals)))
        out[m] = {n: interval(v) for n, v in sorted(per_size.items())}
    return out


def seen_unseen_by_size(results: Mapping[str, Any], metric: str | None = None) -> list[str]:
    """Seen vs unseen combinations of the same size (only sizes that have both), per method."""
    pm = metric or results["primary_metric"]
    first = results["per_subset"][results["methods"][0]]
    info = {k: (first[k]["size"], first[k]["seen"]) for k in results["subsets"]}
    sizes = sorted({n for n, seen in info.values() if not seen})
    sizes = [n for n in sizes if any(sz == n and seen for sz, seen in info.values())]
    if not sizes:
        return []
    lines = [f"| method | size | {pm} seen | {pm} unseen | unseen - seen |", "|---|---|---|---|---|"]
    for m in results["methods"]:
        for n in sizes:
            seen_v, unseen_v, diff = [], [], []
            for s in results["seeds"]:
                rows = results["per_seed"][str(s)][m]
                a = [rows[k]["metrics"][pm] for k in rows if info[k] == (n, True) and rows[k]["metrics"].get(pm) == rows[k]["metrics"].get(pm)]
                b = [rows[k]["metrics"][pm] for k in rows if info[k] == (n, False) and rows[k]["metrics"].get(pm) == rows[k]["metrics"].get(pm)]
                if a and b:
                    seen_v.append(float(np.mean(a)))
                    unseen_v.append(float(np.mean(b)))
                    diff.append(unseen_v[-1] - seen_v[-1])
            lines.append(f"| {m} | {n} | {_f(interval(seen_v))} | {_f(interval(unseen_v))} | {_f(interval(diff))} |")
    return lines


def summary_table(results: Mapping[str, Any], metric: str | None = None) -> list[str]:
    pm = metric or results["primary_metric"]
    lines = [(f"| method | {pm} mean over subsets | worst subset | full set | drop vs full | "
             "adding a modality hurts (rate) | seen | unseen |"), "|---|---|---|---|---|---|---|---|"]
    for m in results["methods"]:
        s = results["summary"][m][pm]
        lines.append(f"| {m} | {_f(s['mean'])} | {_f(s['worst'])} | {_f(s['full'])} | {_f(s['drop_vs_full'])} "
                     f"| {_f(s['harm_rate'])} | {_f(s['seen_mean'])} | {_f(s['unseen_mean'])} |")
    return lines


def size_table(results: Mapping[str, Any], metric: str, title: str) -> list[str]:
    tab = by_size(results, metric)
    sizes = sorted({n for m in tab.values() for n in m})
    lines = [f"| {title} | " + " | ".join(f"{n} available" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for m, row in tab.items():
        lines.append(f"| {m} | " + " | ".join(_f(row.get(n)) for n in sizes) + " |")
    return lines


def uncertainty_table(results: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, title in (("uncertainty_by_size", "std of p(predicted class) over K samples"),
                       ("entropy_by_size", "predictive entropy")):
        tab = results.get(key) or {}
        sizes = sorted({int(n) for m in tab.values() for n in m})
        if not sizes:
            continue
        lines += [f"| {title} | " + " | ".join(f"{n} available" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for m, row in tab.items():
            lines.append(f"| {m} | " + " | ".join(_f(row.get(str(n)), 4) for n in sizes) + " |")
        lines.append("")
    return lines


def ttt_line(results: Mapping[str, Any]) -> list[str]:
    ex = (results.get("method_extra") or {}).get("diffusion+ttt") or {}
    if not ex.get("episodes"):
        return []
    return [(f"TTT: {int(ex['episodes'])} episodes, {ex.get('steps', 0):g} steps, "
            f"{ex.get('n_params', 0):g} adapted parameters per episode; "
            f"{ex.get('acceptance_rate', 0):.1%} of updates kept; "
            f"{ex.get('adapt_ms_per_episode', 0):.1f} ms per episode (batched).")]


def tables(results: Mapping[str, Any], title: str) -> str:
    n_seeds = len(results["seeds"])
    lines = [f"### {title}", "",
             (f"{results['n_patients']} test patients ({results['patients_missing_modalities']} with really "
             f"missing modalities), {len(results['subsets'])} subsets; mean [95% t-interval over "
             f"{n_seeds} seeds: {results.get('seed_kind', '')}]."), ""]
    if results.get("excluded_combinations"):
        lines += [f"Excluded from training (unseen): {len(results['excluded_combinations'])} combinations.", ""]
    lines += summary_table(results) + [""]
    comp = results.get("comparisons") or {}
    if comp:
        pm = results["primary_metric"]
        lines += [f"Paired differences in {pm} ({results['reference_method']} minus each; same seeds):", "",
                  "| comparison | mean over subsets | worst subset | full set |", "|---|---|---|---|"]
        for name, c in comp.items():
            d = c.get(pm, {})
            lines.append(f"| {name} | {_f(d.get('mean'))} | {_f(d.get('worst'))} | {_f(d.get('full'))} |")
        lines.append("")
    lines += ttt_line(results) + [""]
    return "\n".join(lines)


def uncertainty_tables(results: Mapping[str, Any]) -> str:
    lines = ["### Uncertainty and calibration by number of available modalities", ""]
    lines += uncertainty_table(results)
    lines += size_table(results, "ece", "ECE (10 bins) ↓") + [""]
    lines += size_table(results, results["primary_metric"], results["primary_metric"] + " ↑") + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def evaluate(run_dir: Path, root: str, seeds: int, part: str = "test") -> dict[str, Any]:
    from ClinFuseDiffCore.evaluation.protocol import evaluate_checkpoints

    results, _ = evaluate_checkpoints([str(run_dir)], run_dir / ("eval" if part == "test" else f"eval_{part}"),
                                      data_root=root, seeds=seeds, ttt=True, part=part)
    return results


def run_unseen(base: Path, out: Path, exp_yaml: Path, seeds: int) -> str:
    from ClinFuseDiffCore.config import save_config
    from ClinFuseDiffCore.data.dataset import prepare_cohort
    from ClinFuseDiffCore.training.trainer import train

    cfg, _ = experiment_config(base, exp_yaml)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_file=str(base / "train" / "split.json")))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    cohort = prepare_cohort(cfg, out)
    enc = base / "train" / "encoders" / "best.pt"
    val = {}
    for fusion in cfg.training.fusions:
        cf = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fusion=fusion))
        r = train(cf, out / fusion, cohort=cohort, encoder_checkpoint=enc)
        val[fusion] = r.best_metric
    results = evaluate(out, cfg.data.root, seeds)
    text = tables(results, "(b) Unseen combinations")
    text += "\n".join(["Seen vs unseen combinations of the same size:", ""] + seen_unseen_by_size(results)) + "\n"
    text += "\nValidation " + cfg.training.monitor + ": " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()) + "\n"
    return text


def run_site(base: Path, out: Path, exp_yaml: Path, seeds: int) -> str:
    from ClinFuseDiffCore.config import save_config
    from ClinFuseDiffCore.training.trainer import train_fusions

    cfg, opts = experiment_config(base, exp_yaml)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data.root)
    split = site_split(root, list(opts["train_sites"]), list(opts["test_sites"]), cfg.data.val_fraction,
                       cfg.experiment.seed, out / "site_split.json")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_file=str(out / "site_split.json")))
    save_config(cfg, out / "config.yaml")
    trained = train_fusions(cfg, out)
    val = {k: r.best_metric for k, r in trained.items()}
    shifted = evaluate(out, str(root), seeds, "test")
    in_dist = evaluate(out, str(root), seeds, "val")
    text = tables(shifted, f"(c) Site shift: test = {', '.join(opts['test_sites'])} "
                           f"({len(split['test'])} patients), trained on {', '.join(opts['train_sites'])}")
    text += "\n" + tables(in_dist, "(c) Same models on the in-distribution validation patients "
                                   "(also used for checkpoint selection, so optimistic)")
    text += "\nValidation " + cfg.training.monitor + ": " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()) + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=["main", "unseen", "site"])
    p.add_argument("--base", default="outputs/demo", help="the clinfusediff demo output folder")
    p.add_argument("--out", default=None, help="output folder (default outputs/experiments/<experiment>)")
    p.add_argument("--config", default=None, help="experiment YAML (default <experiment>.yaml beside this script)")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds (default 3)")
    a = p.parse_args(argv)
    base = Path(a.base)
    if not (base / "config.yaml").is_file() or not (base / "train" / "encoders" / "best.pt").is_file():
        raise SystemExit(f"{base}: not a finished `clinfusediff demo --out {base}` run "
                         "(config.yaml and train/encoders/best.pt needed); run the demo first")
    out = Path(a.out or f"outputs/experiments/{a.experiment}")
    exp_yaml = Path(a.config) if a.config else HERE / f"{a.experiment}.yaml"
    t0 = time.perf_counter()
    if a.experiment == "main":
        results = json.loads((base / "eval" / "results.json").read_text(encoding="utf-8"))
        text = tables(results, "(a) Attention vs diffusion vs diffusion+TTT over all subsets") + "\n" + \
            uncertainty_tables(results)
    elif a.experiment == "unseen":
        text = run_unseen(base, out, exp_yaml, a.seeds)
    else:
        text = run_site(base, out, exp_yaml, a.seeds)
    out.mkdir(parents=True, exist_ok=True)
    text += f"\n_{a.experiment}: {time.perf_counter() - t0:.0f} s wall-clock._\n"
    atomic_write_text(out / "tables.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
