"""Per-patient outputs: .seg.nrrd geometry round trip, prediction.json record, report.png."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ClinFuseDiffCore.data.volume import Volume
from ClinFuseDiffCore.outputs import (
    SCHEMA,
    build_prediction_record,
    classification_uncertainty,
    config_hash,
    file_sha256,
    read_prediction_json,
    read_segmentation,
    render_report,
    write_prediction_json,
    write_segmentation,
)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique_ijk_to_ras() -> np.ndarray:
    """An oblique, anisotropic, LPS-like IJKToRAS (as Slicer shows a DICOM axial series)."""
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rz @ rx @ np.diag([0.9, 1.1, 3.0])
    m[:3, 3] = [101.5, 87.25, -63.0]
    return m


def _kji_labels(shape_kji=(9, 14, 11)) -> np.ndarray:
    """(K, J, I) labels with an asymmetric pattern so any axis flip or swap is detected."""
    lab = np.zeros(shape_kji, dtype=np.int16)
    lab[2:5, 3:9, 1:4] = 1
    lab[6, 10:13, 7:10] = 4  # BraTS-style non-contiguous label value
    lab[0, 0, 0] = 4
    return lab


def test_seg_nrrd_round_trip_geometry_names_colours(tmp_path):
    import slicerio

    kji = _kji_labels()
    ijk_to_ras = _oblique_ijk_to_ras()
    labelmap = Volume.from_slicer_array(kji, ijk_to_ras, source="labels")
    labels = {1: "necrotic tumour core", 4: "enhancing tumour"}
    colors = {1: (0.85, 0.2, 0.2), 4: (0.95, 0.85, 0.15)}
    out = write_segmentation(labelmap, labels, colors, tmp_path / "seg.seg.nrrd")
    assert out.exists() and not list(tmp_path.glob("*.tmp"))

    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(seg["ijkToLPS"], LPS @ ijk_to_ras, atol=1e-6)
    segs = {s["labelValue"]: s for s in seg["segments"]}
    assert set(segs) == {1, 4}  # label values kept, not renumbered 1, 2
    assert {v: s["name"] for v, s in segs.items()} == labels
    for v, c in colors.items():
        np.testing.assert_allclose(segs[v]["color"], c, atol=1e-6)
    vox = np.asarray(seg["voxels"])  # (I, J, K)
    assert vox.shape == kji.shape[::-1]
    # voxel values at the right IJK: file[i, j, k] == slicer array[k, j, i]
    np.testing.assert_array_equal(vox, kji.transpose(2, 1, 0))
    assert vox[0, 0, 0] == 4 and vox[1, 3, 2] == 1 and vox[7, 10, 6] == 4 and vox[10, 13, 8] == 0

    # Same point in RAS both ways: the voxel (i, j, k) = (8, 11, 6) centre.
    ijk = np.array([8, 11, 6, 1.0])
    np.testing.assert_allclose(LPS @ (seg["ijkToLPS"] @ ijk), ijk_to_ras @ ijk, atol=1e-6)

    # ITK (Slicer's reader) sees the same geometry: SimpleITK stands in for it.
    import SimpleITK as sitk

    back = Volume.from_sitk_image(sitk.ReadImage(str(out)), source="itk")
    np.testing.assert_allclose(back.affine, ijk_to_ras, atol=1e-5)
    np.testing.assert_array_equal(back.array, kji.transpose(2, 1, 0))

    # And our own reader.
    vol, names, cols = read_segmentation(out)
    np.testing.assert_allclose(vol.affine, ijk_to_ras, atol=1e-6)
    assert names == labels and set(cols) == {1, 4}


def test_seg_keeps_empty_named_segments_and_default_colours(tmp_path):
    import slicerio

    kji = np.zeros((4, 5, 6), np.int16)
    kji[1:3, 1:3, 1:3] = 1
    lm = Volume.from_slicer_array(kji, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = write_segmentation(lm, {1: "brain", 2: "skull"}, None, tmp_path / "b.seg.nrrd")
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["brain", "skull"]
    assert seg["segments"][0]["color"] != seg["segments"][1]["color"]
    assert np.asarray(seg["voxels"]).dtype == np.uint8


@pytest.mark.parametrize("labels, arr_value, path, colors, match", [
    ({1: "a"}, 2, "x.seg.nrrd", None, "no name"),
    ({1: "a"}, 0.5, "x.seg.nrrd", None, "whole-number"),
    ({1: "a"}, 1, "x.nrrd", None, ".seg.nrrd"),
    ({1: "a"}, 1, "x.seg.nrrd", {1: (255, 0, 0)}, r"\[0, 1\]"),
    ({0: "bg"}, 0, "x.seg.nrrd", None, "background"),
    ({}, 0, "x.seg.nrrd", None, "empty"),
])
def test_seg_bad_inputs(tmp_path, labels, arr_value, path, colors, match):
    arr = np.zeros((3, 3, 3), np.float32)
    arr[1, 1, 1] = arr_value
    with pytest.raises(ValueError, match=match):
        write_segmentation(Volume(arr, np.eye(4)), labels, colors, tmp_path / path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def _record(**kw):
    ps = np.array([[0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.25, 0.75]])
    base = dict(patient_id="P001", task="classification", probability_samples=ps,
                class_names=["low", "high"], contributions={"mri_t1": 0.4, "clinical": 0.1},
                model_modalities=["mri_t1", "mri_flair", "ct", "clinical"],
                used_modalities=["clinical", "mri_t1"], checkpoint="/x/best.pt",
                checkpoint_sha256="0" * 64, config_hash_="abc", ttt={"enabled": True, "steps": 3},
                timings={"total": 1.5})
    base.update(kw)
    return build_prediction_record(**base)


def test_prediction_record_classification(tmp_path):
    rec = _record()
    p = rec["prediction"]
    assert rec["schema"] == SCHEMA and rec["task"] == "classification"
    assert p["predicted_class"] == "high" and p["predicted_index"] == 1 and p["samples"] == 4
    assert p["probabilities"]["high"] == pytest.approx(0.7875)
    lo, hi = p["probability_interval"]["high"]
    assert 0.7 <= lo < 0.7875 < hi <= 0.9
    assert rec["modalities"] == {"model": ["mri_t1", "mri_flair", "ct", "clinical"],
                                 "used": ["mri_t1", "clinical"], "missing": ["mri_flair", "ct"]}
    u = rec["uncertainty"]
    assert u["std"] == pytest.approx(np.std([0.8, 0.7, 0.9, 0.75]))
    assert u["entropy"] > 0 and u["mutual_information"] > 0
    path = write_prediction_json(tmp_path / "prediction.json", rec)
    assert read_prediction_json(path) == json.loads(json.dumps(rec))


def test_uncertainty_zero_mutual_information_for_identical_samples():
    u = classification_uncertainty(np.array([[0.3, 0.7]] * 5))
    assert u["std"] == pytest.approx(0.0) and u["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert u["entropy"] == pytest.approx(-(0.3 * np.log(0.3) + 0.7 * np.log(0.7)))
    # disagreeing confident samples: high mutual information
    assert classification_uncertainty(np.array([[0.99, 0.01], [0.01, 0.99]]))["mutual_information"] > 0.5


def test_prediction_record_survival_and_errors(tmp_path):
    rec = _record(task="survival", probability_samples=None, value_samples=[0.1, 0.3, 0.2])
    assert rec["prediction"]["risk"] == pytest.approx(0.2)
    assert rec["uncertainty"]["entropy"] is None
    with pytest.raises(ValueError, match=r"summing to 1 \(row sums \[1.0, 3.0\], min -1"):
        _record(probability_samples=np.array([[0.4, 0.6], [4.0, -1.0]]))
    with pytest.raises(ValueError, match="got 3 with 1 NaN/inf"):
        _record(task="survival", probability_samples=None, value_samples=[0.1, np.inf, 0.2])
    with pytest.raises(ValueError, match="not modalities of the model"):
        _record(used_modalities=["pet"])
    with pytest.raises(ValueError, match="does not have"):
        _record(contributions={"mri_flair": 0.2})
    with pytest.raises(ValueError, match="NaN"):
        _record(probability_samples=np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="task"):
        _record(task="segmentation")
    with pytest.raises(ValueError, match="schema"):
        write_prediction_json(tmp_path / "p.json", {"a": 1})


def test_identity_helpers(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def _phantom():
    shape = (40, 44, 30)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [-40, -44, -45]
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.7) ** 2 < 1
    tumour = (x - 0.35) ** 2 + y**2 + z**2 < 0.06
    rng = np.random.default_rng(0)
    t1 = brain * 100.0 + rng.normal(0, 4, shape)
    lab = brain.astype(np.float32) + tumour
    return Volume(t1, aff), Volume(lab, aff), brain, tumour


def test_report_png_is_rendered_and_not_blank(tmp_path):
    from PIL import Image

    t1, seg, _brain, _tumour = _phantom()
    # a second modality on another (coarser, shifted) grid: it must be resampled onto the seg grid
    aff2 = t1.affine.copy()
    aff2[:3, :3] *= 1.5
    flair = Volume(np.asarray(t1.array)[::1, ::1, ::1] * 0.5 + 10, aff2, source="flair")
    rec = _record(segmentation={"file": "s.seg.nrrd", "labels": {"1": "brain", "2": "tumour"}})
    out = render_report({"mri_t1": t1, "mri_flair": flair}, seg, rec, tmp_path / "report.png")
    assert out.exists() and out.stat().st_size > 30_000
    im = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert im.shape[0] > 800 and im.shape[1] > 1000
    assert im.std() > 30  # not a blank page
    # the predicted class bar is drawn in red (#d62728)
    red = (np.abs(im[..., 0] - 214) < 6) & (np.abs(im[..., 1] - 39) < 8) & (np.abs(im[..., 2] - 40) < 8)
    assert red.sum() > 500


def test_report_regression_without_segmentation(tmp_path):
    t1, _seg, _b, _t = _phantom()
    rec = _record(task="regression", probability_samples=None, value_samples=[3.0, 3.4, 2.9])
    out = render_report({"ct": t1}, None, rec, tmp_path / "r.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one image"):
        render_report({}, None, rec, tmp_path / "x.png")


def test_prediction_record_from_mean_and_std():
    """Callers with only mean probabilities + std over K (not ``infer``, which passes the K
    samples): normal-approximation intervals."""
    rec = _record(probability_samples=None, probabilities=[0.3, 0.7], num_samples=8,
                  uncertainty={"std": 0.1, "entropy": 0.61, "expected_entropy": 0.6,
                               "mutual_information": 0.01})
    p = rec["prediction"]
    assert p["interval_method"] == "normal" and p["samples"] == 8
    assert p["probability_interval"]["high"] == pytest.approx([0.7 - 0.196, 0.7 + 0.196])
    assert p["probability_interval"]["low"] == pytest.approx([0.3 - 0.196, 0.3 + 0.196])
    assert rec["uncertainty"]["mutual_information"] == 0.01
    three = _record(probability_samples=None, probabilities=[0.1, 0.85, 0.05], num_samples=4,
                    class_names=["a", "b", "c"], uncertainty={"std": 0.2})
    iv = three["prediction"]["probability_interval"]
    assert iv["a"] is None and iv["c"] is None and iv["b"] == pytest.approx([0.85 - 0.392, 1.0])
    with pytest.raises(ValueError, match="std"):
        _record(probability_samples=None, probabilities=[0.3, 0.7])
    with pytest.raises(ValueError, match="or probabilities"):
        _record(probabilities=[0.3, 0.7], uncertainty={"std": 0.1})  # both given
    surv = _record(task="survival", probability_samples=None, value=0.4, uncertainty={"std": 0.05})
    assert surv["prediction"]["risk_interval"] == pytest.approx([0.302, 0.498])


def test_report_with_normal_intervals(tmp_path):
    t1, seg, _b, _t = _phantom()
    rec = _record(probability_samples=None, probabilities=[0.1, 0.85, 0.05], num_samples=4,
                  class_names=["a", "b", "c"], uncertainty={"std": 0.2})
    assert render_report({"mri_t1": t1}, seg, rec, tmp_path / "r.png").stat().st_size > 10_000
