"""The Predictor: checkpoint -> per-patient prediction, with TTT, uncertainty and contributions.

One code path for the CLI (``clinfusediff infer``), the evaluation and the Slicer module::

    pred = Predictor.from_checkpoint("outputs/demo/diffusion/best.pt")
    out = pred.predict_one(PatientInput({"mri_t1": vol_t1, "ct": "ct.nii.gz"},
                                        tabular={"clinical": {"age": 61, "sex": "F"}}))
    out.probabilities, out.uncertainty["mutual_information"], out.contributions, out.to_dict()

Inputs are volumes (``Volume`` objects or image files; preprocessed with
``data.preprocess.preprocess_patient``, then ``model.encode``) or cached tokens (B, M, E) with
their availability mask. The encoders run once per patient; TTT, the K diffusion samples and
the leave-one-out contributions all reuse those tokens.

Uncertainty (classification) from the K samples' class probabilities p_k:
``std`` = standard deviation over k of the predicted class's probability; ``entropy`` =
H(mean_k p_k) (total predictive entropy, nats); ``expected_entropy`` = mean_k H(p_k) (aleatoric);
``mutual_information`` = entropy - expected_entropy (epistemic: disagreement between samples).
Survival / regression: ``std`` of the output over the samples. Mean/attention checkpoints are
deterministic (K = 1; uncertainty from the single prediction only).

Contribution of modality m (leave-one-out): prediction with everything available minus the
prediction without m — the change in the predicted class's probability (or in the risk /
value) when m is removed, computed with the same diffusion noise (and with TTT for each
variant when TTT is on). Positive = m supports the prediction. Defined when >= 2 modalities are
available.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .utils import safe_id


@dataclass
class PatientInput:
    """One patient for ``Predictor.predict``.

    Attributes:
        images: image modality -> ``Volume`` or file path (only the ones the patient has).
        tabular: tabular modality -> {column: value} (one row; missing values allowed).
        patient_id: used in outputs (letters, digits, ``._-``).
    """

    images: dict[str, Any] = field(default_factory=dict)
    tabular: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    patient_id: str = "patient"


@dataclass
class Prediction:
    """What the Predictor returns for one patient (``to_dict()`` gives plain JSON data).

    Attributes:
        patient_id: the patient.
        task: ``classification`` | ``survival`` | ``regression``.
        modalities_used: the available modalities the prediction conditioned on.
        probabilities: (C,) class probabilities, mean over samples (classification).
        probability_samples: (K, C) the K samples' class probabilities (classification), for
            percentile intervals; ``probabilities`` is their mean.
        predicted_class: argmax of ``probabilities``.
        risk: log-hazard (survival) or value (regression), mean over samples.
        risk_samples: (K,) the K samples' risk / value (survival, regression); ``risk`` is
            their mean.
        uncertainty: ``std``, ``entropy``, ``expected_entropy``, ``mutual_information``,
            ``num_samples`` (see module docstring).
        contributions: modality -> leave-one-out change (see module docstring).
        ttt: {"used", "accepted", "loss_before", "loss_after", "steps", "params"}.
        imputed_modalities: modalities whose tokens the checkpoint's token imputer filled in
            (``model.token_imputer``; empty otherwise).
        timings: seconds of this call: ``encode``, ``ttt``, ``sampling``, ``total`` (shared by
            the ``batch_size`` patients of the call).
    """

    patient_id: str
    task: str
    modalities_used: list[str]
    probabilities: Optional[list[float]] = None
    probability_samples: Optional[list[list[float]]] = None
    predicted_class: Optional[int] = None
    risk: Optional[float] = None
    risk_samples: Optional[list[float]] = None
    uncertainty: dict[str, float] = field(default_factory=dict)
    contributions: dict[str, float] = field(default_factory=dict)
    ttt: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    imputed_modalities: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp_min(1e-12)
    return -(p * p.log()).sum(-1)


class Predictor:
    """A trained model ready for per-patient prediction.

    Args:
        model: a ``ClinFuseDiffModel`` (eval mode; never modified, also not by TTT).
        cfg: its ``Config``.
        tabular_state: {modality: TabularNormalizer state} from the checkpoint.
        feature_bank: {"tokens": (N, M, E), "available": (N, M)} (TTT's contrastive negatives).
        device: where the model runs.
    """

    def __init__(self, model, cfg, tabular_state: Optional[Mapping[str, Any]] = None,
                 feature_bank: Optional[Mapping[str, Any]] = None, device: str = "cpu",
                 source: Optional[str] = None) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.modalities: list[str] = list(model.modalities)
        self.task: str = model.task
        self.tabular_state = dict(tabular_state or {})
        self.feature_bank = dict(feature_bank) if feature_bank else None
        self.device = torch.device(device)
        self.source = source

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "Predictor":
        """Load a checkpoint written by training (``torch.load(weights_only=True)``).

        Args:
            path: the ``.pt`` file (e.g. ``<run>/diffusion/best.pt``).
            device: ``cpu``, ``cuda`` or ``auto``.
        """
        from .config import Config
        from .data.tabular import TabularDims
        from .models import build_model
        from .training.checkpoint import load_checkpoint, load_model_state
        from .utils import resolve_device

        device = resolve_device(device)
        ckpt = load_checkpoint(path, map_location="cpu")
        cfg = Config.from_dict(ckpt["config"])
        dims = {k: TabularDims.from_dict(v) for k, v in (ckpt.get("tabular_dims") or {}).items()}
        model = build_model(cfg, dims)
        # one line naming what differs, not torch's dump of every key (CheckpointError)
        load_model_state(model, ckpt["model"], path)
        if list(ckpt["modalities"]) != list(model.modalities):
            raise ValueError(f"checkpoint {path}: modalities {ckpt['modalities']} differ from its "
                             f"config's data.modalities {model.modalities}")
        model.to(device).eval()
        bank = ckpt.get("feature_bank")
        if bank is not None:
            bank = {"tokens": bank["tokens"].to(device), "available": bank["available"].to(device)}
        from .training.runstate import training_status

        pr = cls(model, cfg, ckpt.get("tabular_state"), bank, device, source=str(path))
        # (finished, description) of the checkpoint's training; `infer` refuses unfinished ones
        pr.training_status = training_status(ckpt)
        return pr

    @property
    def is_diffusion(self) -> bool:
        return self.model.fusion_type == "diffusion"

    # ------------------------------------------------------------------------------------
    def make_batch(self, patients: Sequence[PatientInput]) -> dict[str, Any]:
        """Preprocess patients into a batch (docs/ARCHITECTURE.md) plus their availability."""
        from .data.preprocess import preprocess_patient
        from .data.tabular import TabularNormalizer, TabularTable

        m = self.model
        img_mods, tab_mods = m.image_modalities, m.tabular_modalities
        known = set(self.modalities)
        shape = tuple(self.cfg.preprocessing.target_shape)
        B = len(patients)
        images = torch.zeros(B, len(img_mods), 1, *shape)  # (B, M_img, 1, D, H, W)
        available = torch.zeros(B, len(self.modalities), dtype=torch.bool)  # (B, M)
        tabular: dict[str, dict[str, list]] = {t: {"num": [], "num_missing": [], "cat": []} for t in tab_mods}
        for b, p in enumerate(patients):
            pid = safe_id(p.patient_id)
            extra = sorted((set(p.images) | set(p.tabular)) - known)
            if extra:
                raise ValueError(f"patient {pid!r}: modalities {extra} are not in this model's "
                                 f"modalities {self.modalities}; drop them or use another checkpoint")
            bad = [k for k in p.images if k not in img_mods] + [k for k in p.tabular if k not in tab_mods]
            if bad:
                raise ValueError(f"patient {pid!r}: {bad} given as the wrong kind (image modalities: "
                                 f"{img_mods}, tabular: {tab_mods})")
            if not p.images and not p.tabular:
                raise ValueError(f"patient {pid!r} has no modality; give at least one image or tabular row")
            if p.images:
                pre = preprocess_patient(dict(p.images), self.cfg.preprocessing, patient_id=pid)
                for j, name in enumerate(img_mods):
                    if name in pre.images:
                        images[b, j, 0] = torch.from_numpy(np.ascontiguousarray(pre.images[name]))
                        available[b, self.modalities.index(name)] = True
            for t in tab_mods:
                state = self.tabular_state.get(t)
                if state is None:
                    raise ValueError(f"checkpoint has no tabular normaliser for {t!r}; re-train with it")
                norm = TabularNormalizer.from_state(state)
                if t in p.tabular:
                    idc = self.cfg.data.id_column
                    row = {idc: pid, **{k: v for k, v in p.tabular[t].items() if k != idc}}
                    cols = norm.numeric_columns + norm.categorical_columns
                    table = TabularTable.from_rows([row], id_column=idc, columns=None,
                                                   categorical=list(norm.categorical_columns), name=t,
                                                   header=[idc, *cols], quiet=True)
                    f = norm.transform([pid], table)
                    available[b, self.modalities.index(t)] = True
                else:
                    f = {"num": np.zeros((1, len(norm.numeric_columns)), np.float32),
                         "num_missing": np.ones((1, len(norm.numeric_columns)), np.float32),
                         "cat": np.zeros((1, len(norm.categorical_columns)), np.int64)}
                for k in ("num", "num_missing", "cat"):
                    tabular[t][k].append(torch.from_numpy(f[k][0]))
        tab = {t: {k: torch.stack(v) for k, v in d.items()} for t, d in tabular.items()}
        return {"images": images, "tabular": tab, "available": available,
                "patient_id": [p.patient_id for p in patients]}

    @torch.no_grad()
    def encode(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Tokens (B, M, E) of the available modalities (encoders run once per patient)."""
        b = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if "tabular" in b:
            b["tabular"] = {t: {k: v.to(self.device) for k, v in d.items()} for t, d in b["tabular"].items()}
        return self.model.encode(b, b["available"])

    # ------------------------------------------------------------------------------------
    def predict_one(self, patient: PatientInput, **kwargs: Any) -> Prediction:
        """``predict([patient])[0]``."""
        return self.predict([patient], **kwargs)[0]

    def predict(
        self,
        patients: Optional[Sequence[PatientInput]] = None,
        *,
        tokens: Optional[torch.Tensor] = None,
        available: Optional[torch.Tensor] = None,
        patient_ids: Optional[Sequence[str]] = None,
        ttt: Optional[bool] = None,
        samples: Optional[int] = None,
        contributions: bool = True,
        seed: int = 0,
    ) -> list[Prediction]:
        """Predict for a batch of patients, from volumes or from cached tokens.

        Args:
            patients: PatientInputs (volumes / tabular rows), or None when ``tokens`` are given.
            tokens: (B, M, E) cached tokens; available: (B, M) bool (required with tokens).
            patient_ids: names for the token rows (default ``patient_<i>``).
            ttt: adapt per patient (default: ``cfg.ttt.enabled`` for diffusion checkpoints,
                False otherwise). Attention checkpoints adapt by MiDl TTT (``cfg.ttt.midl_*``);
                True on a mean checkpoint is an error.
            samples: K diffusion samples (default ``cfg.diffusion.num_samples``; 1 for baselines).
            contributions: also compute the leave-one-out contribution of each modality.
            seed: seeds the diffusion and TTT noise (patient b uses seed * 100003 + b).

        Returns:
            one ``Prediction`` per patient.
        """
        from .ttt import adapt_and_predict

        t_start = time.perf_counter()
        t_enc = 0.0
        if patients is not None:
            if tokens is not None:
                raise ValueError("give either patients or tokens, not both")
            if isinstance(patients, PatientInput):
                patients = [patients]
            batch = self.make_batch(list(patients))
            t0 = time.perf_counter()
            tokens = self.encode(batch)
            t_enc = time.perf_counter() - t0
            available = batch["available"]
            patient_ids = batch["patient_id"]
        elif tokens is None or available is None:
            raise ValueError("predict needs patients=[PatientInput, ...] or tokens=(B, M, E) with available=(B, M)")
        tokens = tokens.to(self.device).float()
        available = available.to(self.device).bool()
        B, M, E = tokens.shape
        if available.shape != (B, M) or M != len(self.modalities):
            raise ValueError(f"tokens {tuple(tokens.shape)} / available {tuple(available.shape)} must be "
                             f"(B, {len(self.modalities)}, E) / (B, {len(self.modalities)}) for {self.modalities}")
        ids = list(patient_ids) if patient_ids is not None else [f"patient_{i}" for i in range(B)]
        if len(ids) != B:
            raise ValueError(f"{len(ids)} patient_ids for {B} token rows; give one ID per row")
        if not bool(available.any(-1).all()):
            empty = [ids[i] for i in (~available.any(-1)).nonzero().flatten().tolist()]
            raise ValueError(f"patients {empty[:10]} have no available modality; every row of "
                             "available (B, M) needs at least one True (drop those patients)")
        if ttt is None:
            ttt = self.is_diffusion and self.cfg.ttt.enabled
        if ttt and not (self.is_diffusion or self.model.fusion_type == "attention"):
            raise ValueError(f"TTT needs a diffusion or attention checkpoint; this one has fusion="
                             f"{self.model.fusion_type!r}. Use ttt=False (--no-ttt)")
        imputer = getattr(self.model, "imputer", None)
        imputing = imputer is not None and imputer.is_fitted
        if ttt and imputing:
            raise ValueError("this checkpoint completes missing modalities with its token imputer "
                             "(model.token_imputer); MiDl TTT adapts the fusion on subsets of the available "
                             "modalities and is not used with it. Use ttt=False (--no-ttt)")
        if samples is None:
            samples = self.cfg.diffusion.num_samples if self.is_diffusion else 1
        K = int(samples)
        if K < 1:
            raise ValueError(f"samples must be >= 1, got {K}")

        # Episodes: each patient's full set, then (for contributions) the set minus each modality.
        rows_tok, rows_av, rows_seed, owner, dropped = [], [], [], [], []
        for b in range(B):
            variants = [(available[b], None)]
            have = available[b].nonzero().flatten().tolist()
            if contributions and len(have) >= 2:
                for j in have:
                    a = available[b].clone()
                    a[j] = False
                    variants.append((a, self.modalities[j]))
            for a, m in variants:
                rows_tok.append(tokens[b])
                rows_av.append(a)
                rows_seed.append(int(seed) * 100003 + b)
                owner.append(b)
                dropped.append(m)
        tok_r = torch.stack(rows_tok)  # (R, M, E)
        av_r = torch.stack(rows_av)  # (R, M)
        ttt_info: dict[str, Any] = {"used": bool(ttt)}
        t_ttt = t_samp = 0.0
        if self.is_diffusion:
            res = adapt_and_predict(
                self.model, tok_r, av_r, torch.tensor(rows_seed), self.cfg.ttt, num_samples=K,
                feature_bank=self.feature_bank, adapt=bool(ttt),
            )
            out = res.outputs.float().cpu()  # (K, R, C)
            t_ttt, t_samp = res.timings.get("adapt", 0.0), res.timings.get("sample", 0.0)
        elif ttt:  # attention: MiDl TTT, episodic per row (ttt/midl.py)
            from .ttt.midl import MiDlSettings, MiDlTTT

            c = self.cfg.ttt
            settings = MiDlSettings(steps=c.midl_steps, lr=c.midl_lr, params=c.midl_params, views=c.midl_views,
                                    anchor=c.midl_anchor,
                                    kl_max=float("inf") if c.midl_kl_max is None else float(c.midl_kl_max))
            t0 = time.perf_counter()
            midl = MiDlTTT(self.model.fusion, self.model.head, settings,
                           classification=self.task == "classification").adapt_episodes(
                tok_r.cpu(), av_r.cpu(), keys=torch.tensor(rows_seed) + torch.arange(len(rows_seed)))
            out = (midl.out.clamp_min(1e-12).log() if self.task == "classification" else midl.out).unsqueeze(0)
            t_ttt = time.perf_counter() - t0
            res = None
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.model.predict_from_tokens(tok_r, av_r).float().cpu().unsqueeze(0)  # (1, R, C)
            t_samp = time.perf_counter() - t0
            res = None
        total = time.perf_counter() - t_start
        timings = {"encode": t_enc, "ttt": t_ttt, "sampling": t_samp, "total": total, "batch_size": B}

        preds: list[Prediction] = []
        for b in range(B):
            rows = [r for r in range(len(owner)) if owner[r] == b]
            full = rows[0]
            o = out[:, full]  # (K, C)
            used = [self.modalities[j] for j in available[b].nonzero().flatten().tolist()]
            p = Prediction(patient_id=ids[b], task=self.task, modalities_used=used,
                           timings=dict(timings))
            if imputing:
                p.imputed_modalities = [m for m in self.modalities if m not in used]
            if self.task == "classification":
                pk = o.softmax(-1)  # (K, C)
                pm = pk.mean(0)  # (C,)
                c = int(pm.argmax())
                h = float(_entropy(pm))
                eh = float(_entropy(pk).mean())
                p.probabilities = [float(x) for x in pm]
                p.probability_samples = pk.tolist()  # (K, C)
                p.predicted_class = c
                p.uncertainty = {"std": float(pk[:, c].std(unbiased=False)), "entropy": h,
                                 "expected_entropy": eh, "mutual_information": max(0.0, h - eh),
                                 "num_samples": int(o.shape[0])}
                for r in rows[1:]:
                    p.contributions[dropped[r]] = float(pm[c] - out[:, r].softmax(-1).mean(0)[c])
            else:
                v = o[:, 0]  # (K,)
                p.risk = float(v.mean())
                p.risk_samples = v.tolist()  # (K,)
                p.uncertainty = {"std": float(v.std(unbiased=False)), "num_samples": int(o.shape[0])}
                for r in rows[1:]:
                    p.contributions[dropped[r]] = float(v.mean() - out[:, r, 0].mean())
            if ttt and not self.is_diffusion:
                p.ttt = {"used": True, "method": "midl", "accepted": bool(midl.accepted[full]),
                         "mi_before": float(midl.mi_before[full]), "mi_after": float(midl.mi_after[full]),
                         "anchor_kl": float(midl.anchor[full]), "steps": settings.steps,
                         "params": settings.params}
            elif res is not None and ttt:
                p.ttt = {"used": True, "accepted": bool(res.accepted[full]),
                         "loss_before": float(res.loss_before[full]),
                         "loss_after": float(res.loss_after[full]), "steps": res.steps,
                         "params": self.cfg.ttt.params, "n_params": res.n_params}
            else:
                p.ttt = dict(ttt_info)
            preds.append(p)
        return preds
