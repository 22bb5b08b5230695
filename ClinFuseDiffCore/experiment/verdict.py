"""The verdict of a finished sweep: hierarchical-bootstrap tables, diagnostics, results.json/.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..utils import atomic_write_json, atomic_write_text
from .data import ArrayCohort

SCHEMA = "clinfusediff.experiment/1"
SUMMARIES = ("mean_over_subsets", "p10_over_subsets", "mean_singletons", "full_set", "image_only", "hurt_rate")


def _auroc(p: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def collect_scores(out: Path, sweep, part: str) -> tuple[dict[str, np.ndarray], dict[str, list[dict]]]:
    """method -> (R, S, P) scores of ``part`` over every (stage-1 seed, seed) unit; and metadata."""
    scores: dict[str, list[np.ndarray]] = {}
    metas: dict[str, list[dict]] = {}
    for m in sweep.methods:
        if m == "oracle_hidden":
            z = np.load(out / "oracle_hidden.npz")
            scores[m] = [z[part]]
            metas[m] = [json.loads(str(z["meta"]))]
            continue
        for s1 in sweep.stage1_seeds:
            for r in sweep.seeds:
                z = np.load(out / f"s1_{s1}" / m / f"seed{r}.npz")
                scores.setdefault(m, []).append(z[part])
                meta = json.loads(str(z["meta"]))
                if "test_sample_std" in z.files and part == "test":
                    meta["_sample_std"] = z["test_sample_std"]
                metas.setdefault(m, []).append(meta)
    return {m: np.stack(v).astype(np.float64) for m, v in scores.items()}, metas


def write_verdict(out: Path, cfg, sweep, data: ArrayCohort, subsets: list[tuple[str, ...]], ded: list[int], *,
                  wall_seconds: float, data_seconds: float,
                  progress: Optional[Callable[[str], None]] = None, title: Optional[str] = None) -> dict[str, Any]:
    from ..evaluation.stats import hierarchical_bootstrap, summary_table_markdown

    y_test = data.labels[data.parts["test"]]
    y_val = data.labels[data.parts["val"]]
    test, metas = collect_scores(out, sweep, "test")
    val, _ = collect_scores(out, sweep, "val")
    image_only = [i for i, s in enumerate(subsets) if all(m in data.image_modalities for m in s)]
    groups = {"image_only": image_only}
    if any(m.endswith("_unseen") for m in sweep.methods) and getattr(sweep, "unseen", None):
        unseen = {frozenset(c) for c in sweep.unseen}
        groups["unseen"] = [i for i, s in enumerate(subsets) if frozenset(s) in unseen]
    main_methods = {m: v for m, v in test.items() if m != "dedicated"}
    if progress:
        progress(f"bootstrap: {len(main_methods)} methods x {len(subsets)} subsets x {len(y_test)} patients "
                 f"x {sweep.n_boot} resamples")
    main = hierarchical_bootstrap(main_methods, y_test, subsets, data.modalities, reference=sweep.reference,
                                  n_boot=sweep.n_boot, seed=sweep.cohort_seed, subset_groups=groups)
    ded_table = None
    if "dedicated" in test:
        sub = [subsets[j] for j in ded]
        ded_scores = {m: v[:, ded, :] for m, v in test.items()}
        ded_groups = {"image_only": [k for k, j in enumerate(ded) if j in set(image_only)]}
        ded_table = hierarchical_bootstrap(ded_scores, y_test, sub, data.modalities, reference=sweep.reference,
                                           n_boot=sweep.n_boot, seed=sweep.cohort_seed, subset_groups=ded_groups)

    # Validation: the sampler choice (point estimates; selection uses validation data only).
    val_summary = {}
    for m, v in val.items():
        per_seed = [float(np.nanmean([_auroc(v[r, s], y_val) for s in range(v.shape[1]) if np.isfinite(v[r, s]).all()]))
                    for r in range(v.shape[0])]
        val_summary[m] = {"mean_over_subsets": float(np.mean(per_seed)), "per_seed": per_seed}

    # Diagnostics: imputation cosine by subset size, sample spread, does the spread flag errors?
    diagnostics: dict[str, Any] = {}
    for m, ms in metas.items():
        d = [x["diagnostics"] for x in ms if "diagnostics" in x]
        entry: dict[str, Any] = {}
        if d:
            entry["cosine_to_full_by_size"] = np.mean([x["cosine_to_full_by_size"] for x in d], 0).round(4).tolist()
            entry["sample_pair_cosine_by_size"] = np.mean([x["sample_pair_cosine_by_size"] for x in d], 0).round(4).tolist()
            if all("token_cosine_by_size" in x for x in d):  # per-modality token imputers
                # sizes 1..M-1 (a full set imputes nothing)
                M1 = len(data.modalities) - 1
                entry["token_cosine_by_size"] = np.mean([x["token_cosine_by_size"][:M1] for x in d], 0).round(4).tolist()
                entry["token_cosine_of_mean_token"] = round(float(np.mean([x["token_cosine_of_mean_token"] for x in d])), 4)
        stds = [x["_sample_std"] for x in ms if "_sample_std" in x]
        if stds:
            au, corr = [], []
            for r, sd in enumerate(stds):
                p = test[m][r]
                wrong = ((p > 0.5).astype(int) != y_test[None, :]).astype(int)  # (S, P)
                au.append(_auroc(sd.ravel(), wrong.ravel()))
                sizes = np.array([len(s) for s in subsets])
                corr.append([float(sd[sizes == k].mean()) for k in range(1, len(data.modalities) + 1)])
            entry["error_auroc_of_sample_std"] = float(np.mean(au))
            entry["mean_sample_std_by_size"] = np.mean(corr, 0).round(5).tolist()
        for k in ("chosen", "val_accept_rate", "val_hurt_rate_accepted", "val_hurt_rate_rejected",
                  "val_updates", "val_hurt", "test_accept_rate", "test_mean_abs_change"):
            if any(k in x for x in ms):  # TTT: chosen settings and what the acceptance rule did, per seed
                entry[f"{k}_per_seed"] = [x.get(k) for x in ms]
        entry["train_seconds_mean"] = float(np.mean([x.get("seconds", np.nan) for x in ms]))
        if any("final_loss" in x for x in ms):
            entry["final_loss_mean"] = float(np.mean([x["final_loss"] for x in ms if "final_loss" in x]))
        diagnostics[m] = entry

    result = {
        "schema": SCHEMA,
        "n_patients": {k: int(len(v)) for k, v in data.parts.items()},
        "modalities": data.modalities,
        "settings": {"config": cfg.to_dict(), "sweep": asdict(sweep)},
        "wall_seconds": round(float(wall_seconds), 1),
        "data_seconds": round(float(data_seconds), 1),
        "verdict": main,
        "dedicated": ded_table,
        "dedicated_subsets": [list(subsets[j]) for j in ded],
        "validation": val_summary,
        "diagnostics": diagnostics,
    }
    atomic_write_json(out / "results.json", result)
    md = [f"# {title}" if title else
          f"# Research experiment — {len(y_test)} test patients, {len(sweep.seeds)} training seeds x "
          f"{len(sweep.stage1_seeds)} stage-1 seed(s), {len(subsets)} subsets",
          "",
          f"Wall time {wall_seconds / 60:.1f} min (data {data_seconds / 60:.1f} min). 95% intervals: "
          f"hierarchical bootstrap over training seeds x test patients ({sweep.n_boot} resamples); "
          f"differences are paired against `{sweep.reference}` (same patients in every resample).",
          "", "## All subsets", "",
          summary_table_markdown(main, summaries=SUMMARIES + (("unseen",) if "unseen" in groups else ())), ""]
    if "unseen" in groups:
        md += [f"`unseen`: mean AUROC over the {len(groups['unseen'])} combinations the *_unseen methods never "
               f"trained on ({', '.join('+'.join(subsets[i]) for i in groups['unseen'])}); every other method "
               "trained on them.", ""]
    if ded_table is not None:
        md += ["## On the subsets with a dedicated model "
               f"({len(ded)}: the singletons, the full set and {len(ded) - len(data.modalities) - 1} drawn at random)", "",
               summary_table_markdown(ded_table, summaries=("mean_over_subsets", "mean_singletons", "full_set")), ""]
    md += ["## Validation (mean AUROC over subsets; the sampler is chosen here)", "",
           "| method | mean over subsets | per seed |", "|---|---|---|"]
    md += [f"| {m} | {v['mean_over_subsets']:.3f} | {', '.join(f'{x:.3f}' for x in v['per_seed'])} |"
           for m, v in val_summary.items()]
    md += ["", "## Diagnostics", "", "```", json.dumps(diagnostics, indent=1), "```", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    return result
