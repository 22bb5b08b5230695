"""Datasets, collate, missing-modality simulation and the patient-level split.

Every batch carries every modality slot of ``cfg.data.modalities`` in that order plus an
``available`` (B, M) mask (see docs/ARCHITECTURE.md)::

    batch = {
      "images":    (B, M_img, 1, D, H, W) float32  # image modalities in cfg order; zeros where absent
      "tabular":   {name: {"num": (B, F_num), "num_missing": (B, F_num), "cat": (B, F_cat) long}}
      "available": (B, M) bool    # after missing-modality simulation (training) — what the model may use
      "available_full":   (B, M) bool    # what the patient really has (before simulation)
      "target":    (B,) long (classification) | float (regression, survival: the time)
      "time", "event": (B,) float # survival outcome (NaN where unknown)
      "patient_id": list[str]
    }

``FeatureDataset`` gives the same batch with ``"tokens": (B, M, E)`` (cached encoder outputs)
instead of ``images``/``tabular``: the "features are computed once" path used by the fusion stage
of two-stage training, evaluation and TTT.

Missing-modality simulation (training only) is a change of ``available``, never of the data.
Its randomness, and the augmentation's, come from a generator seeded by (experiment seed,
epoch, patient index): a sample is a pure function of those three numbers, so resumed runs,
DDP ranks and DataLoader workers all see exactly the same draws as one uninterrupted process.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

TARGET_DTYPES = {"classification": torch.long, "regression": torch.float32, "survival": torch.float32}


# --------------------------------------------------------------------------------------------
# Missing-modality simulation
# --------------------------------------------------------------------------------------------
SUBSET_SAMPLING = ("independent", "uniform_subsets", "uniform_size")


class ModalityDropout:
    """Draws which of a patient's modalities the model may see during a training step.

    The allowed kept sets of a patient are the non-empty subsets of what it has with at least
    ``min(min_keep, #available)`` modalities that are not one of ``excluded_combinations`` (the
    never-drawn subsets of the unseen-combination protocol). ``mode`` says how they are weighed:

    * ``"independent"``: each available modality ``i`` is dropped independently with
      probability ``p_i``, conditioned on the kept set being allowed (the distribution rejection
      sampling would give, computed exactly by enumerating the subsets, M is small). With p = 0.3
      and 7 modalities, 1-2-modality sets are ~3% of the draws but 22% of the evaluated subsets.
    * ``"uniform_subsets"``: every allowed kept set equally likely — training weighs subsets
      as the all-subsets evaluation does (its mean over 2^M - 1 subsets).
    * ``"uniform_size"``: a size uniformly among the sizes that have an allowed set, then an
      allowed set of that size uniformly (small sets more often than ``uniform_subsets``).

    ``drop_prob``/``per_modality`` are used by ``"independent"`` only.

    Args:
        modalities: the modality order of the batch.
        drop_prob: drop probability of every modality without an entry in ``per_modality``.
        per_modality: ``{name: p}`` overrides.
        min_keep: minimum number of modalities kept (capped at the number available).
        excluded_combinations: lists of modality names; a kept set equal to one of them is
            never drawn.
        mode: one of ``SUBSET_SAMPLING`` (``data.subset_sampling``).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        drop_prob: float = 0.3,
        per_modality: Mapping[str, float] | None = None,
        min_keep: int = 1,
        excluded_combinations: Sequence[Sequence[str]] = (),
        mode: str = "independent",
    ):
        self.modalities = list(modalities)
        if mode not in SUBSET_SAMPLING:
            raise ValueError(f"data.subset_sampling={mode!r} is not one of {list(SUBSET_SAMPLING)}")
        self.mode = mode
        per_modality = dict(per_modality or {})
        for name, p in [("data.drop_prob", drop_prob), *per_modality.items()]:
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"drop probability {name}={p!r} must be in [0, 1]")
        unknown = sorted(set(per_modality) - set(self.modalities))
        if unknown:
            raise ValueError(
                f"data.drop_prob_per_modality names {unknown}, which are not in data.modalities "
                f"{self.modalities}; remove them or add the modality"
            )
        if min_keep < 1:
            raise ValueError(f"data.min_keep={min_keep} must be >= 1 (a patient needs one modality)")
        self.p = np.array([float(per_modality.get(m, drop_prob)) for m in self.modalities])
        self.min_keep = int(min_keep)
        self.excluded: set[frozenset[str]] = set()
        for combo in excluded_combinations:
            bad = sorted(set(combo) - set(self.modalities))
            if bad or not combo:
                raise ValueError(
                    f"data.excluded_combinations entry {list(combo)} names {bad or 'nothing'}; "
                    f"each entry must be a non-empty list of modalities from {self.modalities}"
                )
            self.excluded.add(frozenset(combo))
        self._table: dict[tuple[bool, ...], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_config(cls, data_cfg, modalities: Sequence[str]) -> ModalityDropout:
        return cls(
            modalities,
            drop_prob=data_cfg.drop_prob,
            per_modality=data_cfg.drop_prob_per_modality,
            min_keep=data_cfg.min_keep,
            excluded_combinations=data_cfg.excluded_combinations,
            mode=getattr(data_cfg, "subset_sampling", "independent"),
        )

    def is_excluded(self, mask: np.ndarray) -> bool:
        """True when the modalities set in ``mask`` (M,) form an excluded combination."""
        return frozenset(m for m, a in zip(self.modalities, mask) if a) in self.excluded

    def distribution(self, available: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The allowed kept-subsets of one patient and their probabilities.

        Args:
            available: (M,) bool — the modalities the patient has.

        Returns:
            ``(subsets (S, M) bool, probs (S,) float64)``; ``S == 0`` when no subset is allowed.
        """
        key = tuple(bool(a) for a in available)
        if key in self._table:
            return self._table[key]
        idx = [i for i, a in enumerate(key) if a]
        need = min(self.min_keep, len(idx))
        subsets, probs = [], []
        for bits in itertools.product([False, True], repeat=len(idx)):
            kept = [i for i, b in zip(idx, bits) if b]
            if len(kept) < max(need, 1):
                continue
            mask = np.zeros(len(self.modalities), dtype=bool)
            mask[kept] = True
            if self.is_excluded(mask):
                continue
            p = np.prod([1 - self.p[i] if b else self.p[i] for i, b in zip(idx, bits)])
            subsets.append(mask)
            probs.append(p)
        if not subsets:
            out = (np.zeros((0, len(self.modalities)), bool), np.zeros(0))
        elif self.mode == "uniform_subsets":
            out = (np.stack(subsets), np.full(len(subsets), 1.0 / len(subsets)))
        elif self.mode == "uniform_size":
            sizes = np.array([int(m.sum()) for m in subsets])
            uniq, counts = np.unique(sizes, return_counts=True)
            per_size = dict(zip(uniq.tolist(), counts.tolist()))
            probs_a = np.array([1.0 / (len(uniq) * per_size[int(k)]) for k in sizes])
            out = (np.stack(subsets), probs_a)
        else:
            probs_a = np.asarray(probs, dtype=np.float64)
            # All allowed subsets have probability 0 (e.g. p=1 everywhere): draw uniformly.
            probs_a = probs_a / probs_a.sum() if probs_a.sum() > 0 else np.full(len(probs), 1 / len(probs))
            out = (np.stack(subsets), probs_a)
        self._table[key] = out
        return out

    def can_sample(self, available: np.ndarray) -> bool:
        return len(self.distribution(available)[0]) > 0

    def __call__(self, available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw the kept mask for one patient.

        Args:
            available: (M,) bool, the modalities the patient has.
            rng: the numpy generator to draw from.

        Returns:
            (M,) bool, a subset of ``available``.
        """
        subsets, probs = self.distribution(available)
        if len(subsets) == 0:
            names = [m for m, a in zip(self.modalities, available) if a]
            raise ValueError(
                f"no allowed modality subset for a patient with {names} (min_keep={self.min_keep}, "
                f"excluded={sorted(sorted(c) for c in self.excluded)}); drop the patient from "
                "training or relax data.excluded_combinations"
            )
        return subsets[rng.choice(len(subsets), p=probs)].copy()


def sample_subset_masks(
    available: np.ndarray,
    mode: str,
    rng: np.random.Generator,
    min_keep: int = 1,
    excluded: Sequence[Sequence[int] | np.ndarray] = (),
    drop_prob: float = 0.3,
) -> np.ndarray:
    """Draw one kept-modality mask per row, without a Dataset (e.g. a token-level trainer).

    The same distributions as ``ModalityDropout`` (see there for ``mode``).

    Args:
        available: (N, M) bool, what each row (patient) really has; every row needs >= 1.
        mode: ``"independent" | "uniform_subsets" | "uniform_size"``.
        rng: the numpy generator to draw from (rows are drawn in order, one draw each).
        min_keep: minimum number of kept modalities (capped at what a row has).
        excluded: never-drawn kept sets, each an (M,) bool mask or a sequence of column indices.
        drop_prob: per-modality drop probability of ``"independent"``.

    Returns:
        (N, M) bool, each row a subset of the row of ``available``.
    """
    available = np.asarray(available, dtype=bool)
    if available.ndim != 2:
        raise ValueError(f"available must be (N, M) bool, got shape {available.shape}")
    m = available.shape[1]
    names = [str(i) for i in range(m)]
    combos = []
    for e in excluded:
        e = np.asarray(e)
        cols = np.flatnonzero(e) if e.dtype == bool else e.astype(int).ravel()
        if e.dtype == bool and e.shape != (m,):
            raise ValueError(f"an excluded mask must have shape ({m},), got {e.shape}")
        if len(cols) and (cols.min() < 0 or cols.max() >= m):
            raise ValueError(f"excluded combination {cols.tolist()} has a column outside 0..{m - 1}")
        combos.append([names[i] for i in cols])
    drop = ModalityDropout(names, drop_prob=drop_prob, min_keep=min_keep, excluded_combinations=combos,
                           mode=mode)
    return np.stack([drop(a, rng) for a in available]) if len(available) else np.zeros((0, m), bool)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """The generator of one (seed, epoch, sample, purpose) — independent of workers and ranks."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (2**32), epoch, index, stream]))


# --------------------------------------------------------------------------------------------
# Samples and datasets
# --------------------------------------------------------------------------------------------
@dataclass
class PatientSample:
    """What the dataset knows about one patient without loading its images.

    ``image_names`` are the image modalities the patient really has; ``tabular`` holds one
    ``{"num": (F_num,), "num_missing": (F_num,), "cat": (F_cat,)}`` per tabular modality the
    patient has a row for. ``target`` is the label (classification), value (regression) or
    time (survival); NaN where unknown.
    """

    patient_id: str
    image_names: tuple[str, ...]
    tabular: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    target: float = float("nan")
    time: float = float("nan")
    event: float = float("nan")


class MultimodalDataset(Dataset):
    """Patients -> items of the batch layout above (images, tabular, masks, outcome).

    Args:
        samples: one ``PatientSample`` per patient.
        modalities: the modality order (image and tabular names).
        image_modalities: the image names among ``modalities``.
        tabular_shapes: ``{name: (F_num, F_cat)}`` for every tabular modality (to zero-fill).
        image_shape: (D, H, W) of the preprocessed volumes.
        load_images: ``patient_id -> {name: (D, H, W) float32}`` (e.g. from the preprocessing
            cache); returns at least the patient's ``image_names``.
        task: the outcome type; sets the dtype of ``target``.
        dropout: the missing-modality simulation; None = no simulation (validation/test).
        augment: apply ``data.augment``'s transforms (training only).
        seed: the experiment seed; with ``set_epoch`` it seeds simulation and augmentation.
    """

    def __init__(
        self,
        samples: Sequence[PatientSample],
        modalities: Sequence[str],
        image_modalities: Sequence[str],
        tabular_shapes: Mapping[str, tuple[int, int]],
        image_shape: Sequence[int],
        load_images: Callable[[str], Mapping[str, np.ndarray]],
        task: str = "classification",
        dropout: ModalityDropout | None = None,
        augment: bool = False,
        seed: int = 0,
    ):
        self.samples = list(samples)
        self.modalities = list(modalities)
        self.image_modalities = [m for m in self.modalities if m in set(image_modalities)]
        self.tabular_modalities = [m for m in self.modalities if m not in set(image_modalities)]
        missing = sorted(set(self.tabular_modalities) - set(tabular_shapes))
        if missing:
            raise ValueError(f"tabular modalities {missing} have no feature shape in tabular_shapes")
        self.tabular_shapes = {k: (int(v[0]), int(v[1])) for k, v in tabular_shapes.items()}
        self.image_shape = tuple(int(s) for s in image_shape)
        self.load_images = load_images
        if task not in TARGET_DTYPES:
            raise ValueError(f"task {task!r} not in {sorted(TARGET_DTYPES)}")
        self.task = task
        self.dropout = dropout
        self.seed = int(seed)
        self.epoch = 0
        self.augment = None
        if augment and self.image_modalities:
            from .augment import build_augmentation

            self.augment = build_augmentation(self.image_modalities)
        self.present = np.stack([self._present(s) for s in self.samples]) if self.samples else \
            np.zeros((0, len(self.modalities)), bool)  # (N, M)
        for s, pres in zip(self.samples, self.present):
            if not pres.any():
                raise ValueError(f"patient {s.patient_id!r} has none of the modalities {self.modalities}")

    def _present(self, s: PatientSample) -> np.ndarray:
        return np.array(
            [(m in s.image_names) if m in self.image_modalities else (m in s.tabular) for m in self.modalities],
            dtype=bool,
        )

    @property
    def patient_ids(self) -> list[str]:
        return [s.patient_id for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose simulation/augmentation draws ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _outcome(self, s: PatientSample) -> dict[str, torch.Tensor]:
        if self.task == "classification":
            target = torch.tensor(int(s.target) if np.isfinite(s.target) else -1, dtype=torch.long)
        else:
            target = torch.tensor(float(s.target), dtype=torch.float32)
        return {
            "target": target,
            "time": torch.tensor(float(s.time), dtype=torch.float32),
            "event": torch.tensor(float(s.event), dtype=torch.float32),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        present = self.present[index]
        available = present
        if self.dropout is not None:
            available = self.dropout(present, sample_rng(self.seed, self.epoch, index, 0))
        # Images: load only those the patient has; absent slots stay zero and are masked.
        images = np.zeros((len(self.image_modalities), 1, *self.image_shape), np.float32)  # (M_img,1,D,H,W)
        if self.image_modalities and s.image_names:
            loaded = self.load_images(s.patient_id)
            have = {m: loaded[m] for m in s.image_names}
            if self.augment is not None:
                from .augment import augment_patient

                seed = int(sample_rng(self.seed, self.epoch, index, 1).integers(2**31))
                have = augment_patient(self.augment, have, seed)
            for j, m in enumerate(self.image_modalities):
                if m in have:
                    arr = np.asarray(have[m], dtype=np.float32)
                    if arr.shape != self.image_shape:
                        raise ValueError(
                            f"patient {s.patient_id!r} modality {m!r}: preprocessed shape {arr.shape} "
                            f"!= target shape {self.image_shape}; rebuild the preprocessing cache"
                        )
                    images[j, 0] = arr
        tabular = {}
        for m in self.tabular_modalities:
            f_num, f_cat = self.tabular_shapes[m]
            row = s.tabular.get(m)
            if row is None:
                tabular[m] = {
                    "num": torch.zeros(f_num), "num_missing": torch.ones(f_num),
                    "cat": torch.zeros(f_cat, dtype=torch.long),
                }
            else:
                tabular[m] = {
                    "num": torch.as_tensor(np.asarray(row["num"], np.float32)),
                    "num_missing": torch.as_tensor(np.asarray(row["num_missing"], np.float32)),
                    "cat": torch.as_tensor(np.asarray(row["cat"], np.int64)),
                }
        return {
            "images": torch.from_numpy(images),
            "tabular": tabular,
            "available": torch.from_numpy(available.copy()),
            "available_full": torch.from_numpy(present.copy()),
            **self._outcome(s),
            "patient_id": s.patient_id,
        }


class FeatureDataset(Dataset):
    """Cached encoder tokens -> items with ``tokens`` instead of images/tabular.

    Args:
        tokens: (N, M, E) float — ``model.encode`` outputs (rows of absent modalities are 0).
        present: (N, M) bool — the modalities each patient really has.
        target, time, event: (N,) outcomes (NaN where unknown; classification labels as floats
            or ints).
        patient_ids: N strings.
        task: sets the dtype of ``target``.
        dropout: missing-modality simulation (training); None for evaluation.
        seed: seeds the simulation together with ``set_epoch``.
        tabular: optional ``{name: {"num", "num_missing", "cat": (N, F)}}`` carried into the
            items (two-stage training keeps the cheap tabular encoders trainable).
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        present: torch.Tensor,
        target: Sequence[float],
        time: Sequence[float],
        event: Sequence[float],
        patient_ids: Sequence[str],
        task: str = "classification",
        dropout: ModalityDropout | None = None,
        seed: int = 0,
        tabular: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ):
        n = tokens.shape[0]
        if not (present.shape[0] == len(target) == len(time) == len(event) == len(patient_ids) == n):
            raise ValueError(
                "tokens, present, outcomes and patient_ids must have the same length N; got "
                f"tokens {n}, present {present.shape[0]}, target {len(target)}, time {len(time)}, "
                f"event {len(event)}, patient_ids {len(patient_ids)}"
            )
        self.tokens = tokens.detach().float().cpu()  # (N, M, E)
        self.present = present.detach().bool().cpu().numpy()  # (N, M)
        self.target = np.asarray(target, np.float64)
        self.time = np.asarray(time, np.float64)
        self.event = np.asarray(event, np.float64)
        self.ids = list(patient_ids)
        self.task = task
        self.dropout = dropout
        self.seed = int(seed)
        self.epoch = 0
        # Raw tabular features (N, F) per modality, for tabular encoders that keep training.
        self.tabular = {m: {f: t.detach().cpu() for f, t in v.items()} for m, v in (tabular or {}).items()}

    @property
    def patient_ids(self) -> list[str]:
        return list(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        present = self.present[index]
        available = present
        if self.dropout is not None:
            available = self.dropout(present, sample_rng(self.seed, self.epoch, index, 0))
        t = self.target[index]
        if self.task == "classification":
            target = torch.tensor(int(t) if np.isfinite(t) else -1, dtype=torch.long)
        else:
            target = torch.tensor(float(t), dtype=torch.float32)
        return {
            "tokens": self.tokens[index],  # (M, E)
            **({"tabular": {m: {f: t[index] for f, t in v.items()} for m, v in self.tabular.items()}}
               if self.tabular else {}),
            "available": torch.from_numpy(available.copy()),
            "available_full": torch.from_numpy(present.copy()),
            "target": target,
            "time": torch.tensor(float(self.time[index]), dtype=torch.float32),
            "event": torch.tensor(float(self.event[index]), dtype=torch.float32),
            "patient_id": self.ids[index],
        }


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into the batch of docs/ARCHITECTURE.md.

    Args:
        items: items of ``MultimodalDataset`` or ``FeatureDataset``.

    Returns:
        The batch: tensors gain a leading B axis (``images`` (B, M_img, 1, D, H, W),
        ``tokens`` (B, M, E), ``available``/``available_full`` (B, M), ``target``/``time``/``event``
        (B,)), ``tabular`` is stacked per modality and field, ``patient_id`` is a list.
    """
    if not items:
        raise ValueError("cannot collate an empty list of items")
    batch: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if key == "patient_id":
            batch[key] = list(vals)
        elif key == "tabular":
            batch[key] = {
                m: {f: torch.stack([v[m][f] for v in vals]) for f in vals[0][m]} for m in vals[0]
            }
        else:
            batch[key] = torch.stack(vals)
    return batch


# --------------------------------------------------------------------------------------------
# Patient-level split
# --------------------------------------------------------------------------------------------
def make_split(
    patient_ids: Sequence[str],
    labels: Sequence[Any] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split patients into train/val/test, stratified by ``labels`` when given.

    Stratification falls back to a plain shuffle split when a class is too small to appear in
    every part (sklearn would raise).

    Args:
        patient_ids: unique IDs.
        labels: one class label per patient, or None (regression/survival).
        val_fraction, test_fraction: fractions of all patients.
        seed: the shuffle seed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    from sklearn.model_selection import train_test_split

    ids = list(patient_ids)
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"patient IDs must be unique to split by patient; repeated: {dup[:10]}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in "
            "[0, 1) and sum to less than 1"
        )
    n = len(ids)
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * n)
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} patients are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    y = None if labels is None else np.asarray(list(labels))

    def _split(a_ids, a_y, size):
        if size == 0:
            return list(a_ids), [], a_y
        strat = a_y
        if strat is not None:
            _, counts = np.unique(strat, return_counts=True)
            n_classes = len(counts)
            if counts.min() < 2 or size < n_classes or len(a_ids) - size < n_classes:
                strat = None
        rest, part, y_rest, _ = train_test_split(
            list(a_ids), np.arange(len(a_ids)) if a_y is None else a_y, test_size=size,
            random_state=seed, stratify=strat, shuffle=True,
        )
        return rest, part, (None if a_y is None else y_rest)

    rest, test, y_rest = _split(ids, y, n_test)
    train, val, _ = _split(rest, y_rest, n_val)
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def load_or_make_split(
    path: str | Path,
    patient_ids: Sequence[str],
    labels: Sequence[Any] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Read the split from ``path`` when it exists, else make it and write it there (atomically).

    A reused split must cover exactly ``patient_ids``; otherwise it is an error (the cohort
    changed) that says which IDs differ.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.
    """
    from ..utils import atomic_write_json

    path = Path(path)
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            split = {k: [str(x) for x in data[k]] for k in ("train", "val", "test")}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"split file {path} is not a JSON object with train/val/test lists ({e}); "
                "delete it to make a new split"
            ) from e
        in_file = [i for k in ("train", "val", "test") for i in split[k]]
        if len(set(in_file)) != len(in_file):
            raise ValueError(f"split file {path} lists a patient in more than one part; delete it")
        extra, new = sorted(set(in_file) - set(patient_ids)), sorted(set(patient_ids) - set(in_file))
        if extra or new:
            raise ValueError(
                f"split file {path} does not match the cohort: {len(extra)} IDs not in the cohort "
                f"{extra[:5]}, {len(new)} cohort IDs not in the file {new[:5]}; delete the file "
                "(or point data.split_file elsewhere) to make a new split"
            )
        log.info("reusing split %s", path)
        return split
    split = make_split(patient_ids, labels, val_fraction, test_fraction, seed)
    atomic_write_json(
        path,
        {**split, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
         "stratified": labels is not None},
    )
    return split


def split_summary(split: Mapping[str, Sequence[str]], path: str | Path, val_fraction: float,
                  test_fraction: float) -> str:
    """One line saying how many patients went to each part and where the split is saved."""
    n = {k: len(split.get(k, ())) for k in ("train", "val", "test")}
    total = sum(n.values())
    held = (f"{n['test']} test patients are held out of training (data.test_fraction="
            f"{test_fraction}); `clinfusediff evaluate` scores them" if n["test"] else
            "no internal test part (data.test_fraction=0): evaluate on your own held-out cohort")
    return (f"split: {total} patients -> {n['train']} train / {n['val']} validation / {n['test']} "
            f"test (data.val_fraction={val_fraction}); {held}; saved in {path}")


# --------------------------------------------------------------------------------------------
# From a config to datasets: the cohort used by training
# --------------------------------------------------------------------------------------------
PRELOAD_LIMIT_BYTES = 4 * 1024**3  # keep preprocessed volumes in memory below this size


@dataclass
class TrainingCohort:
    """A cohort ready for training: split, fitted tabular normalisers and the three datasets.

    Attributes:
        root: the cohort folder (generated under the output folder when ``data.root`` is None).
        modalities / image_modalities / tabular_modalities: the batch order.
        tabular_dims: ``{name: TabularDims}``; tabular_state: ``{name: normaliser state}``.
        split: ``{"train", "val", "test"}`` patient IDs.
        datasets: ``{"train": MultimodalDataset (simulation + augmentation), "val", "test"}``.
        skips: patients/rows left out, with the reason.
    """

    root: Path
    modalities: list[str]
    image_modalities: list[str]
    tabular_modalities: list[str]
    tabular_dims: dict[str, Any]
    tabular_state: dict[str, Any]
    split: dict[str, list[str]]
    datasets: dict[str, MultimodalDataset]
    skips: list[Any] = field(default_factory=list)
    # encoder tokens computed once per (encoder checkpoint, device), reused by every fusion
    token_cache: dict[Any, Any] = field(default_factory=dict)

    def tabular_dims_dict(self) -> dict[str, dict[str, Any]]:
        return {k: v.to_dict() for k, v in self.tabular_dims.items()}


def ensure_cohort_root(cfg, out_dir: str | Path) -> Path:
    """``cfg.data.root``, or the embedded synthetic cohort generated (once) under ``out_dir``."""
    if cfg.data.root is not None:
        return Path(cfg.data.root)
    from .synth import generate_cohort

    root = Path(out_dir) / "cohort"
    d = cfg.data
    generate_cohort(
        root, n_patients=d.synth_patients, shape=tuple(d.synth_shape), site_shift=d.synth_site_shift,
        missing_rate=d.synth_missing_rate, seed=d.synth_seed, progress=False,
    )
    return root


def prepare_cohort(cfg, out_dir: str | Path, dist_info: Any = None, show_progress: bool = True) -> TrainingCohort:
    """Discover, split, normalise and preprocess a cohort into training/validation/test datasets.

    Steps: the cohort folder (``data.root`` or a generated one) -> ``discovery.load_cohort``
    (patients, tabular tables, outcomes) -> the patient split (``data.split_file`` or
    ``<out_dir>/split.json``, reused when present; stratified by label for classification) ->
    tabular normalisers fitted on the training patients -> preprocessing through the
    content-addressed cache (``data.cache_dir`` or ``<out_dir>/cache``; a patient whose
    images cannot be preprocessed is skipped with the reason logged) -> datasets. Training
    patients whose only possible modality subsets are excluded by
    ``data.excluded_combinations`` are left out of training (logged).

    Under DDP, rank 0 generates, splits and fills the cache first; the other ranks then read.

    Args:
        cfg: the full config.
        out_dir: the run's output folder.
        dist_info: ``training.distributed.DistInfo`` or None (single process).
        show_progress: a tqdm bar over preprocessing.

    Returns:
        The ``TrainingCohort``.
    """
    from tqdm.auto import tqdm

    from ..modalities import ModalityRegistry
    from .cache import PreprocessCache
    from .discovery import Skip, load_cohort
    from .tabular import TabularNormalizer
    from ..utils import environment_fault, is_environment_fault

    out_dir = Path(out_dir)
    rank0 = dist_info is None or dist_info.is_main

    def sync() -> None:
        if dist_info is not None and dist_info.enabled:
            import torch.distributed as dist

            dist.barrier()

    d = cfg.data
    root = ensure_cohort_root(cfg, out_dir) if rank0 else None
    sync()
    root = root or ensure_cohort_root(cfg, out_dir)
    import dataclasses

    data_cfg = dataclasses.replace(d, root=str(root))
    registry = ModalityRegistry.from_config(d)
    image_mods, tab_mods = registry.split(d.modalities)
    cohort = load_cohort(data_cfg, registry)
    if cohort.outcomes is None:
        raise FileNotFoundError(
            f"{root}: training needs an outcome file ({d.outcome_file}) with the "
            f"{d.task} outcome of every patient; set data.outcome_file"
        )
    skips = list(cohort.skips)
    records = {r.patient_id: r for r in cohort.records}

    # Preprocess (rank 0 fills the cache, the others read it).
    images: dict[str, dict[str, np.ndarray]] = {}
    image_names: dict[str, tuple[str, ...]] = {}
    if image_mods:
        cache = PreprocessCache(d.cache_dir or out_dir / "cache")
        if not rank0:
            sync()
        else:
            from ..utils import remove_stale_temps

            remove_stale_temps(cache.root, recursive=True)  # left by a killed run
        with_images = [r for r in cohort.records if r.images]
        n_vox = int(np.prod(cfg.preprocessing.target_shape))
        preload = len(with_images) * len(image_mods) * n_vox * 4 <= PRELOAD_LIMIT_BYTES
        bar = tqdm(with_images, desc="preprocess", disable=not (rank0 and show_progress), leave=False)
        for rec in bar:
            try:
                p = cache.load_or_build(rec, cfg.preprocessing)
            except (ValueError, FileNotFoundError, OSError) as e:
                # A fault of the machine (disk full, no permission, I/O error) stops the run; only
                # a patient's own bad data is skipped. (Cache write errors arrive as
                # utils.EnvironmentFault, which is not caught here.)
                if is_environment_fault(e):
                    raise environment_fault(e, "read") from e
                s = Skip(str(rec.root or rec.patient_id), f"preprocessing failed: {e}; left out")
                log.warning("skipped %s", s)
                skips.append(s)
                records.pop(rec.patient_id)
                continue
            image_names[rec.patient_id] = tuple(m for m in image_mods if m in p.images)
            if preload:
                images[rec.patient_id] = {m: p.images[m] for m in image_names[rec.patient_id]}
        if rank0:
            sync()
            log.info("preprocessing cache %s", cache)

        def load_images(pid: str) -> Mapping[str, np.ndarray]:
            if pid in images:
                return images[pid]
            return cache.load_or_build(records[pid], cfg.preprocessing).images
    else:
        def load_images(pid: str) -> Mapping[str, np.ndarray]:
            return {}

    ids = sorted(records)
    labels = [int(cohort.outcomes[p].target) for p in ids] if d.task == "classification" else None
    split_path = Path(d.split_file) if d.split_file else out_dir / "split.json"
    if rank0:
        split = load_or_make_split(split_path, ids, labels, d.val_fraction, d.test_fraction, cfg.experiment.seed)
    sync()
    if not rank0:
        split = load_or_make_split(split_path, ids, labels, d.val_fraction, d.test_fraction, cfg.experiment.seed)
    if rank0:
        log.info("%s", split_summary(split, split_path, d.val_fraction, d.test_fraction))

    # Tabular features, normalisers fitted on the training patients only.
    tab_dims, tab_state, feats = {}, {}, {}
    for m in tab_mods:
        norm = TabularNormalizer(cohort.tables[m]).fit(split["train"])
        tab_dims[m], tab_state[m] = norm.dims(), norm.state_dict()
        feats[m] = norm.transform(ids)
    row_of = {p: i for i, p in enumerate(ids)}

    def sample(pid: str) -> PatientSample:
        i = row_of[pid]
        tab = {m: {k: v[i] for k, v in feats[m].items()} for m in tab_mods if pid in cohort.tables[m]}
        o = cohort.outcomes[pid]
        return PatientSample(pid, image_names.get(pid, ()), tab, o.target, o.time, o.event)

    dropout = ModalityDropout.from_config(d, d.modalities)
    shapes = {m: (tab_dims[m].num, len(tab_dims[m].cat_cardinalities)) for m in tab_mods}
    datasets = {}
    for part in ("train", "val", "test"):
        samples = [sample(p) for p in split[part]]
        ds_kwargs: dict[str, Any] = {"task": d.task, "seed": cfg.experiment.seed}
        if part == "train":
            probe = MultimodalDataset(samples, d.modalities, image_mods, shapes, cfg.preprocessing.target_shape,
                                      load_images, task=d.task)
            keep = [s for s, pres in zip(samples, probe.present) if dropout.can_sample(pres)]
            for s in samples:
                if s not in keep:
                    skips.append(Skip(f"patient {s.patient_id}", "its modalities only form combinations "
                                      "excluded by data.excluded_combinations; left out of training"))
                    log.warning("skipped %s", skips[-1])
            samples = keep
            ds_kwargs.update(dropout=dropout, augment=d.augment)
        datasets[part] = MultimodalDataset(samples, d.modalities, image_mods, shapes,
                                           cfg.preprocessing.target_shape, load_images, **ds_kwargs)
    return TrainingCohort(root, list(d.modalities), image_mods, tab_mods, tab_dims, tab_state, split,
                          datasets, skips)
