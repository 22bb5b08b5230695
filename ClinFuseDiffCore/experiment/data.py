"""The experiment's cohort: generated once (parallel), preprocessed once (parallel, cached), held
in memory as arrays.

Everything here is reused by a rerun: ``generate_cohort`` keeps finished patients, the
preprocessing cache is content-addressed, and the split is a file written once.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..utils import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

# Tumour measurements a segmentation gives on real data too (BraTS labels: 1 core, 2 oedema, 4 rim).
AUX_TARGETS = ("tumour_ml", "oedema_ml", "enhancing_ml")


@dataclass
class ArrayCohort:
    """The whole cohort in memory, in one patient order.

    Attributes:
        ids: patient IDs (P,).
        modalities / image_modalities: the batch order of ``cfg.data.modalities``.
        images: (P, M_img, D, H, W) float16 preprocessed volumes (0 where a modality is absent).
        tabular: {name: {"num", "num_missing", "cat"}} tensors (P, F).
        tabular_dims: {name: TabularDims} for ``build_model``.
        present: (P, M) bool, what each patient has.
        labels: (P,) int64 outcome labels.
        aux: (P, 3) float32 log1p tumour / oedema / enhancing volumes (ml) from the seg, standardised
            on the training patients.
        hidden: (P, F_h) float64 hidden standardised features (manifest ``z_*``); ``hidden_names``
            and ``hidden_modalities`` (the modalities that show each feature).
        parts: {"train", "val", "test"} -> index arrays into the patient order.
    """

    ids: list[str]
    modalities: list[str]
    image_modalities: list[str]
    images: np.ndarray
    tabular: dict[str, dict[str, torch.Tensor]]
    tabular_dims: dict[str, Any]
    present: np.ndarray
    labels: np.ndarray
    aux: np.ndarray
    hidden: np.ndarray
    hidden_names: list[str]
    hidden_modalities: dict[str, tuple[str, ...]]
    parts: dict[str, np.ndarray]
    sites: Optional[list[str]] = None  # scanner site of each patient (manifest), when known

    def batch(self, idx: np.ndarray) -> dict[str, Any]:
        """The model's batch layout for patients ``idx`` (images float32 (B, M_img, 1, D, H, W))."""
        idx = np.asarray(idx)
        images = torch.from_numpy(self.images[idx].astype(np.float32)).unsqueeze(2)  # (B, M_img, 1, D, H, W)
        t = torch.from_numpy(idx)
        tab = {m: {k: v.index_select(0, t) for k, v in d.items()} for m, d in self.tabular.items()}
        return {"images": images, "tabular": tab}


def make_split(n_total: int, n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded random split of ``range(n_total)`` into the three parts (sizes exact)."""
    if n_train + n_val + n_test > n_total:
        raise ValueError(f"split sizes {n_train}+{n_val}+{n_test} exceed the {n_total} patients")
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(n_total)
    return {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train:n_train + n_val]),
            "test": np.sort(order[n_train + n_val:n_train + n_val + n_test])}


def _seg_volumes(seg: np.ndarray, affine: np.ndarray) -> np.ndarray:
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    core = np.isin(seg, (1, 4)).sum() * voxel_ml
    oedema = (seg == 2).sum() * voxel_ml
    enh = (seg == 4).sum() * voxel_ml
    return np.log1p(np.array([core, oedema, enh], dtype=np.float64))


def prepare_data(cfg, sweep, out_dir: Path, progress: bool = True, *,
                 external: Optional[dict[str, Any]] = None) -> ArrayCohort:
    """Generate (or reuse) the cohort, preprocess it (or reuse the cache), load it into memory.

    Args:
        cfg: the product config (data, preprocessing, model sections are used).
        sweep: ``SweepConfig`` (sizes, cohort seed, workers).
        out_dir: the experiment folder (``cohort/``, ``cache/``, ``split.json`` live here).
    """
    from ..data.cache import PreprocessCache, build_cache
    from ..data.discovery import load_cohort
    from ..data.synth import generate_cohort
    from ..data.synth.params import FEATURE_MODALITIES
    from ..data.tabular import TabularNormalizer
    from ..modalities import ModalityRegistry

    out_dir = Path(out_dir)
    d = cfg.data
    n_total = sweep.n_train + sweep.n_val + sweep.n_test
    root = Path(d.root) if d.root else out_dir / "cohort"
    if external is not None:
        root = Path(external["root"])
    elif d.root is None:
        generate_cohort(root, n_total, shape=tuple(d.synth_shape), seed=sweep.cohort_seed,
                        site_shift=d.synth_site_shift, missing_rate=d.synth_missing_rate,
                        progress=progress, workers=sweep.workers)
    registry = ModalityRegistry.from_config(d)
    image_mods, tab_mods = registry.split(d.modalities)
    cohort = load_cohort(dataclasses.replace(d, root=str(root)), registry)
    if cohort.outcomes is None:
        raise FileNotFoundError(f"{root}: the experiment needs {d.outcome_file}")
    records = sorted(cohort.records, key=lambda r: r.patient_id)
    ids = [r.patient_id for r in records]
    if external is not None:
        n_total = len(ids)
    if len(ids) < n_total:
        raise ValueError(f"{root} has {len(ids)} usable patients; sweep sizes need {n_total}")
    records, ids = records[:n_total], ids[:n_total]
    cache_root = Path(d.cache_dir) if d.cache_dir else out_dir / "cache"
    if external is not None:
        cache_root = Path(external["cache"])
    report = build_cache(records, cfg.preprocessing, cache_root, workers=sweep.workers, progress=progress)
    failed = getattr(report, "failed", None) or getattr(report, "failures", None)
    if failed:
        raise RuntimeError(f"preprocessing failed for {len(failed)} patients ({list(failed)[:3]}); see {cache_root}")

    sites = _manifest_sites(root, ids)
    split_file = out_dir / "split.json"
    if external is not None:
        # An external (shifted) cohort: nothing is trained on it; its first site (sorted names)
        # is the validation site (TTT settings are tuned there), the other sites are the test.
        first = sorted(set(sites))[0]
        parts = {"train": np.zeros(0, np.int64),
                 "val": np.array([i for i, s in enumerate(sites) if s == first], np.int64),
                 "test": np.array([i for i, s in enumerate(sites) if s != first], np.int64)}
    elif split_file.exists():
        saved = json.loads(split_file.read_text(encoding="utf-8"))
        parts = {k: np.array([ids.index(i) for i in saved[k]], dtype=np.int64) for k in ("train", "val", "test")}
    else:
        parts = make_split(len(ids), sweep.n_train, sweep.n_val, sweep.n_test, sweep.cohort_seed)
        atomic_write_json(split_file, {k: [ids[i] for i in v] for k, v in parts.items()})

    # Images and segmentation volumes, from the cache.
    cache = PreprocessCache(cache_root)
    shape = tuple(int(s) for s in cfg.preprocessing.target_shape)
    images = np.zeros((len(ids), len(image_mods), *shape), dtype=np.float16)
    aux = np.full((len(ids), len(AUX_TARGETS)), np.nan)
    present = np.zeros((len(ids), len(d.modalities)), dtype=bool)
    from tqdm.auto import tqdm

    for i, rec in enumerate(tqdm(records, desc="load", disable=not progress, leave=False)):
        pp = cache.load_or_build(rec, cfg.preprocessing)
        for k, m in enumerate(image_mods):
            if m in pp.images:
                images[i, k] = pp.images[m].astype(np.float16)
                present[i, d.modalities.index(m)] = True
        if pp.seg is not None:
            aux[i] = _seg_volumes(pp.seg, pp.affine)
    tr = parts["train"]
    if len(tr):
        mu, sd = np.nanmean(aux[tr], 0), np.nanstd(aux[tr], 0) + 1e-6
        aux = ((aux - mu) / sd).astype(np.float32)
    else:  # external cohort: the volumes are a stage-1 training target only
        aux = aux.astype(np.float32)

    # Tabular modalities: normalisers fitted on the training patients only.
    tabular, dims = {}, {}
    for m in tab_mods:
        table = cohort.tables[m]
        if external is not None:  # normalised as the training cohort was (fitted on its training patients)
            ref = external["reference_tables"][m]
            norm = TabularNormalizer(ref).fit(external["reference_train_ids"])
            arrs = norm.transform(ids, table=table)
        else:
            norm = TabularNormalizer(table).fit([ids[i] for i in tr])
            arrs = norm.transform(ids)
        tabular[m] = {k: torch.from_numpy(np.asarray(v)) for k, v in arrs.items()}
        dims[m] = norm.dims()
        have = set(table.ids) if hasattr(table, "ids") else set(ids)
        present[:, d.modalities.index(m)] = [i in have for i in ids]

    labels = np.array([int(cohort.outcomes[i].target) for i in ids], dtype=np.int64)

    # Hidden features (the oracle's inputs) from the manifest, when the cohort is synthetic.
    hidden_names = list(FEATURE_MODALITIES)
    hidden = np.full((len(ids), len(hidden_names)), np.nan)
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with open(manifest, encoding="utf-8", newline="") as f:
            rows = {r["patient_id"]: r for r in csv.DictReader(f)}
        for i, pid in enumerate(ids):
            if pid in rows:
                hidden[i] = [float(rows[pid][h]) for h in hidden_names]
    return ArrayCohort(
        ids=ids, modalities=list(d.modalities), image_modalities=list(image_mods), images=images,
        tabular=tabular, tabular_dims=dims, present=present, labels=labels, aux=aux,
        hidden=hidden, hidden_names=hidden_names,
        hidden_modalities={k: tuple(v) for k, v in FEATURE_MODALITIES.items()}, parts=parts,
        sites=sites,
    )


def _manifest_sites(root: Path, ids: list[str]) -> list[str]:
    """Each patient's site from the cohort's manifest.csv ("unknown" without one)."""
    manifest = Path(root) / "manifest.csv"
    if not manifest.is_file():
        return ["unknown"] * len(ids)
    with open(manifest, encoding="utf-8", newline="") as f:
        rows = {r["patient_id"]: r.get("site") or "unknown" for r in csv.DictReader(f)}
    return [rows.get(i, "unknown") for i in ids]


def save_tensors(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` atomically (temp file + rename): a killed run leaves no half file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_tensors(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
