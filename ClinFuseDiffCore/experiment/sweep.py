"""The resumable sweep: units of work, one file per finished unit, then the verdict.

Layout of ``OUT``::

    settings.json                 the resolved config + sweep (a rerun with other settings is refused)
    cohort/ cache/ split.json     data (reused)
    s1_<k>/stage1.pt              stage-1 tokens of every patient (stage-1 seed k)
    s1_<k>/<method>/seed<r>.npz   scores (S, P) on the validation and test patients + metadata
    s1_<k>/attention/seed<r>.pt   the teacher's weights (regressor / diffusion / oracle_full load it)
    results.json, results.md      the verdict (schema ``clinfusediff.experiment/1``)

Every file is written atomically (temp + rename), and a unit whose file exists is never
recomputed, so a killed sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..utils import atomic_path, atomic_write_json, atomic_write_text
from .data import ArrayCohort, load_tensors, prepare_data, save_tensors
from .methods import (
    FusionHead,
    TokenData,
    fit_crossfit_head,
    fit_diffusion,
    fit_diffusion_main,
    fit_fusion,
    fit_hidden_oracle,
    fit_mean_tokens,
    fit_nested,
    fit_flow,
    fit_regressor,
    fit_token_imputer,
    imputation_diagnostics,
    token_diagnostics,
    run_ttt,
    score_subsets,
    tune_ttt,
)

log = logging.getLogger(__name__)

# Rough relative cost of a unit (for the ETA before any unit of that kind has run).
COST = {"stage1": 40.0, "attention": 1.0, "mean": 0.6, "attention_size": 1.0, "attention_indep": 1.0,
        "regressor": 3.0, "diffusion": 6.0, "diffusion_main": 8.0, "dedicated": 8.0, "oracle_full": 0.3,
        "oracle_hidden": 0.5, "attention_nested": 2.5, "attention_ttt": 5.0, "attention_ttt_online": 4.0,
        "regressor_head": 7.0, "diffusion_head": 25.0, "attention_unseen": 1.0, "regressor_unseen": 3.0,
        "flow": 4.0, "tokens_flow": 5.0, "tokens_regressor": 3.0, "tokens_mean": 0.5}


def _save_npz(path: Path, **arrays: Any) -> None:
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def unseen_subset_masks(unseen: list[list[str]], modalities: list[str]) -> np.ndarray:
    """(U, M) bool masks of the combinations the *_unseen methods never train on."""
    bad = sorted({m for c in unseen for m in c} - set(modalities))
    if bad:
        raise ValueError(f"sweep.unseen names {bad}, not among the modalities {modalities}")
    return np.array([[m in c for m in modalities] for c in unseen], dtype=bool).reshape(-1, len(modalities))


def dedicated_subsets(subsets: list[tuple[str, ...]], n_random: int, seed: int) -> list[int]:
    """Indices of the subsets that get a dedicated model: every singleton, the full set, and
    ``n_random`` others drawn with a fixed seed."""
    M = max(len(s) for s in subsets)
    fixed = [i for i, s in enumerate(subsets) if len(s) == 1 or len(s) == M]
    rest = [i for i in range(len(subsets)) if i not in fixed]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31]))
    pick = sorted(rng.choice(rest, size=min(n_random, len(rest)), replace=False).tolist()) if rest else []
    return sorted(fixed + pick)


class Progress:
    """Units done / left with an ETA from the measured time per unit kind."""

    def __init__(self, units: list[tuple[str, Any]], enabled: bool = True) -> None:
        self.units = units
        self.done = 0
        self.seconds: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()
        self.enabled = enabled

    def _estimate(self, kind: str) -> float:
        if kind in self.seconds:
            return float(np.mean(self.seconds[kind]))
        per_cost = [np.mean(v) / COST[k] for k, v in self.seconds.items() if k != "stage1"]
        return COST[kind] * (float(np.mean(per_cost)) if per_cost else 20.0)

    def finish(self, kind: str, seconds: Optional[float], label: str) -> None:
        self.done += 1
        if seconds is not None:
            self.seconds.setdefault(kind, []).append(seconds)
        left = sum(self._estimate(k) for k, _ in self.units[self.done:])
        if self.enabled:
            took = "reused" if seconds is None else f"{seconds:.0f} s"
            print(f"[{self.done}/{len(self.units)}] {label}: {took}; elapsed "
                  f"{(time.perf_counter() - self.t0) / 60:.1f} min, ETA {left / 60:.1f} min", file=sys.stderr, flush=True)

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"    {text}", file=sys.stderr, flush=True)


def _without_new_defaults(now: Any, old: Any, default: Any) -> Any:
    """``now`` without the keys ``old`` lacks whose value equals ``default``'s: settings added to
    the code since that run, left at their default, change nothing that run did."""
    if not (isinstance(now, dict) and isinstance(old, dict)):
        return now
    default = default if isinstance(default, dict) else {}
    return {k: (_without_new_defaults(v, old[k], default.get(k)) if k in old else v) for k, v in now.items()
            if k in old or json.dumps(v, sort_keys=True) != json.dumps(default.get(k), sort_keys=True)}


def _check_settings(out: Path, cfg, sweep) -> None:
    from ..config import Config

    now = {"config": cfg.to_dict(), "sweep": asdict(sweep)}
    f = out / "settings.json"
    if f.exists():
        old = json.loads(f.read_text(encoding="utf-8"))
        cmp = _without_new_defaults(now, old, {"config": Config().to_dict(), "sweep": asdict(type(sweep)())})
        diff = [f"{sec}.{k}" for sec in cmp for k in set(cmp[sec]) | set(old.get(sec, {}))
                if json.dumps(cmp[sec].get(k), sort_keys=True) != json.dumps(old.get(sec, {}).get(k), sort_keys=True)]
        # Adding seeds or methods extends a sweep; anything else would mix results.
        fatal = [k for k in diff if k not in ("sweep.seeds", "sweep.methods", "sweep.n_boot", "sweep.threads",
                                              "sweep.workers", "sweep.jobs")]
        if fatal:
            raise ValueError(
                f"{out} holds a sweep run with other settings ({', '.join(sorted(fatal))}); "
                "give a new --out or the same settings")
    atomic_write_json(f, now)


def _run_jobs(cfg, sweep, out: Path, prog: "Progress") -> None:
    """Run the method units of ``sweep.seeds`` in ``sweep.jobs`` worker processes (seed i -> job
    i % jobs, one torch thread each). Each worker is this command on the same folder with a seed
    shard and ``units_only``; its units are the same files a single process would write."""
    import subprocess
    import yaml

    shards = [sweep.seeds[i::sweep.jobs] for i in range(sweep.jobs)]
    shards = [s for s in shards if s]
    procs = []
    for k, seeds in enumerate(shards):
        raw = cfg.to_dict()
        raw["sweep"] = {**asdict(sweep), "seeds": seeds, "jobs": 1, "threads": 1}
        cfg_file = out / f".job{k}.yaml"
        atomic_write_text(cfg_file, yaml.safe_dump(raw, sort_keys=False))
        log_file = open(out / f".job{k}.log", "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "ClinFuseDiffCore.cli", "experiment", "--config", str(cfg_file),
               "--out", str(out), "--units-only"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append((k, seeds, subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env), log_file))
        prog.say(f"job {k}: seeds {seeds} (log {out / f'.job{k}.log'})")
    failed = []
    try:
        for k, seeds, p, f in procs:
            rc = p.wait()
            f.close()
            if rc != 0:
                failed.append((k, rc))
    finally:
        for _, _, p, _ in procs:
            if p.poll() is None:
                p.kill()
    if failed:
        raise RuntimeError(f"experiment jobs {failed} failed; see {out}/.job<k>.log; rerun to continue")


def run_sweep(cfg, sweep, out_dir: str | os.PathLike, *, progress: bool = True,
              data: Optional[ArrayCohort] = None, units_only: bool = False) -> dict[str, Any]:
    """Run (or continue) the whole experiment and write the verdict. Returns results.json's dict
    (``units_only``: a worker of ``_run_jobs``; runs its units, writes no verdict, returns {})."""
    from ..evaluation.protocol import enumerate_subsets

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not units_only:
        _check_settings(out, cfg, sweep)
    torch.set_num_threads(int(sweep.threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    if data is None:
        data = prepare_data(cfg, sweep, out, progress=progress)
    data_seconds = time.perf_counter() - t0
    subsets = enumerate_subsets(data.modalities)
    M = len(data.modalities)
    masks = np.array([[m in s for m in data.modalities] for s in subsets], dtype=bool)  # (S, M)
    ded = dedicated_subsets(subsets, sweep.dedicated_random, sweep.cohort_seed)
    val_idx, test_idx = data.parts["val"], data.parts["test"]
    methods = list(sweep.methods)
    unseen_masks = (unseen_subset_masks(sweep.unseen, data.modalities)
                    if any(m.endswith("_unseen") for m in sweep.methods) else None)
    # A dedicated model sees one fixed subset: an easier problem, trained for half the steps.
    ded_sweep = dataclasses.replace(sweep, steps=max(1, sweep.steps // 2))

    units: list[tuple[str, Any]] = []
    for s1 in sweep.stage1_seeds:
        units.append(("stage1", s1))
        for r in sweep.seeds:
            for m in methods:
                if m != "oracle_hidden":
                    units.append((m, (s1, r)))
    if "oracle_hidden" in methods and not units_only:
        units.append(("oracle_hidden", None))
    prog = Progress(units, progress)
    prog.say(f"data ready in {data_seconds:.0f} s: {len(data.ids)} patients "
             f"({len(data.parts['train'])} train / {len(val_idx)} val / {len(test_idx)} test), {len(subsets)} subsets")

    labels_t = torch.from_numpy(data.labels)
    cache: dict[Any, Any] = {}
    jobs_done = not (sweep.jobs > 1 and len(sweep.seeds) > 1 and not units_only)
    for kind, key in units:
        if kind != "stage1":
            # Method units always run on one thread, so results do not depend on sweep.jobs.
            torch.set_num_threads(1)
        if kind != "stage1" and not jobs_done:
            pending = [u for u in units if u[0] not in ("stage1", "oracle_hidden")
                       and not (out / f"s1_{u[1][0]}" / u[0] / f"seed{u[1][1]}.npz").exists()]
            if pending:
                _run_jobs(cfg, sweep, out, prog)
            jobs_done = True
        t_unit = time.perf_counter()
        if kind == "stage1":
            f = out / f"s1_{key}" / "stage1.pt"
            if f.exists():
                prog.finish(kind, None, f"stage 1 seed {key}")
                continue
            from .stage1 import train_stage1

            res = train_stage1(cfg, sweep, data, int(key), progress=prog.say)
            save_tensors(f, {"tokens": res["tokens"], "available": res["available"], "state": res["state"],
                             "log": json.dumps(res["log"])})
            prog.finish(kind, time.perf_counter() - t_unit, f"stage 1 seed {key}")
            continue
        if kind == "oracle_hidden":
            f = out / "oracle_hidden.npz"
            if not f.exists():
                score = fit_hidden_oracle(data.hidden, data.hidden_names, data.hidden_modalities, data.labels,
                                          data.parts["train"], subsets)
                _save_npz(f, val=score(val_idx), test=score(test_idx),
                          meta=np.array(json.dumps({"seconds": time.perf_counter() - t_unit})))
                prog.finish(kind, time.perf_counter() - t_unit, "oracle_hidden")
            else:
                prog.finish(kind, None, "oracle_hidden")
            continue
        s1, r = key
        f = out / f"s1_{s1}" / kind / f"seed{r}.npz"
        if f.exists():
            prog.finish(kind, None, f"{kind} seed {r}")
            continue
        if s1 not in cache:
            st = load_tensors(out / f"s1_{s1}" / "stage1.pt")
            cache.clear()
            cache[s1] = TokenData(st["tokens"], data.present, labels_t, data.parts["train"])
        td: TokenData = cache[s1]
        seed = 1000 * int(s1) + int(r)
        meta: dict[str, Any] = {}
        keep_samples = False

        def teacher(name: str = "attention") -> FusionHead:
            net = FusionHead("attention", cfg, 2)
            net.load_state_dict(load_tensors(out / f"s1_{s1}" / name / f"seed{r}.pt"))
            return net.eval()

        if kind in ("attention", "mean", "attention_size", "attention_indep"):
            mode = {"attention_size": "uniform_size", "attention_indep": "independent"}.get(kind, cfg.data.subset_sampling)
            net, scorer, meta = fit_fusion("mean" if kind == "mean" else "attention", cfg, sweep, td, seed, mode)
            if kind == "attention":
                save_tensors(out / f"s1_{s1}" / "attention" / f"seed{r}.pt", net.state_dict())
        elif kind == "attention_unseen":
            net, scorer, meta = fit_fusion("attention", cfg, sweep, td, seed, cfg.data.subset_sampling,
                                           excluded=unseen_masks)
            save_tensors(out / f"s1_{s1}" / kind / f"seed{r}.pt", net.state_dict())
        elif kind == "regressor_unseen":
            t = teacher("attention_unseen")
            _, scorer, meta = fit_regressor(cfg, sweep, td, seed, t, excluded=unseen_masks)
            meta["diagnostics"] = imputation_diagnostics(scorer.impute, t, td.tokens, data.present, val_idx, masks, seed)
        elif kind == "attention_nested":
            net, scorer, meta = fit_nested(cfg, sweep, td, seed)
            save_tensors(out / f"s1_{s1}" / kind / f"seed{r}.pt", net.state_dict())
        elif kind in ("attention_ttt", "attention_ttt_online"):
            from ..ttt.midl import MiDlTTT

            t = teacher()
            mode = "online" if kind.endswith("online") else "episodic"
            settings, report = tune_ttt(t, td.tokens, data.present, val_idx, data.labels[val_idx], masks, seed,
                                        mode, data.sites)
            ttt = MiDlTTT(t.fusion, t.head, settings)
            rv = run_ttt(ttt, td.tokens, data.present, val_idx, masks, seed, mode, data.sites)
            rt = run_ttt(ttt, td.tokens, data.present, test_idx, masks, seed + 7, mode, data.sites)
            report.update(test_accept_rate=float(rt["accepted"].mean()),
                          test_mean_abs_change=float(np.abs(rt["p"] - rt["stored"]).mean()),
                          seconds=time.perf_counter() - t_unit)
            _save_npz(f, val=rv["p"], test=rt["p"], meta=np.array(json.dumps(report)))
            prog.finish(kind, time.perf_counter() - t_unit, f"{kind} seed {r}")
            continue
        elif kind in ("regressor_head", "diffusion_head"):
            t = teacher()
            sw = dataclasses.replace(sweep, samples=max(1, sweep.samples // 2)) if kind == "diffusion_head" else sweep
            _, scorer, meta = fit_crossfit_head(kind.split("_")[0], cfg, sw, td, seed, t)
            meta["diagnostics"] = imputation_diagnostics(scorer.impute, t, td.tokens, data.present, val_idx, masks, seed)
            keep_samples = True
        elif kind == "oracle_full":
            t = teacher()
            full = np.ones((1, M), bool)

            def scorer(tok, av, g, t=t):  # av = the full set of what each patient has
                with torch.no_grad():
                    return torch.softmax(t(tok, av), -1)[:, 1], None
            vs = score_subsets(scorer, td.tokens, data.present, val_idx, full, seed)[0]
            ts = score_subsets(scorer, td.tokens, data.present, test_idx, full, seed)[0]
            _save_npz(f, val=np.repeat(vs, len(subsets), 0), test=np.repeat(ts, len(subsets), 0),
                      meta=np.array(json.dumps({"seconds": time.perf_counter() - t_unit})))
            prog.finish(kind, time.perf_counter() - t_unit, f"{kind} seed {r}")
            continue
        elif kind == "regressor":
            t = teacher()
            _, scorer, meta = fit_regressor(cfg, sweep, td, seed, t)
            meta["diagnostics"] = imputation_diagnostics(scorer.impute, t, td.tokens, data.present, val_idx, masks, seed)
        elif kind == "diffusion":
            t = teacher()
            _, scorer, meta = fit_diffusion(cfg, sweep, td, seed, t)
            meta["diagnostics"] = imputation_diagnostics(scorer.impute, t, td.tokens, data.present, val_idx, masks, seed)
            keep_samples = True
        elif kind == "flow":
            t = teacher()
            _, scorer, meta = fit_flow(cfg, sweep, td, seed, t)
            meta["diagnostics"] = imputation_diagnostics(scorer.impute, t, td.tokens, data.present, val_idx, masks, seed)
            keep_samples = True
        elif kind in ("tokens_flow", "tokens_regressor"):
            t = teacher()
            _, scorer, meta = fit_token_imputer(kind.split("_")[1], cfg, sweep, td, seed, t)
            meta["diagnostics"] = {
                **imputation_diagnostics(scorer.impute, t, td.tokens, data.present, val_idx, masks, seed),
                **token_diagnostics(scorer.complete, td.tokens, data.present, val_idx, masks, seed)}
            keep_samples = kind == "tokens_flow"
        elif kind == "tokens_mean":
            t = teacher()
            _, scorer, meta = fit_mean_tokens(td, t)
            meta["diagnostics"] = imputation_diagnostics(scorer.impute, t, td.tokens, data.present, val_idx, masks, seed)
        elif kind == "diffusion_main":
            _, scorer, meta = fit_diffusion_main(cfg, sweep, td, seed, data.tabular_dims)
            keep_samples = True
        elif kind == "dedicated":
            vs = np.full((len(subsets), len(val_idx)), np.nan, np.float32)
            ts = np.full((len(subsets), len(test_idx)), np.nan, np.float32)
            for j in ded:
                _, sc, _ = fit_fusion("attention", cfg, ded_sweep, td, seed * 1000 + j, cfg.data.subset_sampling,
                                      fixed=masks[j])
                vs[j] = score_subsets(sc, td.tokens, data.present, val_idx, masks[j:j + 1], seed)[0][0]
                ts[j] = score_subsets(sc, td.tokens, data.present, test_idx, masks[j:j + 1], seed)[0][0]
            _save_npz(f, val=vs, test=ts, meta=np.array(json.dumps(
                {"seconds": time.perf_counter() - t_unit, "subsets": ded})))
            prog.finish(kind, time.perf_counter() - t_unit, f"{kind} seed {r}")
            continue
        else:  # pragma: no cover - settings validation lists the methods
            raise ValueError(f"unknown method {kind!r}")
        vs, _ = score_subsets(scorer, td.tokens, data.present, val_idx, masks, seed)
        ts, samples = score_subsets(scorer, td.tokens, data.present, test_idx, masks, seed + 7, keep_samples=keep_samples)
        extra = {}
        if samples is not None:
            extra["test_sample_std"] = samples.std(0).astype(np.float32)  # (S, P) spread over K samples
        meta["seconds"] = time.perf_counter() - t_unit
        _save_npz(f, val=vs, test=ts, meta=np.array(json.dumps(meta)), **extra)
        prog.finish(kind, time.perf_counter() - t_unit, f"{kind} seed {r}")

    if units_only:
        return {}
    from .verdict import write_verdict

    result = write_verdict(out, cfg, sweep, data, subsets, ded, wall_seconds=time.perf_counter() - t_start,
                           data_seconds=data_seconds, progress=prog.say)
    return result
