"""Patient discovery (generic, BraTS 2021/2023) and cohort loading (image and tabular-only)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ClinFuseDiffCore.config import DataConfig, TabularModalityConfig
from ClinFuseDiffCore.data.discovery import detect_layout, discover_patients, load_cohort
from ClinFuseDiffCore.data.volume import Volume
from ClinFuseDiffCore.modalities import ModalityRegistry

IMG = ["mri_t1", "mri_t1ce", "mri_t2", "mri_flair"]


def _nii(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(seed).random((6, 7, 5)).astype(np.float32), np.eye(4)), path)
    return path


def test_generic_layout_per_patient_modalities(tmp_path, caplog):
    _nii(tmp_path / "p1" / "mri_t1.nii.gz")
    _nii(tmp_path / "p1" / "mri_flair.nii")
    _nii(tmp_path / "p1" / "seg.nii.gz")
    _nii(tmp_path / "p1" / "brain_labels.nii.gz")
    (tmp_path / "p1" / "notes.txt").write_text("ignored")
    v = Volume(np.ones((5, 6, 7), np.float32), np.eye(4))
    (tmp_path / "p2").mkdir()
    sitk.WriteImage(v.to_sitk(), str(tmp_path / "p2" / "mri_t2.nrrd"))
    sitk.WriteImage(v.to_sitk(), str(tmp_path / "p2" / "ct.mha"))
    (tmp_path / "p3").mkdir()  # empty
    _nii(tmp_path / "p4" / "pet.nii.gz")  # only a modality that was not requested
    with caplog.at_level(logging.WARNING):
        recs, skips = discover_patients(tmp_path, "auto", IMG + ["ct", "clinical"])
    assert [r.patient_id for r in recs] == ["p1", "p2"]
    p1, p2 = recs
    assert set(p1.images) == {"mri_t1", "mri_flair"}
    assert p1.seg == tmp_path / "p1" / "seg.nii.gz"
    assert p1.extra["brain_labels"] == tmp_path / "p1" / "brain_labels.nii.gz"
    assert p1.root == tmp_path / "p1" and p1.extra["layout"] == "generic"
    assert set(p2.images) == {"mri_t2", "ct"} and p2.seg is None
    where = {Path(s.where).name: s.reason for s in skips}
    assert where["p3"] == "empty patient folder"
    assert "no image of the requested modalities" in where["p4"] and "pet.nii.gz" in where["p4"]
    assert any("p3" in r.getMessage() and "empty" in r.getMessage() for r in caplog.records)


def test_brats_2021_and_2023_names(tmp_path):
    for s in ["t1", "t1ce", "t2", "flair", "seg"]:
        _nii(tmp_path / "BraTS2021_00001" / f"BraTS2021_00001_{s}.nii.gz")
    for s in ["t1n", "t1c", "t2f", "seg"]:  # no t2w: per-patient detection
        _nii(tmp_path / "BraTS-GLI-00002-000" / f"BraTS-GLI-00002-000-{s}.nii.gz")
    assert detect_layout(tmp_path, IMG) == "brats"
    recs, skips = discover_patients(tmp_path, "auto", IMG)
    assert not skips
    r23, r21 = recs  # sorted IDs: "BraTS-..." < "BraTS2021..."
    assert r21.patient_id == "BraTS2021_00001"
    assert r21.images == {m: tmp_path / "BraTS2021_00001" / f"BraTS2021_00001_{s}.nii.gz"
                          for m, s in zip(IMG, ["t1", "t1ce", "t2", "flair"])}
    assert r21.seg.name == "BraTS2021_00001_seg.nii.gz"
    assert r23.patient_id == "BraTS-GLI-00002-000"
    assert {m: p.name for m, p in r23.images.items()} == {
        "mri_t1": "BraTS-GLI-00002-000-t1n.nii.gz", "mri_t1ce": "BraTS-GLI-00002-000-t1c.nii.gz",
        "mri_flair": "BraTS-GLI-00002-000-t2f.nii.gz"}
    assert r23.seg.name.endswith("-seg.nii.gz")
    # a generic cohort is not mistaken for BraTS although "mri_t1" ends in "_t1"
    g = tmp_path / "g"
    _nii(g / "p1" / "mri_t1.nii.gz")
    assert detect_layout(g, IMG) == "generic"


def test_dicom_series_folder_counts_as_modality(tmp_path):
    from test_volume import write_dicom_series

    write_dicom_series(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4), tmp_path / "p1" / "ct")
    recs, _ = discover_patients(tmp_path, "generic", ["ct"])
    assert recs[0].images == {"ct": tmp_path / "p1" / "ct"}
    assert Volume.from_file(recs[0].images["ct"]).shape == (3, 4, 5)


def test_unsafe_and_duplicate_entries_are_skipped(tmp_path):
    _nii(tmp_path / "bad..id" / "mri_t1.nii.gz")
    _nii(tmp_path / "dup" / "mri_t1.nii.gz")
    _nii(tmp_path / "dup" / "mri_t1.nii")
    _nii(tmp_path / "ok" / "mri_t1.nii.gz")
    recs, skips = discover_patients(tmp_path, "generic", IMG)
    assert [r.patient_id for r in recs] == ["ok"]
    reasons = {Path(s.where).name: s.reason for s in skips}
    assert "no path separators or '..'" in reasons["bad..id"]
    assert "given twice" in reasons["dup"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        discover_patients(tmp_path, "bids", IMG)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_patients(tmp_path / "nowhere", "generic", IMG)
    with pytest.raises(ValueError, match="unknown modality 'mri_dwi'"):
        discover_patients(tmp_path, "generic", ["mri_t1", "mri_dwi"], registry=ModalityRegistry())


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_load_cohort_image_layout_rules(tmp_path, caplog):
    for p in ["p1", "p2", "p3"]:
        _nii(tmp_path / p / "mri_t1.nii.gz")
    _csv(tmp_path / "clinical_data.csv", "patient_id,age,sex\np1,50,F\np2,61,M\nghost,40,F\n")
    _csv(tmp_path / "outcomes.csv", "patient_id,label,survival_months,event\np1,1,10,1\np2,0,,\np3,1,5,0\nonly_outcome,0,1,1\n")
    cfg = DataConfig(root=str(tmp_path), modalities=["mri_t1", "clinical"])
    with caplog.at_level(logging.WARNING):
        c = load_cohort(cfg)
    assert c.layout == "generic"
    assert c.patient_ids == ["p1", "p2", "p3"]
    assert c.available("p1") == ["mri_t1", "clinical"]
    assert c.available("p3") == ["mri_t1"]  # no CSV row: tabular missing, patient kept
    assert any("p3" in r.getMessage() and "treated as missing" in r.getMessage() for r in caplog.records)
    wheres = [s.where for s in c.skips]
    assert any(w.endswith("clinical_data.csv: patient ghost") for w in wheres)  # CSV row, no images
    assert any(w.endswith("outcomes.csv: patient only_outcome") for w in wheres)
    assert c.outcomes["p1"] == (1.0, 10.0, 1.0)
    assert np.isnan(c.outcomes["p2"].time)
    assert "x " in c.skip_summary()


def test_load_cohort_tabular_only(tmp_path):
    _csv(tmp_path / "clinical_data.csv", "patient_id,age,sex\na,50,F\nb,61,M\nc,70,M\n")
    _csv(tmp_path / "labs" / "labs.csv", "patient_id,crp\na,1.5\nd,3.0\n")
    _csv(tmp_path / "outcomes.csv", "patient_id,label\na,1\nb,0\nc,\nd,1\n")
    cfg = DataConfig(root=str(tmp_path), layout="auto", modalities=["clinical", "labs"],
                     tabular={"clinical": TabularModalityConfig(file="clinical_data.csv", categorical=["sex"]),
                              "labs": TabularModalityConfig(file="labs/labs.csv")})
    c = load_cohort(cfg)
    assert c.layout == "tabular"
    assert c.patient_ids == ["a", "b", "d"]  # c has no label
    assert all(r.images == {} for r in c.records)
    assert c.available("a") == ["clinical", "labs"] and c.available("d") == ["labs"]
    assert any("patient c" in s.where and "no classification outcome" in s.reason for s in c.skips)
    with pytest.raises(ValueError, match="not declared under data.tabular"):
        load_cohort(DataConfig(root=str(tmp_path), modalities=["clinical"], tabular={}))
    with pytest.raises(FileNotFoundError, match="tabular file of modality 'labs'"):
        load_cohort(DataConfig(root=str(tmp_path), modalities=["labs"],
                               tabular={"labs": TabularModalityConfig(file="missing.csv")}))
