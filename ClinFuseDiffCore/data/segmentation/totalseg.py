"""TotalSegmentator backend: ``total_mr`` brain for MRI, ``total`` brain + skull for CT, and the
licensed ``brain_structures`` (16 CT brain parts) where the user has a licence.

Install with the ``[totalseg]`` extra (``scripts/install.sh totalseg``: TotalSegmentator 2.18.0 and
a torchvision matching the installed torch). Weights are NOT in the package:
``totalseg_download_weights -t TASK`` fetches them (online) into ``$TOTALSEG_HOME_DIR``
(default ``~/.totalsegmentator``), ``totalseg_import_weights -i ZIP`` imports a zip offline.

How it runs, and why:

* **Fails fast offline.** Before anything starts, the weights folder of every nnU-Net model the
  task needs is checked; a missing one raises ``FileNotFoundError`` naming the folder and the
  commands above (TotalSegmentator itself would try a download and fail after a network timeout).
  ``allow_download=True`` lets TotalSegmentator download instead.
* **In a subprocess by default** (``python -m ClinFuseDiffCore.data.segmentation.totalseg``).
  nnU-Net starts worker processes with the ``spawn`` method, which re-imports the caller's
  ``__main__``: in-process use is only safe from a script guarded by
  ``if __name__ == "__main__":``. The subprocess has its own guarded ``__main__``, so callers
  (notebooks, the Slicer module, DataLoader workers) need no guard; it also keeps TotalSegmentator's
  ``os.environ`` edits, thread settings and ``sys.exit`` out of the caller's process.
  ``subprocess=False`` runs in-process (a few seconds less start-up) for guarded scripts.
* **Usage statistics off**: TotalSegmentator's own config (``$TOTALSEG_HOME_DIR/config.json``) gets
  ``send_usage_stats: false`` before each run.
* **CPU torch**: PyPI's torchvision may not load beside a CPU-only torch ("operator
  torchvision::nms does not exist"), and nnU-Net's trainer lookup imports every trainer module,
  one of which imports timm -> torchvision. The trainer classes the brain tasks use are registered
  in TotalSegmentator's trainer table first, so that walk never happens.
* **Licence**: a licensed task without a licence makes TotalSegmentator print a notice and call
  ``sys.exit(1)``; that ``SystemExit`` is caught and turned into a ``PermissionError`` that says how
  to get and set a licence (``license_number=`` option or ``totalseg_set_license -l KEY``).

The input ``Volume`` is written to a private temporary folder (never next to the user's files);
the result is mapped back onto the input grid by TotalSegmentator and checked against it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess as sp
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ClinFuseDiffCore.data.segmentation import BRAIN, SKULL, Labelmap, modality_family
from ClinFuseDiffCore.data.volume import Volume

log = logging.getLogger(__name__)

TASKS = ("total", "total_mr", "brain_structures")
#: TotalSegmentator label id -> (our id, our name), per task. ``brain_structures`` keeps its ids.
_LABELS: dict[str, dict[int, tuple[int, str]]] = {
    "total": {90: (BRAIN, "brain"), 91: (SKULL, "skull")},
    "total_mr": {50: (BRAIN, "brain")},
}
#: The nnU-Net trainers the supported tasks use (looked up by name inside nnU-Net).
_TRAINERS = {
    "nnUNetTrainer": "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnUNetTrainerNoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring",
    "nnUNetTrainer_2000epochs_NoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainer_4000epochs_NoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainer_DASegOrd0":
        "nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDAOrd0",
}
_INSTALL_HINT = ("install it with `pip install \"clinfusediff[totalseg]\"` (or scripts/install.sh "
                 "totalseg), or set preprocessing.mask_backend to 'fallback' or 'deepbet'")


def _require_totalsegmentator() -> None:
    try:
        import totalsegmentator  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the 'totalsegmentator' backend needs TotalSegmentator ({e}); "
                          f"{_INSTALL_HINT}") from e


def download_task_name(task: str, fast: bool) -> str:
    """The ``totalseg_download_weights -t`` name that fetches the weights of ``task``."""
    if fast and task == "total_mr":
        return "total_fast_mr"
    if fast and task in ("total", "total_v3"):
        return f"{task}_fast"
    return task


def required_weights(task: str, fast: bool) -> list[Path]:
    """Folders of the nnU-Net models ``totalsegmentator(task=task, fast=fast)`` loads.

    Reads ``TOTALSEG_WEIGHTS_PATH`` / ``TOTALSEG_HOME_DIR`` through TotalSegmentator's own
    ``get_weights_dir``; creates nothing.

    Returns:
        One path per model (task models, then the cropping model where the task crops).
    """
    _require_totalsegmentator()
    from totalsegmentator.config import get_weights_dir
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    if task not in TASK_CONFIGS:
        raise ValueError(f"unknown TotalSegmentator task {task!r}; this backend supports {TASKS}")
    raw = TASK_CONFIGS[task]
    if "sub_modes" in raw:
        cfg = raw["sub_modes"]["fast" if fast and "fast" in raw["sub_modes"] else "default"]
    else:
        if fast and raw.get("disallow_fast"):
            raise ValueError(f"TotalSegmentator task {task!r} has no fast mode; set fast=False "
                             "(preprocessing.totalsegmentator_fast: false)")
        cfg = raw
    ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    if cfg.get("crop") is not None and cfg.get("crop_model") is None:  # rough cropping model
        ids = ids + [852 if task.endswith("_mr") else 298]
    out = []
    for tid in ids:
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        folder = Path(info["foldername"])
        if info.get("rel_path") is not None:
            folder = Path(info["rel_path"]) / folder
        out.append(Path(get_weights_dir()) / folder)
    return out


def check_weights(task: str, fast: bool) -> None:
    """Raise at once when a model of ``task`` is not on disk (instead of a download attempt).

    Raises:
        FileNotFoundError: naming the missing folders, ``totalseg_download_weights -t TASK``,
            ``totalseg_import_weights -i ZIP`` and ``TOTALSEG_HOME_DIR``.
    """
    missing = [p for p in required_weights(task, fast) if not p.is_dir()]
    if missing:
        # brain_structures crops with the 6 mm 'total' model, which comes with 'total_fast'
        extra = (" and `totalseg_download_weights -t total_fast` (its cropping model)"
                 if task == "brain_structures" else "")
        raise FileNotFoundError(
            f"TotalSegmentator weights for task {task!r} (fast={fast}) are not installed; missing: "
            f"{', '.join(str(p) for p in missing)}. On a machine with internet run "
            f"`totalseg_download_weights -t {download_task_name(task, fast)}`{extra}; offline, "
            "import a downloaded weights zip with `totalseg_import_weights -i ZIP`, or copy a "
            "weights folder here and point the environment variable TOTALSEG_HOME_DIR at it "
            "(weights live in $TOTALSEG_HOME_DIR/nnunet/results, default ~/.totalsegmentator). "
            "Or pass allow_download=True to let TotalSegmentator download them now.")


def _disable_usage_stats() -> None:
    from totalsegmentator.config import set_config_key, setup_totalseg

    setup_totalseg()  # creates $TOTALSEG_HOME_DIR/config.json if absent (with stats on)
    set_config_key("send_usage_stats", False)
    set_config_key("statistics_disclaimer_shown", True)


def _register_trainers() -> None:
    """Put the trainer classes into TotalSegmentator's lookup table, so nnU-Net never walks (and
    imports) all its trainer modules — one of them imports torchvision through timm."""
    import importlib

    import totalsegmentator.nnunet as ts_nnunet

    for name, module in _TRAINERS.items():
        ts_nnunet.custom_trainers.setdefault(name, getattr(importlib.import_module(module), name))


def run_totalsegmentator(image, task: str, fast: bool = True, device: str = "cpu",
                         license_number: str | None = None, quiet: bool = True):
    """Call TotalSegmentator's Python API in THIS process (see the module docstring on spawn).

    Args:
        image: ``nibabel.Nifti1Image`` or a NIfTI path.
        task: ``"total"``, ``"total_mr"`` or ``"brain_structures"``.
        fast: the 3 mm models (``total``/``total_mr`` only).
        device: ``"cpu"`` or ``"gpu"``.
        license_number: TotalSegmentator licence key for licensed tasks.

    Returns:
        The multilabel ``Nifti1Image`` on the input grid (TotalSegmentator's label ids).

    Raises:
        PermissionError: a licensed task without a valid licence (TotalSegmentator's sys.exit).
    """
    _require_totalsegmentator()
    _disable_usage_stats()
    _register_trainers()
    from totalsegmentator.python_api import totalsegmentator

    try:
        return totalsegmentator(image, None, ml=True, fast=fast, task=task, device=device,
                                quiet=quiet, nr_thr_resamp=1, nr_thr_saving=1,
                                license_number=license_number)
    except SystemExit as e:
        raise PermissionError(
            f"TotalSegmentator refused task {task!r} (exit code {e.code}): it needs a licence "
            "(free for non-commercial use: https://backend.totalsegmentator.com/license-academic/). "
            "Set it once with `totalseg_set_license -l KEY` or pass license_number=KEY; or use the "
            "task 'total' (CT) / 'total_mr' (MRI), which need none") from None


@dataclass
class TotalSegmentatorBackend:
    """Args:
        task: ``None`` = ``total`` for CT and ``total_mr`` for MRI; or ``"brain_structures"`` (CT,
            licensed; labels are its 16 brain parts).
        fast: 3 mm models (much faster on CPU; ``brain_structures`` has none).
        device: ``"cpu"`` or ``"gpu"``.
        subprocess: run in a fresh Python process (safe without a ``__main__`` guard). With
            ``False`` it runs in the caller's process, whose script MUST be guarded by
            ``if __name__ == "__main__":`` (nnU-Net's spawn workers re-import ``__main__``).
        allow_download: let TotalSegmentator download missing weights instead of failing fast.
        license_number: licence key for licensed tasks.
        timeout_s: limit of one subprocess run.
    """

    task: Literal["total", "total_mr", "brain_structures"] | None = None
    fast: bool = True
    device: Literal["cpu", "gpu"] = "cpu"
    subprocess: bool = True
    allow_download: bool = False
    license_number: str | None = None
    timeout_s: float = 3600.0
    name: str = "totalsegmentator"

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"TotalSegmentator task {self.task!r}; choose one of {TASKS} or None")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"TotalSegmentator device {self.device!r}; choose 'cpu' or 'gpu'")
        if self.task == "brain_structures" and self.fast:
            self.fast = False  # it has only the full-resolution model
        _require_totalsegmentator()

    def task_for(self, modality: str) -> str:
        family = modality_family(modality)
        if family == "pet":
            raise ValueError("TotalSegmentator has no PET brain model; use the 'fallback' backend "
                             "for PET or compute the mask from a CT/MRI of the patient")
        task = self.task or ("total" if family == "ct" else "total_mr")
        if (task == "total_mr" and family == "ct") or (task != "total_mr" and family == "mri"):
            raise ValueError(f"TotalSegmentator task {task!r} does not fit modality {modality!r}: "
                             "use 'total' or 'brain_structures' for CT and 'total_mr' for MRI")
        return task

    def segment(self, volume: Volume, modality: str) -> Labelmap:
        """Brain labelmap (CT ``total``: brain and skull) on ``volume``'s grid.

        Args:
            volume: (I, J, K) CT in HU or MRI.
            modality: ``ct`` or an MRI name.

        Returns:
            ``Labelmap``: 1 ``brain`` (+ 2 ``skull`` for CT ``total``), or the 16 named
            ``brain_structures`` ids; same shape and affine as ``volume``.

        Raises:
            FileNotFoundError: weights missing (offline). PermissionError: licence missing.
            RuntimeError: TotalSegmentator failed (its output is in the message).
        """
        task = self.task_for(modality)
        if not np.all(np.isfinite(volume.array)):
            raise ValueError(f"{volume.source}: NaN/Inf voxels; fix the volume before segmenting it")
        if task == "brain_structures" and not self.license_number:
            from totalsegmentator.config import has_valid_license_offline

            status, _ = has_valid_license_offline()
            if status != "yes":
                raise PermissionError(
                    "TotalSegmentator task 'brain_structures' needs a licence (free for "
                    "non-commercial use: https://backend.totalsegmentator.com/license-academic/); "
                    "set it with `totalseg_set_license -l KEY` or pass license_number=KEY")
        if not self.allow_download:
            check_weights(task, self.fast)
        with tempfile.TemporaryDirectory(prefix="clinfusediff_totalseg_") as tmp:
            if self.subprocess:
                seg = self._run_subprocess(volume, task, Path(tmp))
            else:
                seg = run_totalsegmentator(volume.to_nifti(), task, self.fast, self.device,
                                           self.license_number)
            ts_labels = np.rint(np.asarray(seg.dataobj)).astype(np.int32)
            seg_affine = np.asarray(seg.affine)
        if ts_labels.shape != volume.shape or not np.allclose(seg_affine, volume.affine, atol=1e-3):
            raise RuntimeError(f"TotalSegmentator returned a labelmap of shape {ts_labels.shape} "
                               f"for an input of shape {volume.shape} (affines equal: "
                               f"{np.allclose(seg_affine, volume.affine, atol=1e-3)})")
        return self._to_labelmap(ts_labels, task, volume)

    def _run_subprocess(self, volume: Volume, task: str, tmp: Path):
        import nibabel as nib

        src, dst = tmp / "input.nii.gz", tmp / "labels.nii.gz"
        nib.save(volume.to_nifti(), str(src))
        cmd = [sys.executable, "-m", __name__, "--input", str(src), "--output", str(dst),
               "--task", task, "--device", self.device] + (["--fast"] if self.fast else [])
        if self.license_number:
            cmd += ["--license-number", self.license_number]
        # the child must import this package even when the caller found it through its cwd
        root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        try:
            res = sp.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env,
                         check=False)
        except sp.TimeoutExpired as e:
            raise RuntimeError(f"TotalSegmentator ({task}) on {volume.source} took longer than "
                               f"{self.timeout_s:.0f} s; raise timeout_s or use fast=True") from e
        if res.returncode == _EXIT_LICENCE:
            raise PermissionError(res.stderr.strip().splitlines()[-1])
        if res.returncode != 0 or not dst.exists():
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-25:])
            raise RuntimeError(f"TotalSegmentator ({task}) failed on {volume.source} with exit "
                               f"code {res.returncode}:\n{tail}")
        img = nib.load(str(dst))
        return nib.Nifti1Image(np.asarray(img.dataobj), img.affine)  # read before tmp goes

    def _to_labelmap(self, ts_labels: np.ndarray, task: str, volume: Volume) -> Labelmap:
        out = np.zeros(ts_labels.shape, dtype=np.float32)
        if task == "brain_structures":
            from totalsegmentator.map_to_binary import class_map

            labels = dict(class_map["brain_structures"])
            keep = np.isin(ts_labels, list(labels))
            out[keep] = ts_labels[keep]
        else:
            labels = {}
            for ts_id, (our_id, name) in _LABELS[task].items():
                out[ts_labels == ts_id] = our_id
                labels[our_id] = name
        return Labelmap(Volume(out, volume.affine.copy(),
                               source=f"TotalSegmentator {task} of {volume.source}"), labels)


_EXIT_LICENCE = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Subprocess entry: segment one NIfTI file, write the multilabel NIfTI. Exit code 3 = licence."""
    p = argparse.ArgumentParser(description="Run TotalSegmentator on one NIfTI (ClinFuseDiff worker)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--fast", action="store_true")
    p.add_argument("--license-number", default=None)
    a = p.parse_args(argv)
    import nibabel as nib

    try:
        seg = run_totalsegmentator(nib.load(a.input), a.task, a.fast, a.device, a.license_number)
    except PermissionError as e:
        print(str(e), file=sys.stderr)
        return _EXIT_LICENCE
    nib.save(seg, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
