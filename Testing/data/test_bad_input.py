"""Bad input: every case is a clear error or a logged skip naming the file and the reason, and
input files are never modified."""

from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ClinFuseDiffCore.config import DataConfig
from ClinFuseDiffCore.data.discovery import discover_patients, load_cohort
from ClinFuseDiffCore.data.tabular import TabularTable, read_outcomes
from ClinFuseDiffCore.data.volume import Volume, check_overlap


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def unchanged(tmp_path):
    """Yields a folder; after the test every file that existed before the check is byte-identical
    and no file was added."""
    state = {}

    def snapshot():
        state["before"] = _hashes(tmp_path)

    yield tmp_path, snapshot
    assert "before" in state, "test forgot to snapshot its inputs"
    assert _hashes(tmp_path) == state["before"]


def _nii(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_truncated_or_corrupt_images(unchanged):
    tmp, snapshot = unchanged
    good = _nii(tmp / "good.nii.gz", np.random.default_rng(0).random((12, 12, 12)).astype(np.float32))
    raw = good.read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp / "garbage.nii").write_bytes(b"not a nifti file at all" * 20)
    (tmp / "gzip_of_garbage.nii.gz").write_bytes(gzip.compress(b"\x00" * 100))
    sitk.WriteImage(sitk.Image(10, 10, 10, sitk.sitkFloat32), str(tmp / "ok.nrrd"))
    nrrd = (tmp / "ok.nrrd").read_bytes()
    (tmp / "truncated.nrrd").write_bytes(nrrd[: len(nrrd) - 500])
    snapshot()
    for name in ["truncated.nii.gz", "garbage.nii", "gzip_of_garbage.nii.gz"]:
        with pytest.raises(ValueError, match=rf"{name}: cannot read as NIfTI .*corrupt or truncated"):
            Volume.from_file(tmp / name)
        with pytest.raises(ValueError, match=rf"{name}: cannot read with SimpleITK"):
            Volume.from_sitk(tmp / name)
    with pytest.raises(ValueError, match=r"truncated.nrrd: cannot read with SimpleITK"):
        Volume.from_file(tmp / "truncated.nrrd")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz: no such file"):
        Volume.from_file(tmp / "missing.nii.gz")
    with pytest.raises(ValueError, match="no DICOM series"):
        (tmp / "emptydir").mkdir()
        try:
            Volume.from_file(tmp / "emptydir")
        finally:
            (tmp / "emptydir").rmdir()


def test_not_3d(unchanged):
    tmp, snapshot = unchanged
    _nii(tmp / "four.nii.gz", np.zeros((5, 6, 7, 3), np.float32))
    _nii(tmp / "two.nii.gz", np.zeros((5, 6), np.float32))
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkFloat32), str(tmp / "two.nrrd"))
    snapshot()
    for name in ["four.nii.gz", "two.nii.gz"]:
        with pytest.raises(ValueError, match=rf"{name}: expected a 3-D volume"):
            Volume.from_nifti(tmp / name)
        with pytest.raises(ValueError, match=rf"{name}: expected a 3-D volume"):
            Volume.from_sitk(tmp / name)
    with pytest.raises(ValueError, match=r"two.nrrd: expected a 3-D volume, got 2-D"):
        Volume.from_file(tmp / "two.nrrd")
    with pytest.raises(ValueError, match="slicer-node: expected a 3-D KJI array"):
        Volume.from_slicer_array(np.zeros((4, 4)), np.eye(4), source="slicer-node")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_voxels(unchanged, bad):
    tmp, snapshot = unchanged
    data = np.ones((10, 11, 12), np.float32)
    data[3, 4, 5] = bad
    _nii(tmp / "nan.nii.gz", data)
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0).copy())
    sitk.WriteImage(img, str(tmp / "nan.mha"))
    snapshot()
    for loader, name in [(Volume.from_nifti, "nan.nii.gz"), (Volume.from_sitk, "nan.nii.gz"),
                         (Volume.from_file, "nan.mha")]:
        with pytest.raises(ValueError, match=rf"{name}: .*1 NaN/Inf voxel\(s\) \(first at voxel \(3, 4, 5\)\)"):
            loader(tmp / name)
    with pytest.raises(ValueError, match="node: 1 NaN/Inf"):
        Volume.from_slicer_array(data.transpose(2, 1, 0), np.eye(4), source="node")


def test_empty_folder_and_unsafe_ids_are_logged_skips(unchanged, caplog):
    tmp, snapshot = unchanged
    (tmp / "empty_patient").mkdir()
    for pid in ["good", "bad..id", ".hidden"]:
        _nii(tmp / pid / "mri_t1.nii.gz", np.ones((4, 4, 4), np.float32))
    (tmp / "clinical_data.csv").write_text("patient_id,age,sex\ngood,40,F\n../etc,50,M\na/b,60,F\n")
    (tmp / "outcomes.csv").write_text("patient_id,label\ngood,1\n..,0\n")
    snapshot()
    with caplog.at_level(logging.WARNING):
        c = load_cohort(DataConfig(root=str(tmp), modalities=["mri_t1", "clinical"]))
    assert c.patient_ids == ["good"]
    by_where = {s.where: s.reason for s in c.skips}
    assert by_where[str(tmp / "empty_patient")] == "empty patient folder"
    assert "no path separators or '..'" in by_where[str(tmp / "bad..id")]
    csv = tmp / "clinical_data.csv"
    assert "'../etc'" in by_where[f"{csv}: line 3"] and "'a/b'" in by_where[f"{csv}: line 4"]
    assert "'..'" in by_where[f"{tmp / 'outcomes.csv'}: line 3"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for s in c.skips:
        assert s.where in logged and s.reason in logged
    # hidden folders (".hidden") are not patients
    assert not any(".hidden" in s.where for s in c.skips)


def test_csv_rows_without_images_and_images_without_rows(unchanged, caplog):
    tmp, snapshot = unchanged
    for pid in ["p1", "p2"]:
        _nii(tmp / pid / "mri_t1.nii.gz", np.ones((4, 4, 4), np.float32))
    (tmp / "clinical_data.csv").write_text("patient_id,age,sex\np1,40,F\nno_images,50,M\n")
    snapshot()
    with caplog.at_level(logging.WARNING):
        c = load_cohort(DataConfig(root=str(tmp), modalities=["mri_t1", "clinical"]))
    assert c.patient_ids == ["p1", "p2"]
    assert c.available("p2") == ["mri_t1"]  # images without a CSV row: clinical is missing
    s = [s for s in c.skips if "no_images" in s.where]
    assert len(s) == 1 and s[0].where.startswith(str(tmp / "clinical_data.csv"))
    assert "no usable patient folder" in s[0].reason
    assert any("treated as missing" in r.getMessage() and "p2" in r.getMessage() for r in caplog.records)


def test_csv_without_id_column_and_duplicate_ids(unchanged):
    tmp, snapshot = unchanged
    (tmp / "noid.csv").write_text("subject,age\na,1\n")
    (tmp / "dupes.csv").write_text("patient_id,age\na,1\nb,2\na,3\n")
    (tmp / "outcomes.csv").write_text("patient_id,label\nx,1\nx,0\n")
    snapshot()
    with pytest.raises(ValueError, match=r"noid.csv: no ID column 'patient_id'.*\['subject', 'age'\].*data.id_column"):
        TabularTable.from_csv(tmp / "noid.csv")
    with pytest.raises(ValueError, match=r"dupes.csv: duplicate IDs in column 'patient_id': 'a' on lines \[2, 4\]"):
        TabularTable.from_csv(tmp / "dupes.csv")
    with pytest.raises(ValueError, match=r"outcomes.csv: duplicate IDs .* 'x' on lines \[2, 3\]"):
        read_outcomes(tmp / "outcomes.csv")


def test_no_usable_patient_is_an_error_listing_skips(unchanged):
    tmp, snapshot = unchanged
    (tmp / "a").mkdir()
    snapshot()
    with pytest.raises(ValueError, match=r"(?s)no usable patient.*empty patient folder"):
        load_cohort(DataConfig(root=str(tmp), modalities=["mri_t1"]))
    recs, skips = discover_patients(tmp, "generic", ["mri_t1"])
    assert recs == [] and len(skips) == 1


def test_modalities_that_do_not_overlap(unchanged):
    tmp, snapshot = unchanged
    a = np.eye(4)
    b = np.eye(4)
    b[:3, 3] = [0.0, 0.0, 500.0]
    _nii(tmp / "p" / "mri_t1.nii.gz", np.ones((10, 10, 10), np.float32), a)
    _nii(tmp / "p" / "ct.nii.gz", np.ones((10, 10, 10), np.float32), b)
    snapshot()
    vols = {m: Volume.from_file(tmp / "p" / f"{m}.nii.gz") for m in ["mri_t1", "ct"]}
    with pytest.raises(ValueError, match=r"'mri_t1' \(.*mri_t1.nii.gz\) and 'ct' \(.*ct.nii.gz\) do not overlap"):
        check_overlap(vols)
