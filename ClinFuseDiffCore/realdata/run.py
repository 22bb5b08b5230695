"""Repeated patient-level cross-validation on real tabular cohorts, every block subset evaluated.

Protocol (docs/REALDATA.md):

* Folds: ``folds``-fold CV x ``repeats``, split by patient (one row = one patient), stratified on
  the event indicator; repeat r uses ``StratifiedKFold(shuffle=True, random_state=seed*1000+r)``.
* Every preprocessing step (standardisation, category vocabularies, means used for imputation,
  penalty choice, epoch choice) is fitted on the training patients of the fold only. The natural
  missingness of the cohort is kept: a block is missing for a patient when all its columns are.
* Methods, re-run on the same folds:
  - ``cfd_mean`` / ``cfd_attention``: ClinFuseDiff models (``build_model``) whose modalities are the
    blocks (one tabular encoder per block), mean or attention fusion, survival head, the project's
    Cox loss (+ the reconstruction / contrastive terms of ``compute_losses``), trained with block
    dropout drawn uniformly over the non-empty subsets of the blocks each patient has. Fixed budget
    of ``nn_steps`` AdamW steps on 80% of the training patients; the step count kept is the one
    with the best mean-over-subsets C-index on the other 20% (checked every ``nn_eval_every``).
  - ``encox_subset``: one elastic-net Cox model per block subset, trained on the training patients
    who have every block of the subset, on those blocks' columns only.
  - ``encox_meanimp``: one elastic-net Cox model on all blocks; a missing block (natural or masked
    at test) is set to its training mean.
  - ``encox_dropout``: the same model trained on ``cox_copies`` copies of every training patient,
    each copy keeping a subset of the patient's blocks drawn uniformly over the non-empty ones (the
    others set to the training mean).
  - ``cfd_diffusion`` / ``cfd_regressor`` (``realdata/imputers.py``, not run by default): the
    research sweep's decoupled diffusion imputer and its MSE control on the fold's frozen
    ``cfd_attention`` model (the teacher): trained on the teacher's frozen block tokens of the
    training patients to produce its fusion of every block the patient has from a uniformly drawn
    subset of them, fixed budget ``imputer_steps`` (no selection); readout = the teacher's head on
    the imputations (posterior mean over K samples). Summaries add the paired difference vs
    ``cfd_attention``; every fold records the imputation diagnostics.
  Elastic-net Cox = scikit-survival ``CoxnetSurvivalAnalysis(l1_ratio=0.5)``; the penalty is chosen
  on the training patients only, by inner 3-fold CV (split by patient, copies kept together)
  maximising the validation partial log-likelihood (glmnet's default criterion for Cox).
  Within a present block, a missing cell is set to its training mean (+ the neural encoders get the
  project's per-cell missing indicator).
* Evaluation: for every non-empty block subset S, the test patients who naturally have every block
  of S, with the other blocks masked; plus ``natural`` (every test patient with the blocks they
  have). Harrell's C (``evaluation.metrics.concordance_index``) and the cumulative/dynamic AUROC at
  a fixed horizon (median observed time of the cohort; ``sksurv.metrics.cumulative_dynamic_auc``
  with IPCW from the training fold).
* Summaries per method: mean over subsets, mean over single-block subsets, full set, natural; each
  the mean over the ``folds x repeats`` test folds, with a 95% interval from the Nadeau-Bengio
  corrected resampled t statistic (variance x (1/J + n_test/n_train), J = folds x repeats, t with
  J-1 df), and the paired difference vs ``encox_dropout`` with the same corrected interval.
"""

from __future__ import annotations

import itertools
import logging
import math
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..evaluation.metrics import concordance_index
from ..utils import atomic_write_json, atomic_write_text
from .datasets import INSTALL_HINT, RealDataset, load_dataset, missingness

log = logging.getLogger(__name__)

SCHEMA = "clinfusediff.realdata/1"
NN_METHODS = ("cfd_mean", "cfd_attention")
COX_METHODS = ("encox_subset", "encox_meanimp", "encox_dropout")
IMPUTER_METHODS = ("cfd_diffusion", "cfd_regressor")  # realdata/imputers.py; teacher = cfd_attention
ALL_METHODS = NN_METHODS + COX_METHODS + IMPUTER_METHODS
REFERENCE = "encox_dropout"
TEACHER = "cfd_attention"  # second reference of the summaries when present


@dataclass
class RunSettings:
    folds: int = 5
    repeats: int = 3
    seed: int = 0
    methods: tuple[str, ...] = NN_METHODS + COX_METHODS
    l1_ratio: float = 0.5
    n_alphas: int = 30
    inner_folds: int = 3
    cox_copies: int = 5
    nn_steps: int = 200
    nn_eval_every: int = 25
    nn_batch: int = 256
    nn_lr: float = 3e-3
    nn_weight_decay: float = 1e-2
    embed_dim: int = 32
    hidden: int = 64
    # cfd_diffusion / cfd_regressor (realdata/imputers.py): fixed budgets, no selection
    imputer_steps: int = 4000
    imputer_batch: int = 256
    imputer_lr: float = 1e-3
    imputer_samples: int = 4  # K diffusion samples per evaluated row
    max_patients: Optional[int] = None  # subsample (tests only)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# folds, subsets


def enumerate_block_subsets(m: int) -> np.ndarray:
    """(2^m - 1, m) bool: every non-empty subset, by size then lexicographic."""
    subs = []
    for k in range(1, m + 1):
        for combo in itertools.combinations(range(m), k):
            row = np.zeros(m, bool)
            row[list(combo)] = True
            subs.append(row)
    return np.stack(subs)


def make_folds(event: np.ndarray, folds: int, repeats: int, seed: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """[(repeat, fold, train_idx, test_idx)]: patient-level stratified K-fold, repeated."""
    from sklearn.model_selection import StratifiedKFold

    out = []
    for r in range(repeats):
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed * 1000 + r)
        for f, (tr, te) in enumerate(skf.split(np.zeros(len(event)), event)):
            out.append((r, f, np.sort(tr), np.sort(te)))
    return out


def draw_subsets(natural: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, M) bool: per row, a subset drawn uniformly over the non-empty subsets of ``natural``."""
    subs = enumerate_block_subsets(natural.shape[1])  # (K, M)
    valid = ~(subs[None, :, :] & ~natural[:, None, :]).any(axis=2)  # (N, K) subset within natural
    if not valid.any(axis=1).all():
        raise ValueError("a patient has no block at all; drop such patients before drawing subsets")
    score = np.where(valid, rng.random(valid.shape) + 1.0, 0.0)  # (N, K)
    return subs[score.argmax(axis=1)]


# ----------------------------------------------------------------------------------------------
# metrics


def cox_nll(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Negative Cox partial log-likelihood (Breslow), averaged over events; O(N log N)."""
    order = np.argsort(time, kind="stable")
    ts, lr, ev = time[order], eta[order], event[order].astype(bool)
    if not ev.any():
        return math.nan
    rev = np.logaddexp.accumulate(lr[::-1])[::-1]  # log sum_{j >= i} exp(eta_j) in time order
    first = np.searchsorted(ts, ts, side="left")  # ties share the risk set of the first tied row
    return float(-(lr - rev[first])[ev].mean())


def td_auc(risk: np.ndarray, time: np.ndarray, event: np.ndarray, train_time: np.ndarray,
           train_event: np.ndarray, horizon: float) -> float:
    """Cumulative/dynamic AUROC at ``horizon`` (IPCW from the training fold); NaN if undefined."""
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    # The IPCW estimate from the training fold is undefined beyond its last time: test times past
    # it are clipped just below (those patients stay controls, as horizon << last time).
    tmax = float(np.max(train_time))
    if horizon >= tmax:
        return math.nan
    time = np.minimum(time, np.nextafter(tmax, -np.inf))
    try:
        auc, _ = cumulative_dynamic_auc(Surv.from_arrays(train_event.astype(bool), train_time),
                                        Surv.from_arrays(event.astype(bool), time), risk, [horizon])
        return float(auc[0])
    except ValueError:
        return math.nan


# ----------------------------------------------------------------------------------------------
# elastic-net Cox


class CoxDesign:
    """Design matrix fitted on training rows: standardised numerics, one-hot categories.

    A missing cell, or a whole block that is not visible, is set to the training mean (0 for a
    standardised numeric; the training frequency for a one-hot column).
    """

    def __init__(self, ds: RealDataset, train_idx: np.ndarray):
        self.blocks = list(ds.blocks)
        self.specs: list[tuple[int, str, Any]] = []  # (block, column, None | category)
        self.mean: list[float] = []
        self.scale: list[float] = []
        tr = ds.frame.iloc[train_idx]
        for b, (name, cols) in enumerate(ds.blocks.items()):
            for c in cols:
                if c in ds.categorical:
                    cats = sorted(v for v in tr[c].dropna().unique())
                    for v in cats:
                        x = (tr[c] == v).to_numpy(np.float64)[tr[c].notna().to_numpy()]
                        self.specs.append((b, c, v))
                        self.mean.append(float(x.mean()))
                        self.scale.append(1.0)
                else:
                    x = tr[c].to_numpy(np.float64)
                    x = x[~np.isnan(x)]
                    mu = float(x.mean()) if len(x) else 0.0
                    sd = float(x.std()) if len(x) > 1 else 1.0
                    self.specs.append((b, c, None))
                    self.mean.append(mu)
                    self.scale.append(sd if sd > 1e-8 else 1.0)
        self.col_block = np.array([s[0] for s in self.specs])  # (P,)
        self.mean_a = np.array(self.mean)
        self.scale_a = np.array(self.scale)

    def transform(self, ds: RealDataset, idx: np.ndarray, visible: np.ndarray) -> np.ndarray:
        """(N, P) float64; ``visible`` (N, M) bool — blocks not visible are set to the mean."""
        fr = ds.frame.iloc[idx]
        X = np.empty((len(idx), len(self.specs)))
        for j, (b, c, v) in enumerate(self.specs):
            if v is None:
                x = fr[c].to_numpy(np.float64)
            else:
                x = np.where(fr[c].isna().to_numpy(), np.nan, (fr[c] == v).to_numpy(np.float64))
            x = np.where(np.isnan(x), self.mean_a[j], x)
            x = np.where(visible[:, b], x, self.mean_a[j])
            X[:, j] = (x - self.mean_a[j]) / self.scale_a[j]
        return X

    def columns(self, subset: np.ndarray) -> np.ndarray:
        """Column indices of the blocks in ``subset`` (M,) bool."""
        return np.flatnonzero(subset[self.col_block])


@dataclass
class FittedCox:
    model: Any
    alpha: float
    columns: np.ndarray

    def risk(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(X[:, self.columns], alpha=self.alpha)


def fit_encox(X: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray,
              settings: RunSettings, seed: int, columns: Optional[np.ndarray] = None) -> Optional[FittedCox]:
    """Elastic-net Cox with the penalty chosen by inner CV on these (training) rows only.

    Args:
        X: (N, P) design; time, event: (N,); groups: (N,) patient index (copies share one).
        columns: the columns to use (default all).

    Returns:
        the fitted path + chosen alpha, or None when there are too few events to fit.
    """
    import warnings

    from sklearn.model_selection import StratifiedKFold
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    cols = np.arange(X.shape[1]) if columns is None else np.asarray(columns)
    Xc = X[:, cols]
    if event.sum() < 5 or Xc.shape[1] == 0:
        return None
    y = Surv.from_arrays(event.astype(bool), time)

    def fit(rows, alphas=None):
        m = CoxnetSurvivalAnalysis(l1_ratio=settings.l1_ratio, n_alphas=settings.n_alphas,
                                   alphas=alphas, alpha_min_ratio=0.01, max_iter=20000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.fit(Xc[rows], y[rows])
        return m

    full = fit(np.arange(len(Xc)))
    alphas = full.alphas_
    # inner CV by patient (a patient's augmented copies stay on one side), stratified on event
    pat, first = np.unique(groups, return_index=True)
    pat_event = event[first]
    skf = StratifiedKFold(n_splits=settings.inner_folds, shuffle=True, random_state=seed)
    loss = np.zeros(len(alphas))
    ok = np.ones(len(alphas), bool)
    for tr_p, va_p in skf.split(pat, pat_event):
        tr = np.isin(groups, pat[tr_p])
        va = np.isin(groups, pat[va_p])
        try:
            m = fit(np.flatnonzero(tr), alphas=alphas)
        except (ArithmeticError, ValueError):
            continue
        fitted = m.alphas_
        for k, a in enumerate(alphas):
            if k >= len(fitted):
                ok[k] = False
                continue
            eta = m.predict(Xc[va], alpha=a)
            v = cox_nll(eta, time[va], event[va])
            if not np.isfinite(v):
                ok[k] = False
            else:
                loss[k] += v
    best = int(np.argmin(np.where(ok, loss, np.inf))) if ok.any() else len(alphas) // 2
    return FittedCox(full, float(alphas[best]), cols)


# ----------------------------------------------------------------------------------------------
# ClinFuseDiff fusion on blocks


class BlockTables:
    """One ``TabularTable`` per block (rows for every patient; absent cells empty)."""

    def __init__(self, ds: RealDataset):
        from ..data.tabular import TabularTable

        self.ids = list(ds.frame.index)
        self.tables = {}
        for b, cols in ds.blocks.items():
            sub = ds.frame[cols]
            rows = []
            for pid, rec in zip(self.ids, sub.to_dict(orient="records")):
                row = {"patient_id": pid}
                for c in cols:
                    v = rec[c]
                    row[c] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                rows.append(row)
            cats = [c for c in cols if c in ds.categorical]
            self.tables[b] = TabularTable.from_rows(rows, columns=cols, categorical=cats, name=b,
                                                    source=f"{ds.name}:{b}", header=["patient_id", *cols])


def _nn_config(ds: RealDataset, fusion: str, settings: RunSettings):
    from ..config import Config, TabularModalityConfig

    cfg = Config()
    cfg.data.modalities = list(ds.blocks)
    cfg.data.tabular = {b: TabularModalityConfig(file="-", columns=list(cols),
                                                 categorical=[c for c in cols if c in ds.categorical])
                        for b, cols in ds.blocks.items()}
    cfg.data.task = "survival"
    cfg.model.fusion = fusion
    cfg.model.embed_dim = settings.embed_dim
    cfg.model.tabular_hidden = [settings.hidden]
    cfg.model.head_hidden = settings.hidden
    cfg.model.attention_heads = 4
    cfg.model.dropout = 0.1
    return cfg


def _tab_batch(feats: dict, rows: np.ndarray) -> dict:
    import torch

    return {b: {k: torch.from_numpy(v[rows]) for k, v in f.items()} for b, f in feats.items()}


def _mean_subset_c(model, tokens, natural, time, event, subsets) -> float:
    import torch

    cs = []
    with torch.no_grad():
        for s in subsets:
            rows = np.flatnonzero((natural | ~s).all(axis=1))
            if len(rows) < 2:
                continue
            av = torch.from_numpy(natural[rows] & s)
            r = model.predict_from_tokens(tokens[rows], av).reshape(-1).numpy()
            c = concordance_index(r, time[rows], event[rows])
            if np.isfinite(c):
                cs.append(c)
    return float(np.mean(cs)) if cs else -math.inf


@dataclass
class FusionFit:
    """A ClinFuseDiff model trained on one fold's training patients (eval mode).

    ``feats``: every patient's normalised block features (normalisers fitted on ``inner_tr``);
    ``tokens(idx)`` encodes patients ``idx`` on the blocks they naturally have -> (n, M, E).
    """

    model: Any
    feats: dict
    natural: np.ndarray  # (N, M) bool, the cohort's natural block availability
    inner_tr: np.ndarray
    inner_val: np.ndarray
    best_step: int
    inner_val_c: float

    def tokens(self, idx: np.ndarray):
        import torch

        with torch.no_grad():
            return self.model.encode({"tabular": _tab_batch(self.feats, idx)},
                                     torch.from_numpy(self.natural[idx]))  # (n, M, E)


def fit_predict_fusion(ds: RealDataset, tables: BlockTables, fusion: str, train_idx: np.ndarray,
                       test_idx: np.ndarray, natural: np.ndarray, settings: RunSettings, seed: int):
    """Train one ClinFuseDiff model on the fold's training patients; return a risk function.

    Returns:
        (predict(test_rows_local, visible (n, M) bool) -> risk (n,), info dict); the trained
        ``FusionFit`` is ``predict.fit`` (the teacher of the imputer methods).
    """
    import torch

    fit = train_fusion(ds, tables, fusion, train_idx, natural, settings, seed)
    test_tokens = fit.tokens(test_idx)  # (n, M, E)

    def predict(local_rows: np.ndarray, visible: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = fit.model.predict_from_tokens(test_tokens[local_rows], torch.from_numpy(visible))
        return out.reshape(-1).numpy().astype(np.float64)

    predict.fit = fit  # type: ignore[attr-defined]
    return predict, {"best_step": fit.best_step, "inner_val_c": fit.inner_val_c}


def train_fusion(ds: RealDataset, tables: BlockTables, fusion: str, train_idx: np.ndarray,
                 natural: np.ndarray, settings: RunSettings, seed: int) -> FusionFit:
    """Train one ClinFuseDiff model (``fusion`` = mean | attention) on training patients only.

    Block dropout uniform over the non-empty subsets of the blocks each patient has; fixed budget
    of ``settings.nn_steps`` on 80% of ``train_idx``, the step kept by the mean-over-subsets C on
    the other 20% (module docstring).
    """
    import copy

    import torch

    from ..data.tabular import TabularNormalizer
    from ..models import build_model

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    perm = rng.permutation(train_idx)
    n_val = max(2, int(round(0.2 * len(perm))))
    inner_val, inner_tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    ids = tables.ids
    # normalisers fitted on the training patients of the fit (inner-train) only
    norms = {b: TabularNormalizer(t).fit([ids[i] for i in inner_tr]) for b, t in tables.tables.items()}
    dims = {b: n.dims() for b, n in norms.items()}
    feats = {b: n.transform(ids) for b, n in norms.items()}  # every patient, (N, F)
    cfg = _nn_config(ds, fusion, settings)
    model = build_model(cfg, dims)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.nn_lr, weight_decay=settings.nn_weight_decay)
    time_t = torch.from_numpy(ds.time.astype(np.float32))
    event_t = torch.from_numpy(ds.event.astype(np.float32))
    subsets = enumerate_block_subsets(natural.shape[1])
    val_tab = _tab_batch(feats, inner_val)
    best = (-math.inf, 0, copy.deepcopy(model.state_dict()))
    bs = min(settings.nn_batch, len(inner_tr))
    order, pos = rng.permutation(inner_tr), 0
    for step in range(1, settings.nn_steps + 1):
        if pos + bs > len(order):
            order, pos = rng.permutation(inner_tr), 0
        rows = order[pos:pos + bs]
        pos += bs
        model.train()
        cond = draw_subsets(natural[rows], rng)
        batch = {"tabular": _tab_batch(feats, rows), "available": torch.from_numpy(cond),
                 "available_full": torch.from_numpy(natural[rows]),
                 "time": time_t[rows], "event": event_t[rows]}
        loss = model.compute_losses(batch)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_ema()
        if step % settings.nn_eval_every == 0 or step == settings.nn_steps:
            model.eval()
            with torch.no_grad():
                tok = model.encode({"tabular": val_tab}, torch.from_numpy(natural[inner_val]))
            c = _mean_subset_c(model, tok, natural[inner_val], ds.time[inner_val], ds.event[inner_val], subsets)
            if c > best[0]:
                best = (c, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return FusionFit(model, feats, natural, inner_tr, inner_val, best[1], best[0])


def fit_predict_imputers(kinds: Sequence[str], ds: RealDataset, teacher: FusionFit, train_idx: np.ndarray,
                         test_idx: np.ndarray, settings: RunSettings, seed: int, subsets: np.ndarray,
                         info: dict) -> dict[str, Any]:
    """``cfd_diffusion`` / ``cfd_regressor`` on one fold (realdata/imputers.py).

    The imputers are trained on the teacher's frozen tokens of the fold's training patients only
    (``train_idx``), with the blocks they naturally have; the test patients' tokens are used only
    to predict and for the diagnostics (written into ``info``).

    Returns:
        {method: predict(test_rows_local, visible (n, M) bool) -> risk (n,)}; ``predict.net`` is
        the trained network.
    """
    from .imputers import ImputerSettings, diagnostics, fit_imputer, make_predict

    cfg = _nn_config(ds, "attention", settings)
    s = ImputerSettings(steps=settings.imputer_steps, batch_size=settings.imputer_batch,
                        lr=settings.imputer_lr, samples=settings.imputer_samples)
    natural = teacher.natural
    train_tokens = teacher.tokens(train_idx)  # (n_train, M, E), frozen
    test_tokens = teacher.tokens(test_idx)  # (n_test, M, E)
    out = {}
    for kind in kinds:
        t0 = _time.time()
        impute, net, meta = fit_imputer(kind, teacher.model, cfg, train_tokens, natural[train_idx], s, seed)
        info[f"{kind}_final_loss"] = meta["final_loss"]
        info[f"{kind}_train_seconds"] = round(_time.time() - t0, 2)
        out[kind] = make_predict(teacher.model, impute, test_tokens, seed)
        out[kind].net = net  # the trained network (EMA weights), for inspection and tests
        info[f"{kind}_diagnostics"] = diagnostics(teacher.model, impute, test_tokens, natural[test_idx],
                                                  subsets, seed)
    return out


# ----------------------------------------------------------------------------------------------
# one dataset


def _corrected_interval(values: np.ndarray, n_test: float, n_train: float) -> tuple[float, float, float]:
    """Mean and 95% Nadeau-Bengio corrected resampled-t interval over J CV test folds."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    J = len(v)
    if J == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if J < 2:
        return m, math.nan, math.nan
    se = math.sqrt((1.0 / J + n_test / n_train) * v.var(ddof=1))
    h = float(stats.t.ppf(0.975, J - 1)) * se
    return m, m - h, m + h


def run_dataset(ds: RealDataset, settings: RunSettings, progress: bool = True) -> dict:
    """All folds of one dataset; returns its results block (records + summary)."""
    from tqdm.auto import tqdm

    t0 = _time.time()
    if settings.max_patients and len(ds.frame) > settings.max_patients:
        rng = np.random.default_rng(settings.seed)
        keep = np.sort(rng.choice(len(ds.frame), settings.max_patients, replace=False))
        ds = RealDataset(ds.name, ds.frame.iloc[keep], ds.blocks, ds.categorical, ds.source,
                         ds.endpoint, ds.notes)
    natural_all = ds.block_available()  # (N, M)
    has_any = natural_all.any(axis=1)
    if not has_any.all():
        log.warning("%s: %d patients have no block at all; left out", ds.name, int((~has_any).sum()))
        ds = RealDataset(ds.name, ds.frame.iloc[np.flatnonzero(has_any)], ds.blocks, ds.categorical,
                         ds.source, ds.endpoint, ds.notes)
        natural_all = ds.block_available()
    blocks = list(ds.blocks)
    M = len(blocks)
    subsets = enumerate_block_subsets(M)
    subset_names = ["+".join(b for b, k in zip(blocks, s) if k) for s in subsets]
    time, event = ds.time, ds.event
    horizon = float(np.median(time))
    tables = BlockTables(ds) if any(m in NN_METHODS + IMPUTER_METHODS for m in settings.methods) else None
    folds = make_folds(event, settings.folds, settings.repeats, settings.seed)
    records: list[dict] = []
    fold_info: list[dict] = []
    it = tqdm(folds, desc=ds.name, disable=not progress)
    for (r, f, tr, te) in it:
        fseed = settings.seed * 100_000 + r * 100 + f
        nat_tr, nat_te = natural_all[tr], natural_all[te]
        preds: dict[str, Any] = {}  # method -> fn(local test rows, visible (n, M)) -> risk
        info: dict[str, Any] = {"repeat": r, "fold": f, "n_train": len(tr), "n_test": len(te)}
        cox_needed = [m for m in settings.methods if m in COX_METHODS]
        if cox_needed:
            design = CoxDesign(ds, tr)

            def X_te(visible: np.ndarray, rows: np.ndarray) -> np.ndarray:
                return design.transform(ds, te[rows], visible)

            if "encox_meanimp" in settings.methods:
                Xtr = design.transform(ds, tr, nat_tr)
                fit = fit_encox(Xtr, time[tr], event[tr], np.arange(len(tr)), settings, fseed)
                preds["encox_meanimp"] = (lambda fit: lambda rows, vis: fit.risk(X_te(vis, rows)))(fit)
                info["alpha_meanimp"] = fit.alpha if fit else None
            if "encox_dropout" in settings.methods:
                rng = np.random.default_rng(fseed)
                reps = np.repeat(np.arange(len(tr)), settings.cox_copies)
                vis = draw_subsets(nat_tr[reps], rng)
                Xtr = design.transform(ds, tr[reps], vis)
                fit = fit_encox(Xtr, time[tr][reps], event[tr][reps], reps, settings, fseed)
                preds["encox_dropout"] = (lambda fit: lambda rows, vis: fit.risk(X_te(vis, rows)))(fit)
                info["alpha_dropout"] = fit.alpha if fit else None
            if "encox_subset" in settings.methods:
                per: dict[bytes, Optional[FittedCox]] = {}
                for s in subsets:
                    rows_s = np.flatnonzero((nat_tr | ~s).all(axis=1))
                    Xs = design.transform(ds, tr[rows_s], np.broadcast_to(s, (len(rows_s), M)))
                    per[s.tobytes()] = fit_encox(Xs, time[tr][rows_s], event[tr][rows_s], rows_s,
                                                 settings, fseed, columns=design.columns(s))

                def subset_predict(rows: np.ndarray, vis: np.ndarray, per=per) -> np.ndarray:
                    out = np.zeros(len(rows))
                    keys = [v.tobytes() for v in vis]
                    for k in set(keys):
                        sel = np.array([kk == k for kk in keys])
                        fit = per.get(k)
                        if fit is not None:  # no model (too few events): constant risk
                            out[sel] = fit.risk(X_te(vis[sel], rows[sel]))
                    return out

                preds["encox_subset"] = subset_predict
                info["subset_models"] = sum(v is not None for v in per.values())
        for m in settings.methods:
            if m in NN_METHODS:
                t_m = _time.time()
                fn, nn_info = fit_predict_fusion(ds, tables, m.split("_", 1)[1], tr, te, natural_all,
                                                 settings, fseed)
                preds[m] = fn
                info[f"{m}_best_step"] = nn_info["best_step"]
                info[f"{m}_seconds"] = round(_time.time() - t_m, 2)
        imputers = [m for m in settings.methods if m in IMPUTER_METHODS]
        if imputers:
            t_m = _time.time()
            # the teacher: this fold's cfd_attention (trained here with the same seed when the
            # method itself is not run, so it is the model cfd_attention would be)
            teacher = preds[TEACHER].fit if TEACHER in preds else train_fusion(
                ds, tables, "attention", tr, natural_all, settings, fseed)
            if TEACHER not in preds:
                info["teacher_seconds"] = round(_time.time() - t_m, 2)
            preds.update(fit_predict_imputers(imputers, ds, teacher, tr, te, settings, fseed, subsets, info))
        # evaluation: every subset among patients who have it, and the natural test set
        evals = [(name, s) for name, s in zip(subset_names, subsets)] + [("natural", None)]
        for name, s in evals:
            if s is None:
                rows = np.arange(len(te))
                vis = nat_te
            else:
                rows = np.flatnonzero((nat_te | ~s).all(axis=1))
                vis = np.broadcast_to(s, (len(rows), M)).copy()
            if len(rows) < 2:
                continue
            for m, fn in preds.items():
                risk = fn(rows, vis)
                tt, ee = time[te][rows], event[te][rows]
                records.append({
                    "repeat": r, "fold": f, "method": m, "subset": name,
                    "size": int(s.sum()) if s is not None else None, "n": len(rows),
                    "events": int(ee.sum()),
                    "c_index": concordance_index(risk, tt, ee),
                    "td_auc": td_auc(risk, tt, ee, time[tr], event[tr], horizon),
                })
        fold_info.append(info)
    summary = summarise(records, settings.methods, M, len(ds.frame), settings.folds)
    return {
        "name": ds.name, "source": ds.source, "endpoint": ds.endpoint, "notes": ds.notes,
        "patients": len(ds.frame), "events": int(event.sum()), "horizon": horizon,
        "blocks": ds.blocks, "subsets": subset_names, "missingness": missingness(ds),
        "seconds": _time.time() - t0, "folds": fold_info, "records": records, "summary": summary,
    }


def summarise(records: list[dict], methods: Sequence[str], M: int, n_patients: int, folds: int) -> dict:
    """Per method and metric: mean over subsets / singletons / full set / natural (+ intervals)."""
    n_test = n_patients / folds
    n_train = n_patients - n_test
    out: dict[str, dict] = {}
    keys = sorted({(r["repeat"], r["fold"]) for r in records})
    groups = {"mean_subsets": lambda r: r["size"] is not None,
              "singletons": lambda r: r["size"] == 1,
              "full": lambda r: r["size"] == M,
              "natural": lambda r: r["subset"] == "natural"}

    def per_fold(method: str, metric: str, sel) -> np.ndarray:
        vals = []
        for k in keys:
            v = [r[metric] for r in records
                 if r["method"] == method and (r["repeat"], r["fold"]) == k and sel(r)]
            v = [x for x in v if x is not None and np.isfinite(x)]
            vals.append(float(np.mean(v)) if v else math.nan)
        return np.array(vals)

    for m in methods:
        out[m] = {}
        for metric in ("c_index", "td_auc"):
            out[m][metric] = {}
            for g, sel in groups.items():
                v = per_fold(m, metric, sel)
                mean, lo, hi = _corrected_interval(v, n_test, n_train)
                entry = {"mean": mean, "lo": lo, "hi": hi}
                if m != REFERENCE and REFERENCE in methods:
                    d = v - per_fold(REFERENCE, metric, sel)
                    dm, dlo, dhi = _corrected_interval(d, n_test, n_train)
                    entry.update({"diff_vs_ref": dm, "diff_lo": dlo, "diff_hi": dhi})
                if m != TEACHER and TEACHER in methods and any(x in methods for x in IMPUTER_METHODS):
                    d = v - per_fold(TEACHER, metric, sel)
                    dm, dlo, dhi = _corrected_interval(d, n_test, n_train)
                    entry.update({"diff_vs_teacher": dm, "diff_teacher_lo": dlo, "diff_teacher_hi": dhi})
                out[m][metric][g] = entry
    return out


# ----------------------------------------------------------------------------------------------
# report


def _fmt(e: dict, diff: bool = False) -> str:
    if diff:
        if "diff_vs_ref" not in e:
            return "ref"
        return f"{e['diff_vs_ref']:+.3f} [{e['diff_lo']:+.3f}, {e['diff_hi']:+.3f}]"
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def format_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Real cohorts, tabular blocks: {s['folds']}-fold CV x {s['repeats']} repeats (seed {s['seed']})", "",
             f"Command: `{results.get('command', '')}`  ", f"Wall time: {results['seconds']:.0f} s", "",
             "Intervals: 95%, Nadeau-Bengio corrected resampled t over the folds x repeats test folds; "
             f"diff = paired difference vs `{REFERENCE}` (same folds).", ""]
    for d in results["datasets"]:
        lines += [f"## {d['name']} ({d['patients']} patients, {d['events']} events; {d['endpoint']}; "
                  f"td-AUROC horizon {d['horizon']:.0f})", ""]
        lines.append("Blocks: " + "; ".join(
            f"**{b}** ({', '.join(c)}; block missing for {d['missingness'][b]['patients_missing_block']} patients)"
            for b, c in d["blocks"].items()))
        lines += ["", "| method | C mean subsets | diff vs ref | C singletons | C full | C natural | "
                  "tdAUC mean subsets | diff vs ref | tdAUC singletons | tdAUC full |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, e in d["summary"].items():
            c, a = e["c_index"], e["td_auc"]
            lines.append(f"| {m} | {_fmt(c['mean_subsets'])} | {_fmt(c['mean_subsets'], True)} | "
                         f"{_fmt(c['singletons'])} | {_fmt(c['full'])} | {_fmt(c['natural'])} | "
                         f"{_fmt(a['mean_subsets'])} | {_fmt(a['mean_subsets'], True)} | "
                         f"{_fmt(a['singletons'])} | {_fmt(a['full'])} |")
        # per-subset C-index table
        methods = list(d["summary"])
        lines += ["", "C-index per subset (mean over folds):", "",
                  "| subset | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for sub in d["subsets"] + ["natural"]:
            row = []
            for m in methods:
                v = [r["c_index"] for r in d["records"] if r["method"] == m and r["subset"] == sub
                     and np.isfinite(r["c_index"])]
                row.append(f"{np.mean(v):.3f}" if v else "-")
            lines.append(f"| {sub} | " + " | ".join(row) + " |")
        lines += _imputer_markdown(d)
        lines += ["", f"({d['seconds']:.0f} s)", ""]
    return "\n".join(lines) + "\n"


def _imputer_markdown(d: dict) -> list[str]:
    """Tables of cfd_diffusion / cfd_regressor: paired difference vs the cfd_attention teacher,
    and the imputation diagnostics (mean over folds, by subset size)."""
    kinds = [m for m in IMPUTER_METHODS if m in d["summary"]]
    if not kinds:
        return []
    lines = []
    if "diff_vs_teacher" in d["summary"][kinds[0]]["c_index"]["mean_subsets"]:
        lines += ["", f"Paired difference vs `{TEACHER}` (the frozen teacher of the imputers; same folds):", "",
                  "| method | C mean subsets | C singletons | C full | tdAUC mean subsets |", "|---|---|---|---|---|"]
        def f(e: dict) -> str:
            return f"{e['diff_vs_teacher']:+.3f} [{e['diff_teacher_lo']:+.3f}, {e['diff_teacher_hi']:+.3f}]"

        for m in kinds:
            c, a = d["summary"][m]["c_index"], d["summary"][m]["td_auc"]
            lines.append(f"| {m} | {f(c['mean_subsets'])} | {f(c['singletons'])} | {f(c['full'])} | "
                         f"{f(a['mean_subsets'])} |")
    M = len(d["blocks"])
    lines += ["", "Imputation diagnostics on the test patients (mean over folds; by subset size 1..M): "
              "cosine of the imputation to the teacher's full-set fusion, the teacher's own fusion of the "
              "subset for comparison, cosine between two samples of one condition, std over the K samples "
              "of the risk (log-hazard):", "",
              "| method | quantity | " + " | ".join(f"size {k}" for k in range(1, M + 1)) + " |",
              "|---|---|" + "---|" * M]
    names = {"cosine_to_full_by_size": "cosine to full-set target",
             "teacher_subset_cosine_by_size": "teacher on subset, cosine to target",
             "sample_pair_cosine_by_size": "cosine between two samples",
             "risk_sample_std_by_size": "risk std over samples"}
    for m in kinds:
        diag = [f[f"{m}_diagnostics"] for f in d["folds"] if f"{m}_diagnostics" in f]
        for key, label in names.items():
            v = np.nanmean(np.array([g[key] for g in diag], np.float64), axis=0)
            lines.append(f"| {m} | {label} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
        secs = [f[f"{m}_train_seconds"] for f in d["folds"] if f"{m}_train_seconds" in f]
        if secs:
            lines.append(f"| {m} | training seconds per fold | {np.mean(secs):.1f} |" + " |" * (M - 1))
    return lines


def run_realdata(datasets: Sequence[str], out_dir: str | Path, settings: Optional[RunSettings] = None,
                 command: str = "", progress: bool = True) -> dict:
    """Run the protocol on each dataset; write ``results.json`` and ``results.md`` atomically.

    Raises:
        ImportError: the ``benchmark`` extra (scikit-survival, SurvSet) is not installed.
    """
    settings = settings or RunSettings()
    try:
        import sksurv  # noqa: F401
    except ImportError as e:
        raise ImportError(f"clinfusediff realdata needs scikit-survival; {INSTALL_HINT}") from e
    unknown = [m for m in settings.methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"methods {unknown} not in {list(ALL_METHODS)}")
    t0 = _time.time()
    out = Path(out_dir)
    res: dict[str, Any] = {"schema": SCHEMA, "command": command,
                           "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                        for k, v in settings.__dict__.items()},
                           "reference_method": REFERENCE, "datasets": []}
    for name in datasets:
        ds = load_dataset(name)
        res["datasets"].append(run_dataset(ds, settings, progress=progress))
        res["seconds"] = _time.time() - t0
        atomic_write_json(out / "results.json", res)  # partial results survive a later failure
        atomic_write_text(out / "results.md", format_markdown(res))
    res["seconds"] = _time.time() - t0
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", format_markdown(res))
    return res
