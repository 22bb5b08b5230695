"""Write the protocol's results: ``results.json``, ``results.csv``, ``results.md`` and PNG plots.

The results dict comes from ``evaluation.protocol.evaluate_all_subsets``; its fields are
documented in ``docs/RESULTS_SCHEMA.md``. Every file is written atomically. Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..utils import atomic_path, atomic_write_text
from .protocol import HIGHER_IS_BETTER


def _json_safe(o: Any) -> Any:
    """NaN/inf -> None so the JSON is standard (readable by any parser)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (np.floating,)):
        return _json_safe(float(o))
    if isinstance(o, (np.integer,)):
        return int(o)
    return o


def _fmt(iv: Optional[Mapping[str, Any]], digits: int = 3) -> str:
    """``mean [lo, hi]`` of an interval dict; ``–`` when missing."""
    if not iv or iv.get("mean") is None or not math.isfinite(iv["mean"]):
        return "–"
    m = f"{iv['mean']:.{digits}f}"
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return m
    return f"{m} [{lo:.{digits}f}, {hi:.{digits}f}]"


def results_csv(results: Mapping[str, Any]) -> str:
    """Long-format CSV: one row per (method, subset, metric) with the interval over seeds."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "subset", "size", "seen", "n_patients", "n_complete", "metric",
                "mean", "std", "ci_low", "ci_high", "n_seeds"])
    for method in results["methods"]:
        for key in results["subsets"]:
            e = results["per_subset"][method][key]
            rows = dict(e["metrics"])
            for extra in ("mean_uncertainty", "mean_entropy"):
                if extra in e:
                    rows[extra] = e[extra]
            for metric, iv in rows.items():
                w.writerow([method, key, e["size"], int(e["seen"]), e["n_patients"],
                            e["n_complete"], metric] + [
                    "" if iv[s] is None or (isinstance(iv[s], float) and not math.isfinite(iv[s]))
                    else iv[s] for s in ("mean", "std", "ci_low", "ci_high", "n")])
    return buf.getvalue()


def results_markdown(results: Mapping[str, Any], extra_lines: Optional[list[str]] = None) -> str:
    """A Markdown report: summaries per method, paired differences, then every subset."""
    pm = results["primary_metric"]
    methods = results["methods"]
    ci = f"{int(results['interval']['level'] * 100)}% t-interval over {len(results['seeds'])} seed(s)"
    lines = [
        "# All-subsets robustness evaluation",
        "",
        f"Task: {results['task']}; {results['n_patients']} test patients "
        f"({results['patients_missing_modalities']} with really missing modalities, evaluated on "
        f"what they have); {len(results['subsets'])} modality subsets; seeds "
        f"{results['seeds']}; values are mean [{ci}].",
        "",
    ]
    if results["excluded_combinations"]:
        lines += ["Combinations excluded from training (unseen): "
                  + ", ".join("+".join(c) for c in results["excluded_combinations"]), ""]
    metric_names = list(results["summary"][methods[0]]) if methods else []
    for metric in metric_names:
        arrow = "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"
        lines += [f"## {metric} {arrow}", "",
                  "| method | mean over subsets | worst subset | full set | drop vs full "
                  "| adding a modality hurts | seen | unseen |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in methods:
            s = results["summary"][m][metric]
            worst_names = sorted(set(x for x in s["worst_subset"] if x))
            lines.append(
                f"| {m} | {_fmt(s['mean'])} | {_fmt(s['worst'])} ({', '.join(worst_names)}) "
                f"| {_fmt(s['full'])} | {_fmt(s['drop_vs_full'])} | {_fmt(s['harm_rate'])} "
                f"of {s['harm_pairs']} pairs | {_fmt(s['seen_mean'])} | {_fmt(s['unseen_mean'])} |")
        lines.append("")
    if results["comparisons"]:
        ref = results["reference_method"]
        lines += [f"## Paired gains of {ref} over each method (same seeds and subsets; positive = "
                  f"{ref} better, i.e. higher for ↑ metrics and lower for ↓ metrics)", "",
                  "| comparison | metric | mean over subsets | worst subset | full set |",
                  "|---|---|---|---|---|"]
        for name, comp in results["comparisons"].items():
            for metric, d in comp.items():
                lines.append(f"| {name} | {metric} | {_fmt(d['mean'])} | {_fmt(d['worst'])} "
                             f"| {_fmt(d['full'])} |")
        lines.append("")
    lines += ["## Timing per seed (s, all subsets x patients)", "",
              "| method | seconds |", "|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {_fmt(results['timings_s'][m], 2)} |")
    lines.append("")
    if extra_lines:
        lines += extra_lines + [""]
    lines += [f"## {pm} per subset", "",
              "| subset | size | seen | n | " + " | ".join(methods) + " |",
              "|---|---|---|---|" + "---|" * len(methods)]
    for key in results["subsets"]:
        e0 = results["per_subset"][methods[0]][key]
        cells = [_fmt(results["per_subset"][m][key]["metrics"].get(pm)) for m in methods]
        lines.append(f"| {key} | {e0['size']} | {'yes' if e0['seen'] else 'no'} "
                     f"| {e0['n_patients']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save_fig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_heatmap(results: Mapping[str, Any], path: Path, metric: Optional[str] = None) -> Path:
    """Subset x method heatmap of ``metric`` (default: the primary metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or results["primary_metric"]
    methods, keys = results["methods"], results["subsets"]
    data = np.full((len(keys), len(methods)), np.nan)
    for j, m in enumerate(methods):
        for i, k in enumerate(keys):
            v = results["per_subset"][m][k]["metrics"].get(metric, {}).get("mean")
            data[i, j] = np.nan if v is None else v
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(methods), 1.5 + 0.16 * len(keys)))
    im = ax.imshow(data, aspect="auto", cmap="viridis" if HIGHER_IS_BETTER.get(metric, True)
                   else "viridis_r", interpolation="nearest")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_yticks(range(len(keys)), keys, fontsize=max(3, 9 - len(keys) // 20))
    ax.set_title(f"{metric} per modality subset (mean over seeds)")
    fig.colorbar(im, ax=ax, label=metric)
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def plot_reliability(results: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Reliability diagram (top-label confidence vs accuracy), pooled over subsets and seeds."""
    if not results.get("reliability"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for m, rel in results["reliability"].items():
        conf = np.array([np.nan if c is None else c for c in rel["confidence"]], float)
        acc = np.array([np.nan if a is None else a for a in rel["accuracy"]], float)
        ok = np.isfinite(conf) & np.isfinite(acc)
        ax.plot(conf[ok], acc[ok], "o-", label=m)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability, all subsets pooled")
    ax.legend(fontsize=8)
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def plot_uncertainty(results: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Uncertainty vs number of available modalities, mean over seeds with the interval: left,
    the spread over diffusion samples (sampling methods); right, the predictive entropy (every
    classification method)."""
    panels = [(kind, label) for kind, label in
              (("uncertainty_by_size", "spread over K diffusion samples"),
               ("entropy_by_size", "predictive entropy (nats)"))
              if any(results.get(kind, {}).values())]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (kind, label) in zip(axes[0], panels):
        for m, by in results[kind].items():
            if not by:
                continue
            ks = sorted(int(k) for k in by)
            val = lambda k, s: np.nan if by[str(k)][s] is None else by[str(k)][s]  # noqa: E731
            mean = np.array([val(k, "mean") for k in ks], float)
            lo = np.array([val(k, "ci_low") for k in ks], float)
            hi = np.array([val(k, "ci_high") for k in ks], float)
            ax.plot(ks, mean, "o-", label=m)
            if np.isfinite(lo).all() and np.isfinite(hi).all():
                ax.fill_between(ks, lo, hi, alpha=0.2)
        ax.set_xlabel("number of available modalities")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Uncertainty vs available modalities (mean over subsets of each size)")
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def predictions_csv(collected, subsets, modalities, patient_ids, targets) -> str:
    """Per-patient predictions of every (seed, method, subset) as a long CSV.

    Args:
        collected: ``(seed, method, MethodOutput, s_idx (N,), p_idx (N,), available (N, M))``
            tuples, as ``evaluate_all_subsets(on_outputs=...)`` passes them.
        subsets: subset keys (``results["subsets"]``), indexed by ``s_idx``.
        modalities: the M modality names; patient_ids: the P patient IDs (indexed by ``p_idx``).
        targets: ``Targets`` of the P patients.

    Returns:
        CSV text with columns ``seed, method, subset, patient_id, used`` (the modalities the
        prediction used: the subset ∩ what the patient has, ``+``-joined), the prediction
        (``prob_0..prob_{C-1}`` for classification; ``risk`` for survival, higher = earlier event;
        ``value`` for regression), ``uncertainty`` (spread over the K diffusion samples; empty for
        deterministic methods) and the outcome (``label`` or ``time, event``; ``target`` for
        regression).
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    task = targets.task
    n_cls = None
    for c in collected:
        if c[2].probs is not None:
            n_cls = int(c[2].probs.shape[1])
            break
    if task == "classification":
        pred_cols = [f"prob_{k}" for k in range(n_cls or 0)]
        outcome_cols = ["label"]
    elif task == "survival":
        pred_cols, outcome_cols = ["risk"], ["time", "event"]
    else:
        pred_cols, outcome_cols = ["value"], ["target"]
    w.writerow(["seed", "method", "subset", "patient_id", "used", *pred_cols, "uncertainty", *outcome_cols])

    def num(x: float) -> str:
        return "" if not math.isfinite(x) else repr(float(x))

    for seed, method, out, s_idx, p_idx, avail in collected:
        probs = out.probs.tolist() if out.probs is not None else None
        risk = (out.risk if out.risk is not None else out.value)
        risk = risk.tolist() if risk is not None else None
        unc = out.uncertainty.tolist() if out.uncertainty is not None else None
        for r, (s, p) in enumerate(zip(s_idx.tolist(), p_idx.tolist())):
            used = "+".join(m for m, a in zip(modalities, avail[r].tolist()) if a)
            pred = [num(v) for v in probs[r]] if probs is not None else [num(risk[r])]
            if task == "classification":
                outcome = [str(int(targets.target[p]))]
            elif task == "survival":
                outcome = [num(float(targets.time[p])), str(int(targets.event[p]))]
            else:
                outcome = [num(float(targets.target[p]))]
            w.writerow([seed, method, subsets[s], patient_ids[p], used, *pred,
                        num(unc[r]) if unc is not None else "", *outcome])
    return buf.getvalue()


def write_report(
    results: Mapping[str, Any], out_dir: str | Path, extra_lines: Optional[list[str]] = None
) -> dict[str, Path]:
    """Write results.json, results.csv, results.md and the PNG plots into ``out_dir``.

    Returns:
        {name: path} of every file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = atomic_write_text(out / "results.json",
                                      json.dumps(_json_safe(results), indent=1) + "\n")
    paths["csv"] = atomic_write_text(out / "results.csv", results_csv(results))
    paths["markdown"] = atomic_write_text(out / "results.md", results_markdown(results, extra_lines))
    paths["heatmap"] = plot_heatmap(results, out / "heatmap_subsets_methods.png")
    rel = plot_reliability(results, out / "reliability.png")
    if rel:
        paths["reliability"] = rel
    unc = plot_uncertainty(results, out / "uncertainty_vs_modalities.png")
    if unc:
        paths["uncertainty"] = unc
    return paths
