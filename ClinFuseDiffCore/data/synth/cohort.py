"""Write a synthetic cohort to disk (generic or BraTS layout) — ``generate_cohort``.

Safety: the output folder must be empty, missing, or a cohort this generator wrote before
(recognised by ``cohort.json``); anything else is refused, so user data is never overwritten.
Each patient is written into a hidden temporary folder and renamed into place, so a killed run
never leaves half a patient; rerunning with the same settings reuses the finished patients.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...utils import _json_default, atomic_write_text, remove_stale_temps, safe_id, safe_join
from .params import (
    BRATS_NAMES,
    FEATURE_MODALITIES,
    IMAGE_NAMES,
    LABEL_COEFFICIENTS,
    LATENT_LOADING,
    SITE_SHIFTS,
    PatientParameters,
    sample_one,
    site_profiles,
)
from .render import BRAIN_LABELS, render_patient

GENERATOR = "clinfusediff synth"
FORMAT_VERSION = 1
MARKER = "cohort.json"
INFO_FILE = ".synth_info.json"  # per-patient measured values, hidden from discovery
CLINICAL_COLUMNS = ("patient_id", "age", "sex", "kps", "ldh", "crp", "hemoglobin")
OUTCOME_COLUMNS = ("patient_id", "label", "survival_months", "event")
BRATS_SUFFIX = {"mri_t1": "t1", "mri_t1ce": "t1ce", "mri_t2": "t2", "mri_flair": "flair"}


def _render_and_write(args: tuple) -> dict:
    """Render one patient and write its folder (a top-level function, so worker processes can run
    it). Returns the patient's measured info."""
    out, p, site, shape, seed, layout, present = args
    rendered = render_patient(p, site, shape, seed, present)
    _write_patient(Path(out), p, rendered, layout, present)
    return rendered.info


def patient_files(patient_id: str, layout: str, modalities: Sequence[str]) -> dict[str, str]:
    """File names (inside the patient folder) of each modality plus ``seg`` (and
    ``brain_labels`` in the generic layout)."""
    if layout == "brats":
        out = {m: f"{patient_id}_{BRATS_SUFFIX[m]}.nii.gz" for m in modalities}
        out["seg"] = f"{patient_id}_seg.nii.gz"
        return out
    out = {m: f"{m}.nii.gz" for m in modalities}
    out["seg"] = "seg.nii.gz"
    out["brain_labels"] = "brain_labels.nii.gz"
    return out


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A deterministic ``.nii.gz`` (gzip mtime 0) with qform = sform = ``affine`` (code 1)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if array.dtype == np.float32:
        img.header.set_slope_inter(1.0, 0.0)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _settings(shape, seed, layout, site_shift, missing_rate) -> dict:
    return {"shape": [int(s) for s in shape], "seed": int(seed), "layout": layout,
            "site_shift": site_shift, "missing_rate": float(missing_rate),
            "format_version": FORMAT_VERSION}


def _check_out_dir(out: Path) -> dict | None:
    """Return the previous cohort.json (or None for a new/empty folder); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    marker = out / MARKER
    if marker.is_file():
        try:
            prev = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{marker} is unreadable ({e}); give a new or empty folder") from e
        if prev.get("generator") == GENERATOR:
            return prev
    raise ValueError(
        f"--out {out} is not empty and holds no cohort written by '{GENERATOR}' (no {MARKER}); "
        "refusing to write into it. Give a new or empty folder.")


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _write_marker(out: Path, marker: dict) -> None:
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2, default=_json_default) + "\n")


def _remove_killed_runs_folders(out: Path) -> None:
    """``.tmp_<id>_<pid>`` / ``.old_<id>_<pid>`` folders of runs that were killed (their process is
    gone) in a folder this generator wrote: the next run removes them."""
    import re

    from ...utils import _pid_alive

    for d in out.glob(".*_*_*"):
        m = re.match(r"^\.(tmp|old)_.+_(\d+)$", d.name)
        if m and d.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(d, ignore_errors=True)


def _write_patient(out: Path, p: PatientParameters, rendered, layout: str,
                   modalities: Sequence[str]) -> Path:
    """Write one patient folder atomically (temp folder + rename); return the folder."""
    pid = safe_id(p.patient_id)
    final = safe_join(out, pid)
    tmp = safe_join(out, f".tmp_{pid}_{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        names = patient_files(pid, layout, modalities)
        arrays = dict(rendered.images)
        arrays["seg"] = rendered.seg
        if "brain_labels" in names:
            arrays["brain_labels"] = rendered.brain_labels
        for key, fname in names.items():
            (tmp / fname).write_bytes(_nifti_bytes(arrays[key], rendered.affine))
        (tmp / INFO_FILE).write_text(json.dumps(rendered.info, indent=1) + "\n", encoding="utf-8")
        if final.exists():
            old = safe_join(out, f".old_{pid}_{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def generate_cohort(out_dir: str | os.PathLike, n_patients: int,
                    shape: Sequence[int] = (96, 96, 64), seed: int = 0, layout: str = "generic",
                    site_shift: str = "none", missing_rate: float = 0.0, progress: bool = True,
                    callback: Callable[[int, int], None] | None = None, workers: int = 1) -> dict:
    """Generate (or complete) a synthetic multimodal brain-tumour cohort in ``out_dir``.

    Args:
        out_dir: a new or empty folder, or one this function wrote before.
        n_patients: number of patients (>= 1).
        shape: (I, J, K) grid of an isotropic scan (each >= 16); thick-slice scans keep the
            field of view with fewer slices along k.
        seed: cohort seed; the same settings give the same files byte for byte.
        layout: ``generic`` (6 images + seg + brain_labels per patient) or ``brats`` (4 MRI + seg).
        site_shift: ``none``, ``mild``, ``strong`` or ``severe`` scanner differences between sites.
        missing_rate: probability that each image modality file is absent (>= 1 is kept).
        progress: show a tqdm progress bar on stderr.
        callback: optional ``callback(done, total)`` after each patient (GUI progress).
        workers: processes rendering patients in parallel (``spawn``); 1 = in this process.
            Every patient is rendered from its own parameters, so the files are the same byte
            for byte whatever the number of workers.

    Returns:
        Summary dict: ``root``, ``layout``, ``n_patients``, ``generated``, ``reused``,
        ``patient_dirs``, ``files`` (CSV/JSON paths), ``label_counts``, ``events``,
        ``missing_files``, ``seconds``, ``seconds_per_patient``.
    """
    t0 = time.perf_counter()
    n = int(n_patients)
    if n < 1:
        raise ValueError(f"--patients {n_patients!r} must be >= 1")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16 or max(shape) > 512:
        raise ValueError(f"--shape {list(shape)} must be three sizes between 16 and 512")
    if layout not in ("generic", "brats"):
        raise ValueError(f"--layout {layout!r} not in ['generic', 'brats']")
    if site_shift not in SITE_SHIFTS:
        raise ValueError(f"--site-shift {site_shift!r} not in {list(SITE_SHIFTS)}")
    if not 0.0 <= float(missing_rate) < 1.0:
        raise ValueError(f"--missing-rate {missing_rate!r} must lie in [0, 1)")
    out = Path(out_dir)
    remove_stale_temps(out)  # a run killed while writing cohort.json leaves only its temp file
    prev = _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if prev is not None:
        _remove_killed_runs_folders(out)
    settings = _settings(shape, seed, layout, site_shift, missing_rate)
    same = prev is not None and prev.get("settings") == settings
    prev_ids = set(prev.get("patient_ids", [])) if prev else set()
    mods = IMAGE_NAMES if layout == "generic" else BRATS_NAMES
    sites = {s.name: s for s in site_profiles(site_shift, seed)}  # type: ignore[arg-type]
    params = [sample_one(i, seed, layout, site_shift, missing_rate) for i in range(n)]  # type: ignore[arg-type]
    # Mark the folder as ours before writing any patient (a killed run can be resumed, and a
    # later run knows every folder this one may have written).
    marker = {"generator": GENERATOR, "complete": False, "settings": settings,
              "patient_ids": sorted(prev_ids | {p.patient_id for p in params})}
    _write_marker(out, marker)
    rows, dirs = [], []
    generated = reused = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="synth", unit="patient")
    jobs = []  # (index, params, present) of the patients to render
    infos: dict[int, dict] = {}
    for i, p in enumerate(params):
        present = [m for m in mods if m not in p.missing]
        folder = safe_join(out, safe_id(p.patient_id))
        info_file = folder / INFO_FILE
        expected = set(patient_files(p.patient_id, layout, present).values())
        if same and info_file.is_file() and expected <= {f.name for f in folder.iterdir()}:
            infos[i] = json.loads(info_file.read_text(encoding="utf-8"))
            reused += 1
        else:
            jobs.append((i, p, present))

    def done_one() -> None:
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(len(infos), n)

    try:
        if reused:
            if bar is not None:
                bar.update(reused)
            if callback is not None:
                callback(len(infos), n)
        args = [(str(out), p, sites[p.site], shape, seed, layout, tuple(present)) for _, p, present in jobs]
        if int(workers) <= 1 or len(jobs) <= 1:
            for (i, _, _), a in zip(jobs, args):
                infos[i] = _render_and_write(a)
                generated += 1
                done_one()
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("spawn")) as ex:
                for (i, _, _), info in zip(jobs, ex.map(_render_and_write, args, chunksize=4)):
                    infos[i] = info
                    generated += 1
                    done_one()
    finally:
        if bar is not None:
            bar.close()
    for i, p in enumerate(params):
        folder = safe_join(out, safe_id(p.patient_id))
        dirs.append(folder)
        row = p.row()
        row.update(infos[i])
        row["folder"] = folder.name
        rows.append(row)

    # Folders of a previous run of this generator that are not part of this cohort.
    new_ids = {p.patient_id for p in params}
    for old in sorted(prev_ids - new_ids):
        d = safe_join(out, safe_id(old))
        if d.is_dir():
            shutil.rmtree(d)

    clinical = out / "clinical_data.csv"
    outcomes = out / "outcomes.csv"
    manifest = out / "manifest.csv"
    _write_csv(clinical, CLINICAL_COLUMNS, rows)
    _write_csv(outcomes, OUTCOME_COLUMNS, rows)
    manifest_cols = ["patient_id", "folder"] + [k for k in rows[0] if k not in ("patient_id", "folder")]
    _write_csv(manifest, manifest_cols, rows)
    marker.update({
        "complete": True, "patient_ids": sorted(new_ids), "n_patients": n,
        "image_modalities": list(mods), "feature_modalities": FEATURE_MODALITIES,
        "latent_loading": LATENT_LOADING, "label_coefficients": LABEL_COEFFICIENTS,
        "brain_labels": {str(k): v for k, v in BRAIN_LABELS.items()},
        "seg_labels": {"0": "background", "1": "necrotic / non-enhancing core",
                       "2": "oedema", "4": "enhancing rim"},
        "sites": {k: v.as_dict() for k, v in sites.items()},
        "documentation": "docs/COHORT.md",
    })
    _write_marker(out, marker)
    seconds = time.perf_counter() - t0
    labels = [int(r["label"]) for r in rows]
    return {
        "root": str(out), "layout": layout, "n_patients": n, "generated": generated,
        "reused": reused, "patient_dirs": [str(d) for d in dirs],
        "files": {"clinical": str(clinical), "outcomes": str(outcomes), "manifest": str(manifest),
                  "cohort": str(out / MARKER)},
        "label_counts": {"0": labels.count(0), "1": labels.count(1)},
        "events": int(sum(int(r["event"]) for r in rows)),
        "missing_files": int(sum(len(p.missing) for p in params)),
        "seconds": round(seconds, 3), "seconds_per_patient": round(seconds / n, 4),
    }
