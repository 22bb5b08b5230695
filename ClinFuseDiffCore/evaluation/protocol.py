"""The all-subsets robustness protocol: every modality subset x every method x several seeds.

What it does (the field's protocol, see ``docs/RESULTS_SCHEMA.md``):

1. ``enumerate_subsets`` lists all 2^M - 1 non-empty modality subsets in a fixed order: by size,
   then lexicographically by the position of each modality in ``cfg.data.modalities`` (so the
   singletons come first in config order and the full set is last).
2. Each method is evaluated on every subset from **cached tokens**: the encoders of the method's
   model ran once per patient (``model.encode``), and a subset is only a different ``available``
   mask over the same tokens. All (subset, patient) pairs are flattened into one batch and handed
   to the method in chunks, so a method such as diffusion+TTT adapts many patients *and* subsets
   at once.
3. Patients whose modalities are really missing are evaluated on the intersection
   ``subset ∩ what they have``. A patient who has none of a subset's modalities is skipped for
   that subset (``n_patients`` per subset says how many remained; ``n_complete`` how many had the
   whole subset).
4. Metrics per subset come from ``evaluation.metrics`` (AUROC, balanced accuracy, ECE, Brier for
   classification; C-index for survival). Summaries per method and seed: mean over subsets,
   worst subset, the full set, drop vs the full set, the rate at which adding a modality hurts
   (over every pair S ⊂ S∪{m}), seen vs unseen combinations (those excluded from training), and
   the mean over subsets lacking each modality.
5. Seeds: every number is computed per seed, then reported as the mean over seeds with a 95%
   Student-t interval over seeds (``mean ± t_{0.975, n-1} · sd / sqrt(n)``). With one seed the
   interval is undefined (NaN). Paired differences between methods use the same per-seed pairing.

This module is the orchestration (``evaluate_all_subsets``, and from checkpoints
``resolve_checkpoints`` / ``methods_for_run`` / ``evaluate_checkpoints``). Its building blocks
live beside it and are re-exported here: ``subsets.py`` (order, names, masks), ``running.py``
(methods, running them over all pairs, metrics of a subset) and ``summaries.py`` (per-seed
summaries, intervals over seeds, reliability). The verdict statistics (paired bootstrap over
training seeds x patients) are in ``stats.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

# The protocol's building blocks live in their own modules; they are re-exported here so that
# ``from ClinFuseDiffCore.evaluation.protocol import ...`` keeps working.
from .running import (  # noqa: F401
    Method,
    MethodFn,
    MethodOutput,
    Targets,
    _cat_outputs,
    _select,
    default_metric_fn,
    flatten_pairs,
    run_method,
    unique_episodes,
)
from .subsets import (  # noqa: F401
    enumerate_subsets,
    normalise_combinations,
    subset_key,
    subset_masks,
)
from .summaries import (  # noqa: F401
    _SCALARS,
    HIGHER_IS_BETTER,
    INTERVAL_LEVEL,
    PRIMARY_METRIC,
    _worse,
    aggregate_summaries,
    interval,
    predictive_entropy,
    reliability_bins,
    summarise_subsets,
)


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------
def evaluate_all_subsets(
    methods_by_seed: Mapping[int, Sequence[Method]],
    patient_available: torch.Tensor,
    targets: Targets,
    modalities: Sequence[str],
    *,
    excluded_combinations: Sequence[Sequence[str]] = (),
    metric_fn: Optional[Callable[[MethodOutput, Targets, torch.Tensor], dict[str, float]]] = None,
    reference_method: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
    patient_ids: Optional[Sequence[str]] = None,
    on_outputs: Optional[Callable[..., None]] = None,
) -> dict[str, Any]:
    """Evaluate every method on every non-empty modality subset for every seed.

    Args:
        methods_by_seed: {seed: [Method, ...]}; the same method names for every seed. A seed may
            reuse one model (seed then drives diffusion sampling and TTT noise) or bring its own
            trained models.
        patient_available: (P, M) bool, which modalities each test patient really has.
        targets: ground truth of the P patients.
        modalities: ordered modality names (M).
        excluded_combinations: subsets excluded from training (reported as "unseen").
        metric_fn: metrics of a subset's rows (default: ``default_metric_fn(targets.task)``).
        reference_method: paired differences ``method - reference`` are reported against it
            (default: ``diffusion+ttt`` if present, else the last method).
        progress: optional callback receiving a status line.
        patient_ids: optional ids, only stored in the results for traceability.
        on_outputs: optional ``fn(seed, method, out: MethodOutput, s_idx (N,), p_idx (N,),
            available (N, M))`` called with every method's per-(subset, patient) outputs
            (``evaluate_checkpoints`` writes them to ``predictions.csv``).

    Returns:
        the results dict documented in ``docs/RESULTS_SCHEMA.md``.
    """
    if not methods_by_seed:
        raise ValueError("no seeds/methods to evaluate; give at least one seed and one method")
    seeds = list(methods_by_seed)
    names = [n for m in methods_by_seed[seeds[0]] for n in m.names]
    if len(set(names)) != len(names):
        raise ValueError(f"method names {names} must be unique")
    for s in seeds:
        got = [n for m in methods_by_seed[s] for n in m.names]
        if got != names:
            raise ValueError(f"seed {s} has methods {got}, expected {names} as for seed {seeds[0]}")
    mods = list(modalities)
    pav = patient_available.bool().cpu()
    if pav.ndim != 2 or pav.shape[1] != len(mods):
        raise ValueError(f"patient_available must be (P, {len(mods)}), got {tuple(pav.shape)}")
    subsets = enumerate_subsets(mods)
    keys = [subset_key(s) for s in subsets]
    masks = subset_masks(subsets, mods)
    excluded = normalise_combinations(excluded_combinations, mods)
    excluded_keys = {subset_key(s) for s in excluded}
    metric_fn = metric_fn or default_metric_fn(targets.task)
    task = targets.task

    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    summaries: dict[str, list[dict]] = {n: [] for n in names}
    unc_by_size: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    ent_by_size: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    reliability_pool: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    timings: dict[str, list[float]] = {n: [] for n in names}
    extras: dict[str, dict[str, float]] = {n: {} for n in names}
    complete = (masks[:, None, :] & ~pav[None]).any(-1) == 0  # (S, P): patient has all of s

    def _tabulate(name: str, out: MethodOutput, s_idx: torch.Tensor, p_idx: torch.Tensor,
                  seed: int) -> None:
        table: dict[str, dict[str, Any]] = {}
        per_size_u: dict[int, list[torch.Tensor]] = {}
        per_size_h: dict[int, list[torch.Tensor]] = {}
        for s, key in enumerate(keys):
            rows = (s_idx == s).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                table[key] = {"metrics": {}, "n_patients": 0, "n_complete": 0}
                continue
            sub = _select(out, rows)
            entry: dict[str, Any] = {
                "metrics": metric_fn(sub, targets, p_idx[rows]),
                "n_patients": int(rows.numel()),
                "n_complete": int(complete[s].sum()),
            }
            size = len(subsets[s])
            if sub.uncertainty is not None:
                entry["mean_uncertainty"] = float(sub.uncertainty.mean())
                per_size_u.setdefault(size, []).append(sub.uncertainty)
            if sub.probs is not None:
                h = predictive_entropy(sub.probs)
                entry["mean_entropy"] = float(h.mean())
                per_size_h.setdefault(size, []).append(h)
            table[key] = entry
        if out.probs is not None and targets.target is not None:
            reliability_pool[name].append((out.probs, targets.target[p_idx]))
        for size, parts in per_size_u.items():
            unc_by_size[name].setdefault(size, []).append(float(torch.cat(parts).mean()))
        for size, parts in per_size_h.items():
            ent_by_size[name].setdefault(size, []).append(float(torch.cat(parts).mean()))
        per_seed[str(seed)][name] = table
        summaries[name].append(
            summarise_subsets({k: v["metrics"] for k, v in table.items()}, subsets, mods, excluded)
        )

    for seed in seeds:
        per_seed[str(seed)] = {}
        for method in methods_by_seed[seed]:
            if progress:
                progress(f"seed {seed}: {'/'.join(method.names)} on {len(subsets)} subsets")
            s_idx, p_idx, avail, outs, secs = run_method(method, masks, pav, seed)
            for name, out in outs.items():
                if on_outputs is not None:
                    on_outputs(seed, name, out, s_idx, p_idx, avail)
                timings[name].append(secs)  # a shared pass is counted for each of its names
                for k, v in out.extra.items():
                    extras[name][k] = extras[name].get(k, 0.0) + v
                _tabulate(name, out, s_idx, p_idx, seed)

    # Per-subset intervals over seeds.
    per_subset: dict[str, dict[str, Any]] = {}
    for n in names:
        per_subset[n] = {}
        for s, key in enumerate(keys):
            rows = [per_seed[str(sd)][n][key] for sd in seeds]
            metric_names = list(rows[0]["metrics"])
            entry = {
                "size": len(subsets[s]),
                "seen": key not in excluded_keys,
                "n_patients": rows[0]["n_patients"],
                "n_complete": rows[0]["n_complete"],
                "metrics": {mn: interval([r["metrics"].get(mn, float("nan")) for r in rows])
                            for mn in metric_names},
            }
            if "mean_uncertainty" in rows[0]:
                entry["mean_uncertainty"] = interval([r["mean_uncertainty"] for r in rows])
            if "mean_entropy" in rows[0]:
                entry["mean_entropy"] = interval([r["mean_entropy"] for r in rows])
            per_subset[n][key] = entry

    summary = {n: aggregate_summaries(summaries[n]) for n in names}

    # Paired differences against the reference method (same seed, same subsets).
    ref = reference_method or ("diffusion+ttt" if "diffusion+ttt" in names else names[-1])
    if ref not in names:
        raise ValueError(f"reference method {ref!r} not among the methods {names}")
    comparisons: dict[str, Any] = {}
    for n in names:
        if n == ref:
            continue
        comp: dict[str, Any] = {}
        for mn in summaries[ref][0] if summaries[ref] else {}:
            sign = 1.0 if HIGHER_IS_BETTER.get(mn, True) else -1.0  # positive = reference better
            comp[mn] = {
                stat: interval([sign * (summaries[ref][i][mn][stat] - summaries[n][i][mn][stat])
                                for i in range(len(seeds))])
                for stat in ("mean", "worst", "full")
            }
        comparisons[f"{ref} - {n}"] = comp

    reliability = {}
    for n in names:
        if reliability_pool[n]:
            probs = torch.cat([p for p, _ in reliability_pool[n]])
            tgt = torch.cat([t for _, t in reliability_pool[n]])
            reliability[n] = reliability_bins(probs, tgt)

    return {
        "schema_version": 1,
        "task": task,
        "primary_metric": PRIMARY_METRIC.get(task, "auroc"),
        "modalities": mods,
        "subsets": keys,
        "methods": names,
        "seeds": seeds,
        "reference_method": ref,
        "excluded_combinations": [list(s) for s in excluded],
        "interval": {"kind": "student_t_over_seeds", "level": INTERVAL_LEVEL},
        "n_patients": int(pav.shape[0]),
        "patient_ids": list(patient_ids) if patient_ids is not None else None,
        "patients_missing_modalities": int((~pav).any(-1).sum()),
        "per_seed": per_seed,
        "per_subset": per_subset,
        "summary": summary,
        "comparisons": comparisons,
        "uncertainty_by_size": {
            n: {str(k): interval(v) for k, v in sorted(unc_by_size[n].items())} for n in names
        },
        "entropy_by_size": {
            n: {str(k): interval(v) for k, v in sorted(ent_by_size[n].items())} for n in names
        },
        "reliability": reliability,
        "timings_s": {n: interval(timings[n]) for n in names},
        "method_extra": extras,
    }


# --------------------------------------------------------------------------------------------
# From checkpoints to results (``clinfusediff evaluate`` / ``training/evaluate.py``)
# --------------------------------------------------------------------------------------------
FUSION_NAMES = ("mean", "attention", "diffusion")


def resolve_checkpoints(specs: Sequence[str]) -> list[dict[str, Path]]:
    """Turn ``--checkpoint`` arguments into runs: one {method: checkpoint path} per training seed.

    Accepted forms (mixable):
      * ``name=path.pt``: a named checkpoint (``mean``, ``attention``, ``diffusion`` or any label);
        all named ones form one run;
      * a ``.pt`` file: named after the fusion in its config;
      * a training output folder holding ``<fusion>/best.pt`` (what ``clinfusediff train
        --all-fusions`` writes): one run per folder, so several folders = several training seeds.

    Returns:
        list of runs; every run has the same method names.
    """
    from ..training.checkpoint import load_checkpoint

    named: dict[str, Path] = {}
    runs: list[dict[str, Path]] = []
    for spec in specs:
        if "=" in spec:
            name, path = spec.split("=", 1)
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"--checkpoint {spec!r}: {p} is not a file")
            named[name.strip()] = p
            continue
        p = Path(spec)
        if p.is_dir():
            found = {f: p / f / "best.pt" for f in FUSION_NAMES if (p / f / "best.pt").is_file()}
            if not found:
                raise FileNotFoundError(
                    f"--checkpoint {spec!r}: folder has none of {[f + '/best.pt' for f in FUSION_NAMES]}; "
                    "give a training output folder (clinfusediff train --all-fusions) or name=path.pt")
            runs.append(found)
        elif p.is_file():
            fusion = load_checkpoint(p)["config"]["model"]["fusion"]
            if fusion in named:
                raise ValueError(f"two checkpoints for {fusion!r}; name them: --checkpoint {fusion}=a.pt other=b.pt")
            named[fusion] = p
        else:
            raise FileNotFoundError(f"--checkpoint {spec!r}: no such file or folder")
    if named:
        runs.insert(0, named)
    if not runs:
        raise ValueError("no checkpoint given; pass --checkpoint RUN_DIR or name=path.pt")
    keys = sorted(runs[0])
    for r in runs[1:]:
        if sorted(r) != keys:
            raise ValueError(f"runs hold different methods: {keys} vs {sorted(r)}; every run needs the same ones")
    return runs


def skipped_methods(specs: Sequence[str]) -> dict[str, str]:
    """For every training-run folder among ``specs``: each fusion method of ``FUSION_NAMES`` that
    has no ``<fusion>/best.pt`` there, with why (``{"diffusion": "RUN/diffusion/best.pt ..."}``)."""
    import json

    out: dict[str, str] = {}
    for spec in specs:
        p = Path(spec)
        if "=" in spec or not p.is_dir():
            continue
        summary = p / "train_summary.json"
        trained = None
        if summary.is_file():
            try:
                trained = set(json.loads(summary.read_text(encoding="utf-8")).get("models", {}))
            except (ValueError, AttributeError):
                trained = None
        for f in FUSION_NAMES:
            if (p / f / "best.pt").is_file() or f in out:
                continue
            if (p / f).is_dir():
                out[f] = (f"{p / f} has no best.pt: its training was interrupted before its first "
                          "epoch ended")
            elif trained is not None and f not in trained:
                out[f] = f"not trained in the run {p} (its train_summary.json lists {sorted(trained)})"
            else:
                out[f] = (f"no {p / f / 'best.pt'}: not trained in the run {p}"
                          + ("" if summary.is_file() else
                             " (it has no train_summary.json: its training command did not finish)"))
    return out


def check_finished(runs: Sequence[Mapping[str, Path]], allow_unfinished: bool) -> dict[str, str]:
    """Every checkpoint's training status; refuse unfinished ones unless ``allow_unfinished``.

    Returns:
        ``{str(path): status}`` of the unfinished checkpoints that were allowed.

    Raises:
        ValueError: naming every unfinished checkpoint (and ``--allow-unfinished``).
    """
    from ..training.checkpoint import load_checkpoint
    from ..training.runstate import training_status

    bad: dict[str, str] = {}
    for run in runs:
        for name, path in run.items():
            ok, why = training_status(load_checkpoint(path, map_location="cpu"))
            if not ok:
                bad[str(path)] = f"{name}: {why}"
    if bad and not allow_unfinished:
        listed = "; ".join(f"{p} ({w})" for p, w in bad.items())
        raise ValueError(f"{len(bad)} checkpoint(s) did not finish training: {listed}. Finish the "
                         "training (clinfusediff train --resume <run>/<method>/last.pt, or rerun it) or "
                         "pass --allow-unfinished to evaluate them anyway")
    return bad


def _outputs_to_method(task: str, out: torch.Tensor) -> MethodOutput:
    """Head outputs (K, N, C) -> MethodOutput (mean over samples; spread as uncertainty)."""
    K = out.shape[0]
    if task == "classification":
        pk = out.float().softmax(-1)  # (K, N, C)
        pm = pk.mean(0)  # (N, C)
        c = pm.argmax(-1)  # (N,)
        spread = pk.gather(2, c.view(1, -1, 1).expand(K, -1, 1)).squeeze(2).std(0, unbiased=False)
        return MethodOutput(probs=pm, uncertainty=spread if K > 1 else None)
    v = out[..., 0].float()  # (K, N)
    unc = v.std(0, unbiased=False) if K > 1 else None
    if task == "survival":
        return MethodOutput(risk=v.mean(0), uncertainty=unc)
    return MethodOutput(value=v.mean(0), uncertainty=unc)


def methods_for_run(predictors: Mapping[str, Any], encoded: Mapping[str, Mapping[str, Any]], *,
                    ttt: bool = True, samples: Optional[int] = None,
                    chunk_size: int = 1024) -> list[Method]:
    """Protocol methods from loaded Predictors and their cached test tokens.

    A diffusion checkpoint yields ``diffusion`` and (with ``ttt``) ``diffusion+ttt`` from one pass
    (same per-row noise; the un-adapted samples are shared), baselines yield their own name.
    """
    from ..ttt import adapt_and_predict

    methods: list[Method] = []
    for name, pr in predictors.items():
        tokens = encoded[name]["tokens"]
        model, task = pr.model, pr.task
        if pr.is_diffusion:
            K = int(samples or pr.cfg.diffusion.num_samples)
            ttt_name = f"{name}+ttt"

            def fn(tok, av, row_seeds, pr=pr, K=K, name=name, ttt_name=ttt_name):
                res = adapt_and_predict(pr.model, tok.to(pr.device), av.to(pr.device), row_seeds,
                                        pr.cfg.ttt, num_samples=K, feature_bank=pr.feature_bank,
                                        adapt=ttt)
                outs = {name: _outputs_to_method(pr.task, res.outputs_before.cpu())}
                if ttt:
                    o = _outputs_to_method(pr.task, res.outputs.cpu())
                    o.extra = {"episodes": float(tok.shape[0]), "accepted": float(res.accepted.sum()),
                               "adapt_s": res.timings.get("adapt", 0.0),
                               "loss_drop": float((res.loss_before - res.loss_after)[res.accepted].sum()),
                               "step_episodes": float(res.steps * tok.shape[0]),
                               "param_episodes": float(res.n_params * tok.shape[0])}
                    outs[ttt_name] = o
                return outs

            methods.append(Method(name, tokens, fn, chunk_size, also=(ttt_name,) if ttt else ()))
        else:
            def fn(tok, av, row_seeds, model=model, task=task, pr=pr):
                out = model.predict_from_tokens(tok.to(pr.device), av.to(pr.device))  # (N, C)
                return _outputs_to_method(task, out.unsqueeze(0).cpu())

            methods.append(Method(name, tokens, fn, chunk_size))
    return methods


def evaluate_checkpoints(
    checkpoints: Sequence[str],
    out_dir: str | Path,
    *,
    data_root: Optional[str] = None,
    seeds: int = 3,
    samples: Optional[int] = None,
    ttt: bool = True,
    device: str = "cpu",
    part: str = "test",
    chunk_size: int = 1024,
    show_progress: bool = True,
    allow_unfinished: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full evaluation: load checkpoints, encode the test patients once per model, run the
    all-subsets protocol over seeds, write results.json/csv/md, the plots and ``predictions.csv``
    (one row per seed x method x subset x patient: the prediction, its uncertainty and the
    outcome, for scoring with other tools; see ``report.predictions_csv``).

    Args:
        checkpoints: ``--checkpoint`` specs (see ``resolve_checkpoints``).
        out_dir: where results go (the cohort split is copied here as ``split.json``).
        data_root: cohort folder (default: the checkpoint's ``data.root``, else the training
            run's generated ``cohort/`` beside the checkpoint folders).
        seeds: evaluation seeds when one run is given (diffusion sampling and TTT noise); with
            several runs (training seeds) each run is one seed.
        samples: K diffusion samples (default: the checkpoint's ``diffusion.num_samples``).
        ttt: also evaluate diffusion+TTT.
        device: ``cpu`` / ``cuda`` / ``auto``.
        part: which split part to evaluate (``test``; ``val`` for tuning).
        chunk_size: episodes per batched call.
        allow_unfinished: evaluate checkpoints whose training did not finish (refused otherwise,
            ``training.runstate``); each is named in the output and in ``results.json``.

    Returns:
        (results dict, {name: written path}). ``results["skipped_methods"]`` names every fusion
        method of a run folder that was not evaluated and why; ``results["unfinished"]`` the
        unfinished checkpoints evaluated with ``allow_unfinished``.
    """
    import dataclasses
    import json

    from ..config import Config
    from ..data.dataset import prepare_cohort
    from ..inference import Predictor
    from ..training.checkpoint import load_checkpoint
    from ..training.trainer import encode_dataset
    from ..utils import atomic_write_json, atomic_write_text
    from .report import write_report

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if part not in ("test", "val"):
        raise ValueError(f"part {part!r} not in ['test', 'val']")
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {chunk_size}")
    if samples is not None and samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    out = Path(out_dir)
    runs = resolve_checkpoints(checkpoints)
    say = print if show_progress else (lambda *a, **k: None)
    unfinished = check_finished(runs, allow_unfinished)  # before anything is written
    skipped = skipped_methods(checkpoints)
    # Always printed (also without progress): what is NOT in the results, and why.
    for name, why in skipped.items():
        print(f"evaluate: skipped {name}: {why}", flush=True)
    for path, why in unfinished.items():
        print(f"evaluate: warning: evaluating an unfinished checkpoint (--allow-unfinished): {path}: "
              f"{why}", flush=True)
    out.mkdir(parents=True, exist_ok=True)

    # The cohort and split of the first checkpoint (every run must share its test patients).
    first_path = next(iter(runs[0].values()))
    ck = load_checkpoint(first_path)
    cfg = Config.from_dict(ck["config"])
    split = ck.get("split")
    if not split or part not in split:
        raise ValueError(f"checkpoint {first_path} has no patient split; re-train with this version")
    run_dir = Path(first_path).resolve().parent.parent
    root = data_root or cfg.data.root
    if root is None and (run_dir / "cohort").is_dir():
        root = str(run_dir / "cohort")
    cache = cfg.data.cache_dir or (str(run_dir / "cache") if (run_dir / "cache").is_dir() else None)
    atomic_write_json(out / "split.json", split)
    data_cfg = dataclasses.replace(cfg.data, root=root, split_file=str(out / "split.json"),
                                   cache_dir=cache)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    counts = {k: len(split.get(k, ())) for k in ("train", "val", "test")}
    say(f"evaluate: cohort {root or '(generated)'}; the training split has {counts['train']} train / "
        f"{counts['val']} validation / {counts['test']} test patients (copied to {out / 'split.json'}); "
        f"scoring the {counts[part]} {part} patients")
    if counts[part] == 0:
        raise ValueError(
            f"the checkpoint's split has no {part} patients (data.test_fraction="
            f"{cfg.data.test_fraction}, data.val_fraction={cfg.data.val_fraction} at training); use "
            f"--part {'val' if part == 'test' else 'test'}, or re-train with a non-zero fraction")
    cohort = prepare_cohort(cfg, out, show_progress=show_progress)
    ds = cohort.datasets[part]

    predictors_by_run, encoded_by_run = [], []
    for run in runs:
        prs = {n: Predictor.from_checkpoint(p, device) for n, p in run.items()}
        enc = {}
        for n, pr in prs.items():
            if list(pr.modalities) != list(cohort.modalities):
                raise ValueError(f"checkpoint {run[n]} has modalities {pr.modalities}, the cohort "
                                 f"{cohort.modalities}")
            enc[n] = encode_dataset(pr.model, ds, pr.device, 16)
        predictors_by_run.append(prs)
        encoded_by_run.append(enc)
    enc0 = next(iter(encoded_by_run[0].values()))
    for enc in encoded_by_run:
        for e in enc.values():
            if e["patient_id"] != enc0["patient_id"]:
                raise ValueError("runs were evaluated on different test patients; use one split")

    seed_list = list(range(seeds)) if len(runs) == 1 else list(range(len(runs)))
    methods_by_seed = {}
    for i, s in enumerate(seed_list):
        r = 0 if len(runs) == 1 else i
        methods_by_seed[s] = methods_for_run(predictors_by_run[r], encoded_by_run[r], ttt=ttt,
                                             samples=samples, chunk_size=chunk_size)
    task = cfg.data.task
    targets = Targets(task, enc0["target"], enc0["time"], enc0["event"])
    excluded = []
    for prs in predictors_by_run[:1]:
        for pr in prs.values():
            excluded = excluded or list(pr.cfg.data.excluded_combinations)
    collected: list[tuple] = []
    results = evaluate_all_subsets(
        methods_by_seed, enc0["available"], targets, cohort.modalities,
        excluded_combinations=excluded, progress=say, patient_ids=enc0["patient_id"],
        on_outputs=lambda *a: collected.append(a),
    )
    results["checkpoints"] = [{n: str(p) for n, p in run.items()} for run in runs]
    results["seed_kind"] = ("evaluation seeds (diffusion sampling + TTT noise) on one trained run"
                            if len(runs) == 1 else "training runs (one per seed)")
    results["part"] = part
    results["split_counts"] = counts
    results["skipped_methods"] = skipped
    results["unfinished"] = unfinished
    ttt_lines = []
    for name, ex in results["method_extra"].items():
        if ex.get("episodes"):
            rate = ex["accepted"] / ex["episodes"]
            per = ex["adapt_s"] / ex["episodes"] * 1000
            steps = ex["step_episodes"] / ex["episodes"]
            n_par = ex["param_episodes"] / ex["episodes"]
            ex.update(acceptance_rate=rate, adapt_ms_per_episode=per, steps=steps, n_params=n_par)
            ttt_lines.append(
                f"TTT ({name}): {int(ex['episodes'])} episodes over all seeds, {steps:g} steps, "
                f"{n_par:g} adapted parameters per episode ({cfg.ttt.params}); {rate:.1%} of updates "
                f"kept; adaptation {per:.2f} ms per episode (batched)")
    notes = [f"Not evaluated: {name} ({why})" for name, why in skipped.items()]
    notes += [f"Unfinished training, evaluated with --allow-unfinished: {why} ({path})"
              for path, why in unfinished.items()]
    paths = write_report(results, out, extra_lines=ttt_lines + notes)
    from .report import predictions_csv

    paths["predictions"] = atomic_write_text(
        out / "predictions.csv",
        predictions_csv(collected, results["subsets"], cohort.modalities, enc0["patient_id"], targets))
    say(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return results, paths
