"""Per-patient outputs a clinician can open: ``.seg.nrrd``, ``prediction.json`` and ``report.png``.

The ``clinfusediff infer`` command and the Slicer module (through that command) write exactly
these three files:

* :func:`write_segmentation` — a labelmap ``Volume`` on an input grid to a Slicer segmentation
  file (``.seg.nrrd``) with named, coloured segments, written with slicerio. The file keeps the
  label values (segment ``k`` is stored as value ``k``) and the geometry of the input volume:
  ``ijkToLPS = diag(-1, -1, 1, 1) @ affine`` (the ``Volume`` affine is voxel -> RAS).
* :func:`build_prediction_record` / :func:`write_prediction_json` — the prediction, its
  uncertainty, the per-modality contributions, and what produced it (schema below).
* :func:`render_report` — one PNG: slices of each modality with the segmentation overlaid, the
  prediction with its interval over the K diffusion samples, the contributions as bars.

``prediction.json`` schema (``"schema": "clinfusediff.prediction/1"``)::

    {
      "schema": "clinfusediff.prediction/1",
      "patient_id": "P001",
      "task": "classification" | "regression" | "survival",
      "prediction": {                       # classification
        "class_names": ["low grade", "high grade"],
        "probabilities": {"low grade": 0.2, "high grade": 0.8},   # mean over the K samples
        "probability_interval": {"low grade": [0.1, 0.3], ...},   # 95 % interval, or null
        "interval_method": "percentile" | "normal",
        "predicted_class": "high grade", "predicted_index": 1,
        "samples": 8                                              # K
      },
      "prediction": {"risk": 0.4, "risk_interval": [0.2, 0.6], ...},    # survival (log-hazard)
      "prediction": {"value": 3.1, "value_interval": [2.5, 3.6], ...},  # regression
      "uncertainty": {"std": 0.05, "entropy": 0.5, "expected_entropy": 0.49,
                      "mutual_information": 0.01},
      "contributions": {"mri_t1": 0.31, "clinical": 0.12, ...},  # available modalities only
      "modalities": {"model": [...], "used": [...], "missing": [...]},
      "model": {"checkpoint": "/path/ckpt.pt", "checkpoint_sha256": "...",
                "config_hash": "...", "version": "0.1.0"},
      "ttt": {"enabled": true, "steps": 10, ...},
      "segmentation": {"file": "segmentation.seg.nrrd", "labels": {"1": "brain"}, ...} | null,
      "timings_s": {"preprocess": 1.2, "encode": 0.3, "ttt": 2.0, "sample": 0.4, "total": 4.1},
      "created": "2026-01-01T12:00:00+00:00",
      "software": {"clinfusediff": "0.1.0"}
    }

``uncertainty.std`` is the standard deviation over the K samples of the predicted-class
probability (classification), of the risk (survival) or of the value (regression);
``entropy`` is the entropy of the mean probabilities (nats), ``expected_entropy`` the mean
per-sample entropy and ``mutual_information`` their difference (the epistemic part; 0 for one
sample), all ``null`` outside classification.

Intervals: with the K per-sample outputs (``probability_samples`` / ``value_samples``) they are
the 2.5 and 97.5 percentiles over the samples (``interval_method: "percentile"``); with only the
mean and ``std`` they are mean +- 1.96 std, clipped to [0, 1] for probabilities
(``"normal"``) — for more than two classes then only for the predicted class (others ``null``).
``contributions`` are as the Predictor defines them (leave-one-out change of the predicted
class's probability, or of the risk/value, when the modality is removed; may be negative).
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np

from .data.volume import LPS_TO_RAS, Volume
from .utils import atomic_path, atomic_write_json

SCHEMA = "clinfusediff.prediction/1"

Color = tuple[float, float, float]

# Label tables used by the segmentation backends (values as stored in the labelmaps).
BRAIN_LABELS: dict[int, str] = {1: "brain"}
BRAIN_COLORS: dict[int, Color] = {1: (0.86, 0.68, 0.45)}
BRATS_LABELS: dict[int, str] = {1: "necrotic tumour core", 2: "peritumoral oedema",
                                4: "enhancing tumour"}
BRATS_COLORS: dict[int, Color] = {1: (0.85, 0.20, 0.20), 2: (0.30, 0.75, 0.30),
                                  4: (0.95, 0.85, 0.15)}
# Fallback palette for labels without a given colour (matplotlib tab10, RGB in [0, 1]).
_PALETTE: list[Color] = [
    (0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.498, 0.498, 0.498),
    (0.737, 0.741, 0.133), (0.090, 0.745, 0.812),
]


def default_color(label: int) -> Color:
    """A distinct colour for ``label`` (used when the caller gives none)."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


# ------------------------------------------------------------------------------------------
# Segmentation (.seg.nrrd)
# ------------------------------------------------------------------------------------------
def _labels_as_int(labelmap: Volume) -> np.ndarray:
    """(I, J, K) integer labels of ``labelmap``; raise if the values are not whole numbers."""
    arr = np.asarray(labelmap.array)
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise ValueError(
            f"{labelmap.source}: a labelmap must hold whole-number label values, found e.g. "
            f"{arr[rounded != arr].flat[0]!r}; pass an integer labelmap (nearest-neighbour resampled)"
        )
    if rounded.min() < 0 or rounded.max() > 65535:
        raise ValueError(f"{labelmap.source}: label values must lie in 0..65535, found "
                         f"{int(rounded.min())}..{int(rounded.max())}")
    return rounded.astype(np.int64)


def write_segmentation(
    labelmap: Volume,
    labels: Mapping[int, str],
    colors: Optional[Mapping[int, Sequence[float]]],
    path: Union[str, Path],
) -> Path:
    """Write a labelmap as a Slicer segmentation file with named, coloured segments.

    Args:
        labelmap: ``Volume`` whose (I, J, K) array holds integer label values (0 = background)
            on the grid of an input volume; its affine (voxel -> RAS) becomes the file geometry
            (``ijkToLPS = diag(-1, -1, 1, 1) @ affine``).
        labels: label value -> segment name, e.g. ``{1: "brain"}``. Every non-zero value present
            in the labelmap must be named; named labels absent from the image are written as
            empty segments (so the file always lists the same segments).
        colors: label value -> (r, g, b) in [0, 1]; missing entries get a palette colour.
        path: output file, must end with ``.seg.nrrd``. Written atomically.

    Returns:
        The written path. Voxels are stored as ``uint8`` (``uint16`` above 255) with
        ``SegmentN_LabelValue`` equal to the label value, so ``value k`` in the file is segment
        ``labels[k]``.
    """
    import slicerio

    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a Slicer segmentation file must end with '.seg.nrrd'")
    if not labels:
        raise ValueError("labels is empty; give at least one {label value: segment name}")
    colors = dict(colors or {})
    values = _labels_as_int(labelmap)  # (I, J, K)
    present = {int(v) for v in np.unique(values) if v != 0}
    unnamed = sorted(present - {int(k) for k in labels})
    if unnamed:
        raise ValueError(f"{labelmap.source}: label values {unnamed} have no name; labels names "
                         f"only {sorted(int(k) for k in labels)}. Add them to `labels`.")
    segments = []
    for value in sorted(int(k) for k in labels):
        if value <= 0:
            raise ValueError(f"label value {value} is not allowed (0 is background); use 1..65535")
        name = str(labels[value])
        if not name.strip():
            raise ValueError(f"label {value} has an empty name")
        rgb = [float(c) for c in colors.get(value, default_color(value))]
        if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
            raise ValueError(f"colour of label {value} ({name!r}) must be 3 values in [0, 1], got {rgb}")
        segments.append({
            "id": f"Segment_{value}",
            "labelValue": value,
            "layer": 0,
            "name": name,
            "nameAutoGenerated": False,
            "color": rgb,
            "colorAutoGenerated": False,
            "status": "completed",
        })
    dtype = np.uint8 if values.max(initial=0) <= 255 and max(int(k) for k in labels) <= 255 else np.uint16
    segmentation = {
        "voxels": values.astype(dtype),  # (I, J, K), written in Fortran order = NRRD's i fastest
        "ijkToLPS": LPS_TO_RAS @ labelmap.affine,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)
    return path


def read_segmentation(path: Union[str, Path]) -> tuple[Volume, dict[int, str], dict[int, Color]]:
    """Read a ``.seg.nrrd`` written by :func:`write_segmentation` (or Slicer) back.

    Returns:
        (labelmap ``Volume`` (I, J, K) with voxel -> RAS affine, {value: name}, {value: rgb}).
        Only single-layer files are supported (overlapping segments are a 4-D file).
    """
    import slicerio

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such segmentation file")
    seg = slicerio.read_segmentation(str(path))
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim != 3:
        raise ValueError(f"{path}: has {voxels.ndim}-D voxels (overlapping segments); "
                         "export a single-layer segmentation")
    labels = {int(s["labelValue"]): s.get("name", f"Segment_{s['labelValue']}") for s in seg["segments"]}
    colors = {int(s["labelValue"]): tuple(s["color"]) for s in seg["segments"] if "color" in s}
    affine = LPS_TO_RAS @ np.asarray(seg["ijkToLPS"], dtype=np.float64)
    return Volume(voxels.astype(np.float32), affine, source=str(path)), labels, colors


# ------------------------------------------------------------------------------------------
# prediction.json
# ------------------------------------------------------------------------------------------
def file_sha256(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (identifies a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a config dict (``Config.to_dict()``): sorted-key JSON, SHA-256."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _finite(x: Any, what: str) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{what} is not finite ({v}); the model produced NaN/inf")
    return v


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis."""
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def classification_uncertainty(probability_samples: np.ndarray) -> dict[str, float]:
    """Uncertainty from K probability samples.

    Args:
        probability_samples: (K, C) class probabilities of the K diffusion samples.

    Returns:
        ``{"std", "entropy", "mutual_information"}``: std over K of the predicted-class
        probability, entropy of the mean (nats), entropy of the mean minus mean entropy.
    """
    ps = np.asarray(probability_samples, dtype=np.float64)
    if ps.ndim != 2:
        raise ValueError(f"probability_samples must be (K, C), got shape {ps.shape}")
    mean = ps.mean(axis=0)  # (C,)
    top = int(mean.argmax())
    h_mean = float(_entropy(mean))
    mi = max(0.0, h_mean - float(_entropy(ps).mean()))
    return {"std": float(ps[:, top].std()), "entropy": h_mean, "mutual_information": mi}


def build_prediction_record(
    *,
    patient_id: str,
    task: Literal["classification", "regression", "survival"],
    probability_samples: Optional[Union[np.ndarray, Sequence[Sequence[float]]]] = None,
    probabilities: Optional[Sequence[float]] = None,
    class_names: Optional[Sequence[str]] = None,
    value_samples: Optional[Union[np.ndarray, Sequence[float]]] = None,
    value: Optional[float] = None,
    num_samples: Optional[int] = None,
    uncertainty: Optional[Mapping[str, Optional[float]]] = None,
    contributions: Optional[Mapping[str, float]] = None,
    model_modalities: Sequence[str] = (),
    used_modalities: Sequence[str] = (),
    imputed_modalities: Sequence[str] = (),
    checkpoint: Optional[Union[str, Path]] = None,
    checkpoint_sha256: Optional[str] = None,
    config_hash_: Optional[str] = None,
    ttt: Optional[Mapping[str, Any]] = None,
    timings: Optional[Mapping[str, float]] = None,
    segmentation: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Assemble (and check) the ``prediction.json`` record; see the module docstring for the schema.

    Give either the K per-sample outputs (``probability_samples`` (K, C) / ``value_samples``
    (K,)) or their mean (``probabilities`` (C,) / ``value``) with ``uncertainty["std"]`` and
    ``num_samples``.

    Args:
        patient_id: the patient's ID.
        task: the checkpoint's task.
        probability_samples: (K, C) per-sample class probabilities (classification).
        probabilities: (C,) mean class probabilities (classification, without samples).
        class_names: C names; default ``"class 0"``, ``"class 1"``, ...
        value_samples: (K,) per-sample risk (survival) or value (regression).
        value: mean risk / value (without samples).
        num_samples: K when only the mean is given.
        uncertainty: std / entropy / expected_entropy / mutual_information; computed from the
            samples where not given.
        contributions: modality -> contribution (must be finite, modalities the patient has).
        model_modalities: the checkpoint's modality order.
        used_modalities: the modalities this patient had (subset of ``model_modalities``).
        imputed_modalities: the missing modalities whose tokens the checkpoint's token imputer
            filled in (``modalities.imputed``, written only when there are any).
        checkpoint, checkpoint_sha256, config_hash_: model identity.
        ttt: test-time training settings and outcome (steps, loss before/after, accepted, ...).
        timings: stage -> seconds.
        segmentation: description of the written segmentation (file, labels, colours, backend).
        extra: further JSON-able keys stored under ``"extra"``.

    Returns:
        The record as a JSON-able dict.
    """
    if task not in ("classification", "regression", "survival"):
        raise ValueError(f"task {task!r} not in ['classification', 'regression', 'survival']")
    unknown = sorted(set(used_modalities) - set(model_modalities)) if model_modalities else []
    if unknown:
        raise ValueError(f"used modalities {unknown} are not modalities of the model "
                         f"{list(model_modalities)}")
    given_unc = dict(uncertainty or {})
    for k, v in given_unc.items():
        if k not in ("std", "entropy", "expected_entropy", "mutual_information"):
            raise ValueError(f"uncertainty key {k!r} not in ['std', 'entropy', 'expected_entropy', "
                             "'mutual_information']")
        if v is not None:
            _finite(v, f"uncertainty {k}")
    pred: dict[str, Any]
    if task == "classification":
        if (probability_samples is None) == (probabilities is None):
            raise ValueError("classification needs probability_samples (K, C) or probabilities (C,)")
        ps = np.asarray(probability_samples if probability_samples is not None else probabilities,
                        dtype=np.float64)
        if ps.ndim == 1:
            ps = ps[None]  # (1, C)
        if ps.ndim != 2 or ps.shape[1] < 2:
            raise ValueError(f"class probabilities must be (K, C>=2) or (C>=2,), got shape {ps.shape}")
        if not np.all(np.isfinite(ps)):
            raise ValueError(f"class probabilities contain NaN/inf ({int((~np.isfinite(ps)).sum())} of "
                             f"{ps.size} values); the model output is broken, check the checkpoint")
        if np.any(np.abs(ps.sum(axis=1) - 1.0) > 1e-3) or ps.min() < -1e-6:
            raise ValueError(f"class probabilities must be probabilities summing to 1 (row sums "
                             f"{np.round(ps.sum(axis=1), 4).tolist()[:5]}, min {ps.min():.4g}); "
                             "pass softmax outputs, not logits")
        names = list(class_names) if class_names else [f"class {c}" for c in range(ps.shape[1])]
        if len(names) != ps.shape[1]:
            raise ValueError(f"{len(names)} class names for {ps.shape[1]} classes")
        mean = ps.mean(axis=0)  # (C,)
        top = int(mean.argmax())
        if probability_samples is not None:
            lo, hi = np.percentile(ps, [2.5, 97.5], axis=0)  # (C,), (C,)
            intervals = {n: [float(lo[c]), float(hi[c])] for c, n in enumerate(names)}
            method, k = "percentile", int(ps.shape[0])
            unc = classification_uncertainty(ps)
            unc["expected_entropy"] = float(_entropy(ps).mean())
        else:
            if given_unc.get("std") is None:
                raise ValueError("probabilities without samples need uncertainty['std']")
            sd = float(given_unc["std"])
            intervals = {n: None for n in names}
            for c, n in enumerate(names):
                if c == top or len(names) == 2:  # binary: both classes share the std
                    intervals[n] = [max(0.0, float(mean[c]) - 1.96 * sd), min(1.0, float(mean[c]) + 1.96 * sd)]
            method, k = "normal", int(num_samples or 1)
            unc = {"std": sd, "entropy": float(_entropy(mean)), "expected_entropy": None,
                   "mutual_information": None}
        pred = {
            "class_names": names,
            "probabilities": {n: float(mean[c]) for c, n in enumerate(names)},
            "probability_interval": intervals,
            "interval_method": method,
            "predicted_class": names[top],
            "predicted_index": top,
            "samples": k,
        }
    else:
        key = "risk" if task == "survival" else "value"
        if (value_samples is None) == (value is None):
            raise ValueError(f"{task} needs value_samples (K,) or value")
        if value_samples is not None:
            vs = np.asarray(value_samples, dtype=np.float64).reshape(-1)  # (K,)
            if vs.size == 0 or not np.all(np.isfinite(vs)):
                raise ValueError(f"value_samples must be K >= 1 finite numbers, got {vs.size} with "
                                 f"{int((~np.isfinite(vs)).sum())} NaN/inf; check the model output")
            lo, hi = np.percentile(vs, [2.5, 97.5])
            mean_v, method, k, sd = float(vs.mean()), "percentile", int(vs.size), float(vs.std())
        else:
            mean_v = _finite(value, key)
            if given_unc.get("std") is None:
                raise ValueError(f"{key} without samples needs uncertainty['std']")
            sd = float(given_unc["std"])
            lo, hi = mean_v - 1.96 * sd, mean_v + 1.96 * sd
            method, k = "normal", int(num_samples or 1)
        pred = {key: mean_v, f"{key}_interval": [float(lo), float(hi)], "interval_method": method,
                "samples": k}
        unc = {"std": sd, "entropy": None, "expected_entropy": None, "mutual_information": None}
    for kk, v in given_unc.items():
        unc[kk] = None if v is None else float(v)
    contrib = {str(kk): _finite(v, f"contribution of {kk}") for kk, v in (contributions or {}).items()}
    not_used = sorted(set(contrib) - set(used_modalities)) if used_modalities else []
    if not_used:
        raise ValueError(f"contributions given for {not_used}, which the patient does not have")
    from . import __version__

    return {
        "schema": SCHEMA,
        "patient_id": str(patient_id),
        "task": task,
        "prediction": pred,
        "uncertainty": unc,
        "contributions": contrib,
        "modalities": {
            "model": list(model_modalities),
            "used": [m for m in model_modalities if m in set(used_modalities)] or list(used_modalities),
            "missing": [m for m in model_modalities if m not in set(used_modalities)],
            **({"imputed": list(imputed_modalities)} if imputed_modalities else {}),
        },
        "model": {
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "checkpoint_sha256": checkpoint_sha256,
            "config_hash": config_hash_,
            "version": __version__,
        },
        "ttt": dict(ttt or {}),
        "segmentation": dict(segmentation) if segmentation else None,
        "timings_s": {str(kk): float(v) for kk, v in (timings or {}).items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"clinfusediff": __version__},
        **({"extra": dict(extra)} if extra else {}),
    }


def write_prediction_json(path: Union[str, Path], record: Mapping[str, Any]) -> Path:
    """Write a record from :func:`build_prediction_record` atomically (checks the schema tag)."""
    if record.get("schema") != SCHEMA:
        raise ValueError(f"not a prediction record (schema {record.get('schema')!r}, expected "
                         f"{SCHEMA!r}); build it with build_prediction_record")
    return atomic_write_json(path, dict(record))


def read_prediction_json(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such prediction file")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {record.get('schema')!r} is not {SCHEMA!r}")
    return record


# ------------------------------------------------------------------------------------------
# report.png
# ------------------------------------------------------------------------------------------
def _resample_like(vol: Volume, ref: Volume, nearest: bool = False) -> np.ndarray:
    """``vol`` resampled onto ``ref``'s grid; returns (I, J, K) of ``ref``."""
    if vol.shape == ref.shape and np.allclose(vol.affine, ref.affine, atol=1e-4):
        return np.asarray(vol.array)
    import SimpleITK as sitk

    out = sitk.Resample(vol.to_sitk(), ref.to_sitk(),
                        sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                        0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _as_volume(x: Union[Volume, np.ndarray], name: str) -> Volume:
    if isinstance(x, Volume):
        return x
    return Volume(np.asarray(x, dtype=np.float32), np.eye(4), source=name)


def _window(a: np.ndarray) -> tuple[float, float]:
    nz = a[a != 0]
    data = nz if nz.size > 16 else a.ravel()
    lo, hi = np.percentile(data, [1, 99]) if data.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def render_report(
    images: Mapping[str, Union[Volume, np.ndarray]],
    seg: Optional[Union[Volume, np.ndarray]],
    prediction: Mapping[str, Any],
    path: Union[str, Path],
    labels: Optional[Mapping[int, str]] = None,
    colors: Optional[Mapping[int, Sequence[float]]] = None,
    dpi: int = 110,
) -> Path:
    """Render a one-page PNG summary of one patient.

    Args:
        images: modality -> ``Volume`` (any grid; resampled onto the segmentation's grid, or
            onto the first image's grid when there is no segmentation) or an (I, J, K) array
            already on that grid in RAS orientation.
        seg: the labelmap (``Volume`` or (I, J, K) array) or None.
        prediction: a record from :func:`build_prediction_record`.
        path: the PNG to write (atomically).
        labels, colors: segment names and RGB colours for the legend/overlay; default: the
            record's ``segmentation.labels`` or ``"label k"``, palette colours.
        dpi: resolution.

    Returns:
        The written path. Rows: axial and coronal slices through the segmentation's centre of
        mass (radiological convention: patient right on the left), then the prediction with its
        2.5-97.5 % interval over the K samples, the per-modality contributions, and a text panel.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not images:
        raise ValueError("render_report needs at least one image")
    names = list(images)
    vols = {n: _as_volume(images[n], n) for n in names}
    if seg is not None:
        ref = _as_volume(seg, "segmentation")
    else:
        ref = vols[names[0]]
    # Show everything in the closest-RAS orientation of the reference grid.
    ref_c = ref.canonical()
    if seg is not None:
        seg_arr = np.rint(_resample_like(_as_volume(seg, "segmentation"), ref_c, nearest=True))
        seg_arr = seg_arr.astype(np.int64)  # (I, J, K) canonical
    else:
        seg_arr = None
    arrs = {n: _resample_like(v, ref_c) for n, v in vols.items()}  # (I, J, K) canonical

    seg_meta = prediction.get("segmentation") or {}
    if labels is None:
        labels = {int(k): v for k, v in (seg_meta.get("labels") or {}).items()}
    if seg_arr is not None:
        for v in np.unique(seg_arr):
            if v != 0 and int(v) not in labels:
                labels = {**labels, int(v): f"label {int(v)}"}
    colors = {int(k): tuple(c) for k, c in (colors or seg_meta.get("colors") or {}).items()}

    # Slice positions: centre of mass of the segmentation, else the middle.
    shape = ref_c.shape
    if seg_arr is not None and (seg_arr > 0).any():
        com = np.array(np.nonzero(seg_arr > 0)).mean(axis=1).round().astype(int)
    else:
        com = np.array(shape) // 2
    ci, cj, ck = (int(c) for c in com)
    sp = ref_c.spacing

    max_label = max(labels) if labels else 1
    lut = np.zeros((max_label + 1, 4))
    for v in labels:
        lut[v, :3] = colors.get(v, default_color(v))
        lut[v, 3] = 0.3
    cmap = ListedColormap(lut)

    ncol = max(len(names), 3)
    fig = Figure(figsize=(max(3.2 * ncol, 11.0), 10.0), dpi=dpi)
    gs = fig.add_gridspec(3, ncol, height_ratios=[1.0, 1.0, 0.95], hspace=0.32, wspace=0.12)
    pid = prediction.get("patient_id", "?")
    task = prediction.get("task", "?")
    fig.suptitle(f"ClinFuseDiff — patient {pid} ({task})", fontsize=15, fontweight="bold")

    def show(ax, img2d, seg2d, aspect, title):
        # img2d is (x, y) in RAS; transpose for imshow, flip x for radiological display.
        lo, hi = _window(img2d)
        ax.imshow(img2d.T[:, ::-1], cmap="gray", vmin=lo, vmax=hi, origin="lower",
                  aspect=aspect, interpolation="nearest")
        if seg2d is not None:
            s2 = np.clip(seg2d, 0, max_label).T[:, ::-1]
            ax.imshow(s2, cmap=cmap, vmin=0, vmax=max_label, origin="lower", aspect=aspect,
                      interpolation="nearest")
            for v in labels:
                if (s2 == v).any():
                    ax.contour((s2 == v).astype(float), levels=[0.5], origin="lower",
                               colors=[colors.get(v, default_color(v))], linewidths=1.3)
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
        ax.text(0.95, 0.5, "L", transform=ax.transAxes, color="yellow", fontsize=9, va="center")

    for c, n in enumerate(names):
        a = arrs[n]
        show(fig.add_subplot(gs[0, c]), a[:, :, ck], None if seg_arr is None else seg_arr[:, :, ck],
             sp[1] / sp[0], f"{n} — axial")
        show(fig.add_subplot(gs[1, c]), a[:, cj, :], None if seg_arr is None else seg_arr[:, cj, :],
             sp[2] / sp[0], f"{n} — coronal")
    for c in range(len(names), ncol):
        for r in (0, 1):
            fig.add_subplot(gs[r, c]).axis("off")
    if seg_arr is not None and labels:
        handles = [Patch(color=colors.get(v, default_color(v)), label=f"{labels[v]} ({v})")
                   for v in sorted(labels)]
        fig.legend(handles=handles, loc="upper right", fontsize=9, frameon=True,
                   bbox_to_anchor=(0.995, 0.985))

    bottom = gs[2, :].subgridspec(1, 3, width_ratios=[1.0, 1.0, 1.25], wspace=0.55)
    # --- prediction with its interval
    ax_p = fig.add_subplot(bottom[0, 0])
    pred = prediction.get("prediction", {})
    unc = prediction.get("uncertainty", {})
    if task == "classification":
        cls = pred["class_names"]
        p = np.array([pred["probabilities"][c] for c in cls])
        ivs = [pred["probability_interval"].get(c) for c in cls]
        iv = np.array([v if v is not None else [pp, pp] for v, pp in zip(ivs, p)])  # (C, 2)
        y = np.arange(len(cls))
        bar_colors = ["#d62728" if i == pred["predicted_index"] else "#9e9e9e" for i in y]
        ax_p.barh(y, p, color=bar_colors, height=0.6)
        ax_p.errorbar(p, y, xerr=np.abs(np.stack([p - iv[:, 0], iv[:, 1] - p])), fmt="none",
                      ecolor="black", capsize=5, lw=1.5)
        ax_p.set_yticks(y)
        ax_p.set_yticklabels([f"{c}\n{pp:.2f}" + (f" [{v[0]:.2f}–{v[1]:.2f}]" if v else "")
                              for c, pp, v in zip(cls, p, ivs)], fontsize=9)
        ax_p.set_xlim(0, 1)
        ax_p.axvline(0.5, color="black", lw=0.6, ls=":")
        how = "±1.96 std" if pred.get("interval_method") == "normal" else "95% interval"
        ax_p.set_xlabel(f"probability; whisker: {how} over K={pred['samples']} samples",
                        fontsize=8.5)
        top = pred["predicted_index"]
        ax_p.set_title(f"Prediction: {pred['predicted_class']} (p={p[top]:.2f})", fontsize=12,
                       fontweight="bold", color="#b71c1c")
    else:
        key = "risk" if task == "survival" else "value"
        v = pred[key]
        lo, hi = pred[f"{key}_interval"]
        ax_p.errorbar([v], [0], xerr=[[v - lo], [hi - v]], fmt="o", color="#d62728", capsize=8,
                      ms=10, lw=2)
        pad = max(hi - lo, abs(v) * 0.2, 1e-3)
        ax_p.set_xlim(lo - pad, hi + pad)
        ax_p.set_yticks([])
        how = "±1.96 std" if pred.get("interval_method") == "normal" else "95% interval"
        ax_p.set_xlabel(f"{key}{' (log-hazard)' if key == 'risk' else ''}; whisker: {how}, "
                        f"K={pred['samples']} samples", fontsize=8.5)
        ax_p.set_title(f"Predicted {key}: {v:.3g} [{lo:.3g}–{hi:.3g}]", fontsize=12,
                       fontweight="bold", color="#b71c1c")
    ax_p.grid(axis="x", alpha=0.3)

    # --- contributions
    ax_c = fig.add_subplot(bottom[0, 1])
    contrib = prediction.get("contributions") or {}
    if contrib:
        mods = list(contrib)
        vals = np.array([contrib[m] for m in mods])
        ax_c.barh(np.arange(len(mods)), vals, color="#1f77b4")
        ax_c.set_yticks(np.arange(len(mods)))
        ax_c.set_yticklabels(mods, fontsize=10)
        ax_c.invert_yaxis()
        ax_c.axvline(0, color="black", lw=0.8)
        ax_c.grid(axis="x", alpha=0.3)
    else:
        ax_c.text(0.5, 0.5, "no contributions", ha="center", va="center")
        ax_c.set_xticks([])
        ax_c.set_yticks([])
    ax_c.set_title("Per-modality contribution", fontsize=12)

    # --- text summary
    ax_t = fig.add_subplot(bottom[0, 2])
    ax_t.axis("off")
    mods = prediction.get("modalities", {})
    ttt = prediction.get("ttt") or {}
    timings = prediction.get("timings_s") or {}

    def fmt(x):
        return "—" if x is None else f"{x:.3f}"

    lines = [
        f"Uncertainty  std {fmt(unc.get('std'))}",
        f"  entropy {fmt(unc.get('entropy'))}  MI {fmt(unc.get('mutual_information'))}",
        f"Used: {', '.join(mods.get('used', [])) or '—'}",
        f"Missing: {', '.join(mods.get('missing', [])) or 'none'}",
        f"TTT: {'on' if ttt.get('enabled') else 'off'}"
        + (f", {ttt.get('steps')} steps" if ttt.get("enabled") and ttt.get("steps") is not None else ""),
        "Time: " + ("  ".join(f"{k} {v:.1f}s" for k, v in timings.items()) or "—"),
        f"Checkpoint sha256: {str((prediction.get('model') or {}).get('checkpoint_sha256') or '—')[:16]}",
        "Research use only — not a medical device.",
    ]
    ax_t.set_title("Summary", fontsize=12)
    ax_t.text(0.0, 1.0, "\n".join(textwrap.fill(t, 42, subsequent_indent="  ") for t in lines),
              va="top", ha="left", fontsize=9.5, family="monospace", transform=ax_t.transAxes)

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png", dpi=dpi, facecolor="white")
    plt.close("all")
    return path


# ------------------------------------------------------------------------------------------
# The set of one patient's outputs: staged, moved into place, manifest written last
# ------------------------------------------------------------------------------------------
MANIFEST = "outputs.json"
MANIFEST_SCHEMA = "clinfusediff.outputs/1"
#: every file ``clinfusediff infer`` may write into ``--out`` (one patient's set)
OUTPUT_FILES = ("prediction.json", "segmentation.seg.nrrd", "report.png")
_STAGING_PREFIX = ".infer-p"


def _remove_stale_staging(out_dir: Path) -> list[Path]:
    """Staging folders (and atomic temp files) that killed runs left in ``out_dir``."""
    import os
    import re
    import shutil

    from .utils import _pid_alive, remove_stale_temps

    removed = list(remove_stale_temps(out_dir))
    for d in out_dir.glob(f"{_STAGING_PREFIX}*"):
        m = re.match(rf"^{re.escape(_STAGING_PREFIX)}(\d+)-", d.name)
        if d.is_dir() and m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class OutputSet:
    """Write one patient's outputs into ``out_dir`` as a set (``with OutputSet(out, pid) as s:``).

    Files are written into a hidden staging folder inside ``out_dir`` (``s.path(name)``). On
    success: the previous set's manifest is removed first (from then on the folder holds no valid
    set), files of the previous set that are not in the new one are removed, the new files are
    renamed into place, and ``outputs.json`` — naming the patient and every file with its SHA-256 —
    is written last (atomically). A run killed at any point leaves a folder without a valid
    manifest (``read_output_set`` refuses it); the next run removes the killed run's staging folder.
    On an error inside the block nothing in ``out_dir`` changes.
    """

    def __init__(self, out_dir: Union[str, Path], patient_id: str, **info: Any):
        self.out_dir = Path(out_dir)
        self.patient_id = str(patient_id)
        self.info = info
        self.staging: Optional[Path] = None
        self.written: list[Path] = []

    def __enter__(self) -> "OutputSet":
        import os
        import tempfile

        self.out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(self.out_dir)
        self.staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=self.out_dir))
        return self

    def path(self, name: str) -> Path:
        """Where to write output ``name`` (inside the staging folder)."""
        if name not in OUTPUT_FILES:
            raise ValueError(f"output {name!r} not in {list(OUTPUT_FILES)}")
        return self.staging / name

    def __exit__(self, exc_type, exc, tb) -> None:
        import os
        import shutil

        try:
            if exc_type is not None:
                return
            files = [n for n in OUTPUT_FILES if (self.staging / n).is_file()]
            manifest = self.out_dir / MANIFEST
            old: set[str] = set(OUTPUT_FILES)
            if manifest.is_file():
                try:
                    old |= set(json.loads(manifest.read_text(encoding="utf-8")).get("files", {}))
                except (ValueError, AttributeError):
                    pass
                manifest.unlink()  # from here on the folder holds no valid set until the new manifest
            for name in sorted(old - set(files)):
                if name in OUTPUT_FILES and (self.out_dir / name).is_file():
                    (self.out_dir / name).unlink()  # another patient's file must not stay beside ours
            digests = {n: file_sha256(self.staging / n) for n in files}
            for n in files:
                os.replace(self.staging / n, self.out_dir / n)
            atomic_write_json(manifest, {
                "schema": MANIFEST_SCHEMA, "patient_id": self.patient_id, "complete": True,
                "files": digests, **self.info,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            self.written = [self.out_dir / n for n in files]
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


def read_output_set(out_dir: Union[str, Path]) -> dict[str, Any]:
    """The manifest of a complete output set in ``out_dir``, verified against the files.

    Raises:
        ValueError: no manifest (a run was interrupted, or the folder was not written by
            ``infer``), a file missing or changed since (another run's file mixed in).
    """
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{out_dir}: no {MANIFEST}: the outputs are incomplete (the run writing them "
                         "was interrupted) or not written by clinfusediff infer; rerun infer")
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{manifest}: unreadable ({e}); rerun infer") from e
    if m.get("schema") != MANIFEST_SCHEMA or not m.get("complete"):
        raise ValueError(f"{manifest}: not a complete output set; rerun infer")
    for name, digest in (m.get("files") or {}).items():
        f = out_dir / name
        if not f.is_file() or file_sha256(f) != digest:
            raise ValueError(f"{f}: {'missing' if not f.is_file() else 'changed'} since {MANIFEST} "
                             f"was written for patient {m.get('patient_id')!r}; the folder mixes runs, "
                             "rerun infer")
    return m
