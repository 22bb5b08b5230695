"""Preprocessing: one code path for training, CLI inference and the Slicer module.

``preprocess_patient`` takes a :class:`~ClinFuseDiffCore.data.discovery.PatientRecord` (files on
disk) or a ``dict[str, Volume]`` (what the Slicer module passes) and returns a
:class:`PreprocessedPatient`: every image modality of the patient on ONE output grid that is
canonical RAS (axis-aligned, positive spacing) at ``cfg.target_shape``, intensity-normalised, with
the brain mask, the ground-truth labelmap (nearest neighbour through the same geometry) and what is
needed to map a result back onto each input grid.

Steps (``cfg`` is :class:`~ClinFuseDiffCore.config.PreprocessingConfig`):

1. Check that all modalities of the patient (and the labelmap) overlap in space: their fields of
   view share more than ``cfg.min_overlap`` of the smaller one (``volume.check_overlap``), else a
   ``ValueError`` naming both modalities and files. (``Volume`` itself refuses NaN/Inf voxels.)
2. Reference modality: ``cfg.mask_modality`` when the patient has it, else the mask backend's
   preferred modality (``segmentation.choose_modality``).
3. Brain mask of the reference from the segmentation backend ``cfg.mask_backend`` (``"none"``:
   the whole field of view), computed on the reference's own grid, or on an axis-aligned RAS grid
   at ``max(cfg.spacing, cfg.mask_spacing)`` when the reference is finer than that (the
   backend's cost grows with the voxel count), then resampled (nearest) onto the output grid.
4. Output grid: the brain's RAS bounding box + ``cfg.crop_margin`` output voxels, centred in
   ``cfg.target_shape`` voxels at ``cfg.spacing`` (symmetric padding, as MONAI's
   ``CropForeground`` + ``ResizeWithPadOrCrop``). A box larger than the target is either fitted by
   coarsening the spacing uniformly (``cfg.fit="resize"``, recorded in ``info["scale"]``) or cut
   centrally (``"crop"``).
5. Every modality is resampled ONCE from its original grid onto the output grid (SimpleITK,
   linear; labelmaps nearest). One interpolation per image, and the geometry is exact: the output
   affine is the grid the voxels were sampled on.
6. Intensities: MRI and PET map the ``cfg.{mri,pet}_percentiles`` inside the brain mask to 0..1;
   CT maps the HU window ``cfg.ct_window`` to 0..1; both clipped. ``cfg.skull_strip`` zeroes
   voxels outside the mask.

Why SimpleITK and not MONAI's ``Orientation``/``Spacing``: steps 4-5 fold orientation, spacing,
crop and pad into one resampling per image with an explicit output grid; MONAI's ``Spacing`` is
~6x slower than SimpleITK here (docs/LIBRARY_NOTES) and chains several interpolations. The
percentile normalisation is computed inside the brain mask, which MONAI's
``ScaleIntensityRangePercentiles`` cannot do, so it is three lines of numpy.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..config import PreprocessingConfig
from ..utils import _json_default
from .volume import LPS_TO_RAS, Volume, check_overlap

log = logging.getLogger(__name__)

#: Bump when the output of ``preprocess_patient`` changes for the same inputs (invalidates caches).
PIPELINE_VERSION = "1"

PathLike = Union[str, Path]
VolumeOrPath = Union[Volume, PathLike]


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------
@dataclass
class InputGrid:
    """The grid of one input volume, enough to map a result back onto it.

    Args:
        shape: (I, J, K) of the input array.
        affine: (4, 4) voxel -> RAS of the input.
        source: the file (or ``<slicer>``) it came from.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": [int(s) for s in self.shape], "affine": np.asarray(self.affine).tolist(),
                "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputGrid":
        return cls(tuple(int(s) for s in d["shape"]), np.asarray(d["affine"], dtype=np.float64),
                   str(d["source"]))


@dataclass
class PreprocessedPatient:
    """One patient after preprocessing; every array is on the same output grid.

    Args:
        patient_id: the patient's ID.
        images: modality -> (D, H, W) float32 normalised image (only the modalities present),
            axes = RAS (D along R, H along A, W along S).
        mask: (D, H, W) uint8 brain mask (all ones with ``mask_backend="none"``).
        affine: (4, 4) voxel -> RAS of the output grid (diagonal, positive spacing).
        inputs: modality (and ``"seg"``) -> :class:`InputGrid` of the original input.
        seg: (D, H, W) int16 ground-truth labelmap (nearest neighbour), or None.
        info: plain data about the run: reference modality, backend, output spacing,
            normalisation ranges (``info["norm"][m] = [low, high]`` in input units), the fraction
            of the brain mask each image covers (``info["brain_coverage"][m]``; voxels outside an
            image's field of view are 0), parameters.
    """

    patient_id: str
    images: dict[str, np.ndarray]
    mask: np.ndarray
    affine: np.ndarray
    inputs: dict[str, InputGrid]
    seg: Optional[np.ndarray] = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.mask.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """(3,) output voxel size in mm along R, A, S."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def modalities(self) -> list[str]:
        return list(self.images)

    def volume(self, modality: str) -> Volume:
        """The preprocessed image of ``modality`` as a ``Volume`` on the output grid."""
        self._check_modality(modality, self.images)
        return Volume(self.images[modality], self.affine.copy(),
                      source=f"{self.patient_id}/{modality} (preprocessed)")

    def map_back(self, array: np.ndarray, modality: str,
                 interpolation: Optional[str] = None) -> Volume:
        """Resample an array on the output grid onto the original grid of one input.

        Args:
            array: (D, H, W) on the output grid (e.g. a segmentation or a saliency map).
            modality: which input grid to land on (an image modality or ``"seg"``).
            interpolation: ``"nearest"`` | ``"linear"``; default nearest for integer/bool arrays
                (labels), linear for floats.

        Returns:
            ``Volume`` (I, J, K) with the input's shape and affine; 0 outside the output grid.
        """
        self._check_modality(modality, self.inputs)
        array = np.asarray(array)
        if array.shape != self.shape:
            raise ValueError(f"map_back: array shape {array.shape} is not the output grid shape "
                             f"{self.shape}; give an array on the preprocessed grid")
        if interpolation is None:
            interpolation = "linear" if np.issubdtype(array.dtype, np.floating) else "nearest"
        if interpolation not in ("nearest", "linear"):
            raise ValueError(f"interpolation {interpolation!r} not in ['nearest', 'linear']")
        grid = self.inputs[modality]
        src = Volume(array.astype(np.float32), self.affine, source=f"{self.patient_id} output")
        out = _resample(src, grid.affine, grid.shape, interpolation, default=0.0)
        if interpolation == "nearest" and not np.issubdtype(array.dtype, np.floating):
            out = np.rint(out)
        return Volume(out, grid.affine.copy(), source=f"{self.patient_id} mapped to {grid.source}")

    @staticmethod
    def _check_modality(modality: str, known: Mapping[str, Any]) -> None:
        if modality not in known:
            raise ValueError(f"modality {modality!r} not in this patient's {sorted(known)}")

    # ------------------------------------------------------------ flat arrays (cache, npz)
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat ``name -> ndarray`` (no objects: safe for ``np.savez`` / ``allow_pickle=False``)."""
        out: dict[str, np.ndarray] = {f"image__{m}": np.ascontiguousarray(a, dtype=np.float32)
                                      for m, a in self.images.items()}
        out["mask"] = np.ascontiguousarray(self.mask, dtype=np.uint8)
        out["affine"] = np.asarray(self.affine, dtype=np.float64)
        if self.seg is not None:
            out["seg"] = np.ascontiguousarray(self.seg, dtype=np.int16)
        meta = {"patient_id": self.patient_id, "modalities": list(self.images),
                "inputs": {k: g.to_dict() for k, g in self.inputs.items()}, "info": self.info}
        out["meta_json"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(),
                                         dtype=np.uint8)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "PreprocessedPatient":
        """Inverse of :meth:`to_arrays`."""
        meta = json.loads(bytes(np.asarray(arrays["meta_json"], dtype=np.uint8)).decode())
        images = {m: np.asarray(arrays[f"image__{m}"], dtype=np.float32)
                  for m in meta["modalities"]}
        return cls(
            patient_id=meta["patient_id"], images=images,
            mask=np.asarray(arrays["mask"], dtype=np.uint8),
            affine=np.asarray(arrays["affine"], dtype=np.float64),
            inputs={k: InputGrid.from_dict(v) for k, v in meta["inputs"].items()},
            seg=np.asarray(arrays["seg"], dtype=np.int16) if "seg" in arrays else None,
            info=meta["info"],
        )


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
def _sitk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """(origin, spacing, direction) of a voxel->RAS affine in ITK's LPS convention."""
    m = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((m[:3, :3] ** 2).sum(axis=0))
    direction = m[:3, :3] / spacing[None, :]
    return m[:3, 3].tolist(), spacing.tolist(), direction.flatten().tolist()


def _resample(vol: Volume, affine: np.ndarray, shape: tuple[int, int, int], interpolation: str,
              default: float, image=None) -> np.ndarray:
    """Sample ``vol`` on the grid (``affine``, ``shape``); returns (I, J, K) float32.

    ``image`` is ``vol.to_sitk()`` when the caller already has it.
    """
    import SimpleITK as sitk

    img = image if image is not None else vol.to_sitk()
    origin, spacing, direction = _sitk_geometry(affine)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in shape])
    f.SetOutputOrigin(origin)
    f.SetOutputSpacing(spacing)
    f.SetOutputDirection(direction)
    f.SetInterpolator(sitk.sitkNearestNeighbor if interpolation == "nearest" else sitk.sitkLinear)
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(sitk.sitkFloat32)
    out = f.Execute(img)
    arr = sitk.GetArrayViewFromImage(out).transpose(2, 1, 0)  # KJI -> (I, J, K)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _ras_grid(box: tuple[np.ndarray, np.ndarray], spacing: np.ndarray
              ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Axis-aligned RAS grid at ``spacing`` covering ``box``: (affine (4, 4), shape)."""
    lo, hi = box
    shape = tuple(max(1, math.ceil((b - a) / s - 1e-6)) for a, b, s in zip(lo, hi, spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo + spacing / 2.0  # centre of voxel 0
    return affine, shape  # type: ignore[return-value]


def mask_box(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box (low (3,), high (3,)) in mm around the voxels of ``mask`` (I, J, K)
    on the grid ``affine`` (any orientation; voxel edges included)."""
    lin = affine[:3, :3]
    if np.count_nonzero(np.abs(lin) > 1e-9 * np.abs(lin).max()) == 3:
        # Axes along R, A, S (flipped or permuted): the index box's corners are exact.
        ends = []
        for ax in range(3):
            nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
            ends.append((nz[0], nz[-1]))
        idx = np.array([[i, j, k] for i in ends[0] for j in ends[1] for k in ends[2]], float)
    else:
        idx = np.argwhere(mask)  # (N, 3) every voxel of an oblique grid
    ras = idx @ lin.T + affine[:3, 3]  # (N, 3) voxel centres
    half = 0.5 * np.abs(affine[:3, :3]).sum(axis=1)  # (3,) half a voxel along R, A, S
    return ras.min(axis=0) - half, ras.max(axis=0) + half


def _output_grid(box: tuple[np.ndarray, np.ndarray], cfg: PreprocessingConfig
                 ) -> tuple[np.ndarray, dict]:
    """The output grid's affine (4, 4): ``cfg.target_shape`` voxels centred on ``box`` (+margin).

    Fits at ``cfg.spacing``: that spacing (symmetric padding, as MONAI's ResizeWithPadOrCrop).
    Too large: ``fit="resize"`` scales the spacing uniformly until the box fits; ``"crop"``
    keeps the spacing and cuts centrally.
    """
    target = np.array(cfg.target_shape, dtype=np.float64)
    spacing = np.asarray(cfg.spacing, dtype=np.float64)
    lo, hi = box
    extent = (hi - lo) / spacing + 2 * cfg.crop_margin  # (3,) in output voxels
    fits = bool(np.all(extent <= target + 1e-6))
    scale = 1.0 if fits or cfg.fit == "crop" else float(np.max(extent / target))
    out_spacing = spacing * scale
    origin = (lo + hi) / 2.0 - (target - 1) / 2.0 * out_spacing  # centre of voxel 0
    affine = np.diag([*out_spacing, 1.0])
    affine[:3, 3] = origin
    return affine, {"box_mm": [lo.tolist(), hi.tolist()],
                    "box_extent_voxels": np.round(extent, 2).tolist(), "fits": fits,
                    "scale": scale}


def _mask_grid(vol: Volume, cfg: PreprocessingConfig
               ) -> Optional[tuple[np.ndarray, tuple[int, int, int]]]:
    """Where the brain mask is computed: None = the volume's own grid when its voxels are no
    finer than ``s = max(min(cfg.spacing), cfg.mask_spacing)``, else an axis-aligned RAS grid
    at ``s`` over its field of view (the backend's cost grows with the voxel count)."""
    s = max(float(np.min(cfg.spacing)), float(cfg.mask_spacing))
    if np.all(vol.spacing >= 0.99 * s):
        return None
    return _ras_grid(vol.bounds_ras(), np.full(3, s))


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _family(modality: str) -> str:
    from ..modalities import IMAGE_MODALITIES

    if modality in IMAGE_MODALITIES:
        return IMAGE_MODALITIES[modality].family
    from .segmentation import modality_family

    return modality_family(modality)


def _as_volume(x: VolumeOrPath, what: str) -> Volume:
    if isinstance(x, Volume):
        return x
    if isinstance(x, (str, Path)):
        return Volume.from_file(x)
    raise ValueError(f"{what}: expected a Volume or a file path, got {type(x).__name__}")


def _load_inputs(record_or_volumes: Any, seg: Optional[VolumeOrPath], patient_id: Optional[str]
                 ) -> tuple[str, dict[str, Volume], Optional[Volume]]:
    if isinstance(record_or_volumes, Mapping):
        pid = patient_id or "patient"
        vols = {m: _as_volume(v, f"{pid}/{m}") for m, v in record_or_volumes.items()}
    elif hasattr(record_or_volumes, "images") and hasattr(record_or_volumes, "patient_id"):
        rec = record_or_volumes
        pid = patient_id or rec.patient_id
        vols = {m: _as_volume(p, f"{pid}/{m}") for m, p in rec.images.items()}
        if seg is None:
            seg = getattr(rec, "seg", None)
    else:
        raise ValueError(f"preprocess_patient: expected a PatientRecord or a dict modality -> "
                         f"Volume/path, got {type(record_or_volumes).__name__}")
    if not vols:
        raise ValueError(f"patient {pid!r}: no image modality to preprocess")
    seg_vol = _as_volume(seg, f"{pid}/seg") if seg is not None else None
    return pid, vols, seg_vol


def validate_preprocessing_config(cfg: PreprocessingConfig) -> None:
    """Raise ``ValueError`` naming the key for values the pipeline cannot use."""
    def bad(key: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"preprocessing.{key} = {value!r}: {allowed}")

    if len(cfg.spacing) != 3 or min(cfg.spacing) <= 0:
        raise bad("spacing", cfg.spacing, "give three positive voxel sizes in mm")
    if len(cfg.target_shape) != 3 or min(cfg.target_shape) < 1:
        raise bad("target_shape", cfg.target_shape, "give three positive sizes")
    for key in ("mri_percentiles", "pet_percentiles"):
        p = getattr(cfg, key)
        if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
            raise bad(key, p, "give [low, high] with 0 <= low < high <= 100")
    if len(cfg.ct_window) != 2 or cfg.ct_window[0] >= cfg.ct_window[1]:
        raise bad("ct_window", cfg.ct_window, "give [low, high] HU with low < high")
    if cfg.crop_margin < 0:
        raise bad("crop_margin", cfg.crop_margin, "must be >= 0")
    if cfg.mask_spacing <= 0:
        raise bad("mask_spacing", cfg.mask_spacing, "must be > 0 mm")
    if not 0 <= cfg.min_overlap <= 1:
        raise bad("min_overlap", cfg.min_overlap, "must be in [0, 1]")


def config_params(cfg: PreprocessingConfig) -> dict[str, Any]:
    """The parameters that decide the output (for cache keys and ``info``)."""
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    # 2 and 2.0 are the same parameter (a YAML file gives floats, Python code may give ints).
    for k in ("spacing", "mri_percentiles", "pet_percentiles", "ct_window"):
        d[k] = [float(x) for x in d[k]]
    d["target_shape"] = [int(x) for x in d["target_shape"]]
    d["min_overlap"] = float(d["min_overlap"])
    d["mask_spacing"] = float(d["mask_spacing"])
    d["pipeline_version"] = PIPELINE_VERSION
    return d


def make_backend(cfg: PreprocessingConfig):
    """The segmentation backend named by ``cfg.mask_backend`` (None for ``"none"``)."""
    if cfg.mask_backend == "none":
        return None
    from .segmentation import get_backend

    try:
        if cfg.mask_backend == "totalsegmentator":
            return get_backend("totalsegmentator", fast=cfg.totalsegmentator_fast,
                               device=cfg.totalsegmentator_device)
        return get_backend(cfg.mask_backend)
    except ImportError as e:
        raise RuntimeError(f"preprocessing.mask_backend={cfg.mask_backend!r} cannot be used: {e}. "
                           "Install its optional extra (pip install 'clinfusediff[brain]' for "
                           "deepbet, '[totalseg]' for TotalSegmentator) or choose "
                           "'fallback'") from e


def _reference_modality(vols: Mapping[str, Volume], cfg: PreprocessingConfig) -> str:
    if cfg.mask_modality is not None and cfg.mask_modality in vols:
        return cfg.mask_modality
    from .segmentation import choose_modality

    name = "fallback" if cfg.mask_backend == "none" else cfg.mask_backend
    return choose_modality(vols, name)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
def preprocess_patient(
    record_or_volumes: Any,
    cfg: PreprocessingConfig,
    seg: Optional[VolumeOrPath] = None,
    *,
    backend: Any = None,
    patient_id: Optional[str] = None,
) -> PreprocessedPatient:
    """Preprocess one patient (module docstring: the steps).

    Args:
        record_or_volumes: a ``PatientRecord`` (``images``: modality -> file; ``seg``) or a
            ``dict`` modality -> ``Volume`` (or file path), e.g. from Slicer nodes.
        cfg: the preprocessing section of the config.
        seg: ground-truth labelmap (``Volume`` or path); default: ``record.seg``.
        backend: a segmentation backend object to reuse across patients; default: built from
            ``cfg.mask_backend``.
        patient_id: overrides ``record.patient_id`` (default ``"patient"`` for a dict).

    Returns:
        :class:`PreprocessedPatient` with images (D, H, W) = ``cfg.target_shape`` float32 in
        0..1, mask (D, H, W) uint8, seg (D, H, W) int16 or None, RAS affine (4, 4).

    Raises:
        ValueError: unreadable or non-finite input, modalities that do not overlap in space, a
            bad config value. FileNotFoundError: a missing input file.
    """
    validate_preprocessing_config(cfg)
    pid, vols, seg_vol = _load_inputs(record_or_volumes, seg, patient_id)
    families = {m: _family(m) for m in vols}

    # 1. Overlap in space (every pair, the labelmap included).
    check_overlap({**vols, **({"seg": seg_vol} if seg_vol is not None else {})}, cfg.min_overlap)
    ref = _reference_modality(vols, cfg)

    # 2-3. Brain mask of the reference modality, on its own grid or a coarser RAS one.
    images_sitk = {m: v.to_sitk() for m, v in vols.items()}
    mask_vol: Optional[Volume] = None
    mask_note = "none"
    mask_spacing: Optional[list[float]] = None
    if cfg.mask_backend != "none":
        if backend is None:
            backend = make_backend(cfg)
        grid = _mask_grid(vols[ref], cfg)
        work = vols[ref] if grid is None else Volume(
            _resample(vols[ref], grid[0], grid[1], "linear", float(vols[ref].array.min()),
                      image=images_sitk[ref]),
            grid[0], source=vols[ref].source)
        brain = backend.segment(work, ref).brain()  # (I, J, K) bool on the work grid
        mask_note = getattr(backend, "name", cfg.mask_backend)
        if not brain.any():
            raise ValueError(f"{vols[ref].source}: mask backend {mask_note!r} found no brain voxel "
                             f"in the {ref} image; check the image, or set "
                             "preprocessing.mask_modality / mask_backend (none = no mask)")
        mask_vol = Volume(brain.astype(np.float32), work.affine, source="brain mask")
        mask_spacing = [round(float(x), 4) for x in work.spacing]

    # 4. Output grid around the brain (or the reference field of view).
    if mask_vol is not None and cfg.crop_to_brain:
        box = mask_box(mask_vol.array > 0.5, mask_vol.affine)
    else:
        box = vols[ref].bounds_ras()
    out_affine, grid_info = _output_grid(box, cfg)
    out_shape = tuple(int(t) for t in cfg.target_shape)
    if mask_vol is not None:
        mask = (_resample(mask_vol, out_affine, out_shape, "nearest", 0.0) > 0.5).astype(np.uint8)
    else:
        mask = np.ones(out_shape, dtype=np.uint8)
    if not mask.any():  # only fit="crop" of a box larger than the target can lose it all
        raise ValueError(f"patient {pid!r}: the brain mask falls outside the output grid; use "
                         "preprocessing.fit=resize or a larger target_shape")
    inside = mask.astype(bool)

    # 5-6. Resample every modality once, then normalise.
    images: dict[str, np.ndarray] = {}
    norm: dict[str, list[float]] = {}
    coverage: dict[str, float] = {}
    for m, v in vols.items():
        # NaN outside this image's field of view: statistics use only voxels it really covers.
        arr = _resample(v, out_affine, out_shape, "linear", np.nan, image=images_sitk[m])
        valid = np.isfinite(arr)  # (D, H, W)
        coverage[m] = float(valid[inside].mean())
        if not valid.any():
            raise ValueError(f"{v.source}: the {m} image does not cover the output grid around the "
                             f"brain of {ref}; check that it belongs to patient {pid!r}")
        if families[m] == "ct":
            low, high = (float(x) for x in cfg.ct_window)
        else:
            pct = cfg.pet_percentiles if families[m] == "pet" else cfg.mri_percentiles
            region = inside & valid
            values = arr[region] if region.any() else arr[valid]
            low, high = (float(x) for x in np.percentile(values, pct))
        arr[~valid] = low  # -> 0 after normalisation
        if high - low <= 1e-6 * max(1.0, abs(high)):
            log.warning("%s: constant intensity inside the brain (%g); the %s image becomes zeros",
                        v.source, low, m)
            out = np.zeros(out_shape, dtype=np.float32)
        else:
            out = np.clip((arr - low) / (high - low), 0.0, 1.0).astype(np.float32)
        if cfg.skull_strip:
            out[~inside] = 0.0
        images[m] = out  # (D, H, W)
        norm[m] = [low, high]

    seg_out = None
    if seg_vol is not None:
        seg_out = np.rint(_resample(seg_vol, out_affine, out_shape, "nearest", 0.0))
        seg_out = seg_out.astype(np.int16)  # (D, H, W)

    inputs = {m: InputGrid(v.shape, v.affine.copy(), v.source) for m, v in vols.items()}
    if seg_vol is not None:
        inputs["seg"] = InputGrid(seg_vol.shape, seg_vol.affine.copy(), seg_vol.source)
    info = {"reference_modality": ref, "mask_backend": mask_note, "mask_grid_spacing": mask_spacing,
            "output_spacing": np.sqrt((out_affine[:3, :3] ** 2).sum(axis=0)).tolist(),
            "norm": norm, "brain_coverage": coverage, "params": config_params(cfg), **grid_info}
    return PreprocessedPatient(pid, images, mask, out_affine, inputs, seg_out, info)


__all__ = ["InputGrid", "PIPELINE_VERSION", "PreprocessedPatient", "config_params", "make_backend",
           "mask_box", "preprocess_patient", "validate_preprocessing_config"]
