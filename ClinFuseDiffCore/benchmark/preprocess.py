"""Benchmark of the preprocessing pipeline and its cache (prints measured figures; not a test).

Figures (medians over repeats, on this machine):

1. Per volume: ``preprocess_patient`` time / number of volumes, against a plain SimpleITK
   pipeline on the same files (read, resample onto an RAS grid at the target spacing with the
   target shape, percentile-normalise over the whole volume). Two variants of ours:
   ``mask_backend="none"`` (the same work: geometry + normalisation) and the configured mask
   backend (adds the brain mask, computed once per patient).
2. Cache: ``PreprocessCache.load_or_build`` on a hit (hash the input files + read and verify the
   entry) against building from the raw files, and against only reading the raw files.
3. A geometry check on the generated cohort (``geometry_check``): canonical RAS, target shape,
   and agreement with an independent nibabel/scipy resampling onto the stored affine.

Usage::

    python training/benchmark_preprocess.py            # demo-sized cohort + a BraTS-sized case
    python training/benchmark_preprocess.py --quick    # small, for CI smoke runs
    python -m ClinFuseDiffCore.benchmark.preprocess    # the same

``run(quick)`` returns the figures as a dict; ``bench_preprocess(quick)`` turns its first case
into row 5 of ``clinfusediff benchmark``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import PreprocessingConfig, load_config
from ..data.cache import PreprocessCache
from ..data.discovery import PatientRecord, discover_patients
from ..data.preprocess import make_backend, preprocess_patient


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_sitk(path: Path, spacing, shape, percentiles=(0.5, 99.5)) -> np.ndarray:
    """The baseline: read, resample to an RAS grid at ``spacing`` x ``shape`` centred on the
    image, normalise with whole-volume percentiles. (I, J, K) float32."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    size = np.array(img.GetSize())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    spacing = np.asarray(spacing, float)
    shape = np.asarray(shape)
    direction = np.diag([-1.0, -1.0, 1.0])  # RAS axes in ITK's LPS world
    origin = centre - direction @ ((shape - 1) / 2.0 * spacing)
    out = sitk.Resample(img, shape.tolist(), sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                        spacing.tolist(), direction.flatten().tolist(), 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    lo, hi = np.percentile(arr, percentiles)
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def _bench_records(label: str, records: list[PatientRecord], cfg: PreprocessingConfig,
                   cache_root: Path, repeats: int) -> dict[str, Any]:
    from dataclasses import replace

    backend = make_backend(cfg)
    cfg_none = replace(cfg, mask_backend="none")
    n_vol = sum(len(r.images) for r in records)
    for r in records[:1]:  # warm-up: imports, first SimpleITK call
        preprocess_patient(r, cfg, backend=backend)
    t_plain = sum(_median_time(lambda p=p: plain_sitk(p, cfg.spacing, cfg.target_shape), repeats)
                  for r in records for p in r.images.values())
    t_none = sum(_median_time(lambda r=r: preprocess_patient(r, cfg_none), repeats)
                 for r in records)
    t_full = sum(_median_time(lambda r=r: preprocess_patient(r, cfg, backend=backend), repeats)
                 for r in records)

    from ..data.volume import Volume

    t_read = sum(_median_time(lambda r=r: [Volume.from_file(p) for p in r.images.values()], repeats)
                 for r in records)
    cache = PreprocessCache(cache_root)
    for r in records:
        cache.load_or_build(r, cfg, backend=backend)
    t_hit = sum(_median_time(lambda r=r: cache.load_or_build(r, cfg, backend=backend), repeats)
                for r in records)
    assert cache.stats["hit"] == repeats * len(records), cache.stats
    shapes = sorted({tuple(Volume.from_file(p).shape) for r in records for p in r.images.values()})
    return {
        "case": label, "patients": len(records), "volumes": n_vol, "input_shapes": shapes,
        "spacing": list(cfg.spacing), "target_shape": list(cfg.target_shape),
        "mask_backend": cfg.mask_backend,
        "ms_per_volume": {
            "plain_sitk": 1000 * t_plain / n_vol,
            "ours_no_mask": 1000 * t_none / n_vol,
            "ours_with_mask": 1000 * t_full / n_vol,
            "read_raw": 1000 * t_read / n_vol,
            "cache_hit": 1000 * t_hit / n_vol,
        },
        "ratios": {
            "ours_no_mask / plain_sitk": t_none / t_plain,
            "ours_with_mask / plain_sitk": t_full / t_plain,
            "cache_hit / build_from_raw": t_hit / t_full,
            "cache_hit / read_raw_only": t_hit / t_read,
        },
    }


def geometry_check(records: list[PatientRecord], cfg: PreprocessingConfig) -> dict[str, Any]:
    """Independent check of the output geometry on real cohort files: nibabel/scipy resampling
    (not SimpleITK) of each raw file onto the stored output affine must give our image (after
    the stored normalisation) and our labelmap.

    Returns:
        ``{"patients", "all_ras", "all_target_shape", "seg_dice_min", "image_agree_min"}`` where
        ``image_agree`` is the fraction of voxels within 0.02 of the independent resampling.
    """
    import nibabel as nib
    from nibabel.processing import resample_from_to

    dices, agree, ras, shape_ok = [], [], [], []
    for r in records:
        p = preprocess_patient(r, cfg)
        ras.append(nib.aff2axcodes(p.affine) == ("R", "A", "S")
                   and np.allclose(p.affine[:3, :3], np.diag(p.spacing)))
        shape_ok.append(all(a.shape == tuple(cfg.target_shape) for a in p.images.values()))
        for m, path in r.images.items():
            src = nib.load(path)  # as float: an int16 output would turn the NaN fill into 0
            src = nib.Nifti1Image(np.asarray(src.dataobj, np.float32), src.affine)
            ref = resample_from_to(src, (p.shape, p.affine), order=1, cval=np.nan)
            lo, hi = p.info["norm"][m]
            expect = np.clip((np.asarray(ref.dataobj, float) - lo) / (hi - lo), 0, 1)
            ok = np.isfinite(expect)
            agree.append(float(np.mean(np.abs(expect[ok] - p.images[m][ok]) < 0.02)))
        if r.seg is not None:
            seg = resample_from_to(nib.load(r.seg), (p.shape, p.affine), order=0)
            seg = np.asarray(seg.dataobj)
            a, b = seg > 0, p.seg > 0
            dices.append(float(2 * (a & b).sum() / max(1, a.sum() + b.sum())))
    return {"patients": len(records), "all_ras": all(ras), "all_target_shape": all(shape_ok),
            "seg_dice_min": min(dices) if dices else None,
            "image_agree_min": min(agree) if agree else None}


def _brats_sized_case(folder: Path, source: PatientRecord) -> PatientRecord:
    """One patient at BraTS size (240x240x155, 1 mm): the source's MRI resampled up with
    SimpleITK (the anatomy is the synthetic one; only the grid size matters here)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for m in ("mri_t1", "mri_t1ce", "mri_t2", "mri_flair"):
        if m not in source.images:
            continue
        img = sitk.ReadImage(str(source.images[m]), sitk.sitkFloat32)
        size = np.array(img.GetSize()) * np.array(img.GetSpacing())
        centre = np.array(img.TransformContinuousIndexToPhysicalPoint(
            ((np.array(img.GetSize()) - 1) / 2.0).tolist()))
        shape = np.array([240, 240, 155])
        sp = np.array([1.0, 1.0, 1.0]) * max(1.0, float(np.max(size / shape)))
        d = np.array(img.GetDirection()).reshape(3, 3)
        origin = centre - d @ ((shape - 1) / 2.0 * sp)
        out = sitk.Resample(img, shape.tolist(), sitk.Transform(), sitk.sitkLinear,
                            origin.tolist(), sp.tolist(), d.flatten().tolist(), 0.0)
        images[m] = folder / f"{m}.nii.gz"
        sitk.WriteImage(out, str(images[m]))
    return PatientRecord(folder.name, images, None, folder)


def run(quick: bool = False) -> dict[str, Any]:
    """Measure and return the figures (module docstring).

    Args:
        quick: 3 small patients, 2 repeats, no BraTS-sized case.

    Returns:
        ``{"cases": [per-case dict with ms_per_volume and ratios], "geometry":
        geometry_check(...) on the demo cohort, "quick": bool}``.
    """
    from ..data.synth.cohort import generate_cohort

    cfg_all = load_config("demo")
    results = []
    with tempfile.TemporaryDirectory(prefix="cfd_bench_") as tmp:
        tmp = Path(tmp)
        n = 3 if quick else 8
        generate_cohort(tmp / "cohort", n, shape=cfg_all.data.synth_shape, seed=0,
                        site_shift="mild", missing_rate=0.0, progress=False)
        records, _ = discover_patients(tmp / "cohort", "auto", cfg_all.data.modalities)
        repeats = 2 if quick else 3
        results.append(_bench_records("demo cohort (demo.yaml preprocessing)", records,
                                      cfg_all.preprocessing, tmp / "cache_demo", repeats))
        geometry = geometry_check(records, cfg_all.preprocessing)
        if not quick:
            big = _brats_sized_case(tmp / "brats_sized" / "B001", records[0])
            cfg = PreprocessingConfig()  # defaults: 1 mm, 128^3
            results.append(_bench_records("BraTS-sized 240x240x155 @1 mm (default preprocessing)",
                                          [big], cfg, tmp / "cache_big", 3))
    return {"quick": quick, "cases": results, "geometry": geometry}


def bench_preprocess(quick: bool) -> dict[str, Any]:
    """Row 5 of the benchmark from ``run(quick)`` (its first case: the demo cohort)."""
    res = run(quick)
    r = res["cases"][0]["ratios"]
    return {"preprocess_vs_sitk": r["ours_with_mask / plain_sitk"],
            "preprocess_no_mask_vs_sitk": r["ours_no_mask / plain_sitk"],
            "cache_vs_raw": 1.0 / r["cache_hit / build_from_raw"], "details": res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small and fast (CI smoke run)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    out = run(args.quick)
    for case in out["cases"]:
        print(f"\n{case['case']}: {case['patients']} patients, {case['volumes']} volumes, "
              f"inputs {case['input_shapes'][:3]}{'...' if len(case['input_shapes']) > 3 else ''}"
              f" -> {case['target_shape']} @ {case['spacing']} mm, mask {case['mask_backend']}")
        for k, v in case["ms_per_volume"].items():
            print(f"  {k:<28s} {v:8.1f} ms/volume")
        for k, v in case["ratios"].items():
            print(f"  {k:<28s} {v:8.2f}x")
    g = out["geometry"]
    print(f"\ngeometry check ({g['patients']} patients, independent nibabel resampling): "
          f"canonical RAS {g['all_ras']}, target shape {g['all_target_shape']}, "
          f"seg Dice min {g['seg_dice_min']:.4f}, "
          f"image voxels within 0.02 min {g['image_agree_min']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
