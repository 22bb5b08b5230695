"""The module's Qt-free Logic (ClinFuseDiff/ClinFuseDiffLib/logic.py) on Slicer's own MRML code.

Runs on ``slicer-core`` (Kitware's wheel of Slicer's MRML scene, nodes, storage nodes and module
logics, without Qt): volumes are read by Slicer's ITK-based storage node, the segmentation by
Slicer's segmentation reader, the scene is written and read back by Slicer. The inference is the
real ``python -m ClinFuseDiffCore.cli infer`` subprocess on a tiny checkpoint trained here.
Skipped, with the reason, where slicer-core is not installed (``scripts/install_web.sh`` installs it).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (scripts/install_web.sh installs it)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
import slicer.util  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ClinFuseDiff"))  # the module folder, as Slicer puts it on sys.path
sys.path.insert(0, str(REPO / "Testing"))  # the tiny checkpoint helper
from ClinFuseDiffLib.common import InferenceSettings, predictionTableRows  # noqa: E402
from ClinFuseDiffLib.logic import ClinFuseDiffMRMLLogic  # noqa: E402
from test_inference import write_checkpoint  # noqa: E402

from ClinFuseDiffCore.data.synth.cohort import generate_cohort  # noqa: E402
from ClinFuseDiffCore.data.volume import Volume  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rot(deg, axis):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(spacing, rotation=np.eye(3), flip=(1, 1, 1), origin=(0, 0, 0)):
    aff = np.eye(4)
    aff[:3, :3] = np.diag(flip) @ rotation @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _node_array(node) -> np.ndarray:
    """(I, J, K) voxels of a volume node (arrayFromVolume is KJI)."""
    return slicer.util.arrayFromVolume(node).transpose(2, 1, 0)


def _assert_same_image(arr_a, aff_a, arr_b, aff_b, atol=1e-5):
    """Two (I, J, K) grids hold the same image in RAS: B's voxel index of each A voxel is a signed
    permutation of A's (the voxel order may differ), and the voxel values there are equal."""
    t = np.linalg.inv(aff_b) @ aff_a  # A's ijk -> B's ijk
    perm = np.round(t[:3, :3])
    assert np.allclose(t[:3, :3], perm, atol=1e-4) and np.allclose(np.abs(perm).sum(0), 1), t
    assert np.allclose(t[:3, 3], np.round(t[:3, 3]), atol=1e-3), t
    ijk = np.indices(arr_a.shape).reshape(3, -1)
    idx = (perm @ ijk + np.round(t[:3, 3])[:, None]).astype(int)
    assert (idx >= 0).all() and (idx < np.array(arr_b.shape)[:, None]).all(), "grids do not cover each other"
    np.testing.assert_allclose(arr_a.reshape(-1), arr_b[tuple(idx)], atol=atol)


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture()
def logic():
    return ClinFuseDiffMRMLLogic(slicer.vtkMRMLScene())


# ----------------------------------------------------------------------------- geometry
GEOMETRIES = {
    "oblique_lps_anisotropic": _affine((0.9, 1.1, 1.7), _rot(15, 2) @ _rot(-8, 0), (-1, -1, 1), (40, 50, -45)),
    "left_handed_thick_slice": _affine((0.8, 0.8, 5.0), np.eye(3), (-1, 1, 1), (90, -100, -30)),
    "thick_slice_oblique": _affine((0.7, 0.7, 6.0), _rot(20, 0), (-1, -1, 1), (80, 90, -20)),
    "permuted_axes": _affine((1.0, 2.0, 3.0), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0.0]]), (1, 1, 1), (-5, 6, 7)),
}


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_slicer_storage_node_reads_what_the_core_reads(logic, tmp_path, geometry, fmt):
    """Slicer's reader and the core's Volume hold the same image in RAS for NIfTI and NRRD, and the
    file the Logic writes for the subprocess is that image on Slicer's grid."""
    aff = GEOMETRIES[geometry]
    shape = (14, 12, 6) if geometry == "left_handed_thick_slice" else (12, 14, 10)
    arr = np.random.default_rng(1).normal(100, 20, shape).astype(np.float32)
    path = tmp_path / f"vol.{fmt}"
    if fmt == "nii.gz":
        nib.save(nib.Nifti1Image(arr, aff), path)
    else:  # an ITK/Slicer-style NRRD (LPS space), written by SimpleITK
        sitk.WriteImage(Volume(arr, aff).to_sitk(), str(path))
    node = logic.readVolume(path)
    assert node.GetName() == "vol" and node.IsA("vtkMRMLScalarVolumeNode")
    slicer_aff, slicer_arr = logic.ijkToRas(node), _node_array(node)
    if np.linalg.det(aff[:3, :3]) > 0:  # right-handed grids: Slicer keeps the file's voxel order
        np.testing.assert_allclose(slicer_aff, aff, atol=1e-5)
        np.testing.assert_allclose(slicer_arr, arr, atol=1e-5)
    else:  # left-handed: Slicer's reader flips k (same image, right-handed IJK) where nibabel/ITK do not
        assert np.linalg.det(slicer_aff[:3, :3]) > 0
    _assert_same_image(slicer_arr, slicer_aff, arr, aff)
    core = Volume.from_file(path)
    _assert_same_image(core.array, core.affine, arr, aff)
    # and back: the NRRD the Logic writes for the subprocess is Slicer's grid, read as such by the core
    logic.writeVolume(node, tmp_path / "written.nrrd")
    back = Volume.from_file(tmp_path / "written.nrrd")
    np.testing.assert_allclose(back.affine, slicer_aff, atol=1e-5)
    np.testing.assert_allclose(back.array, slicer_arr, atol=1e-5)


@pytest.mark.parametrize("sform_code, wins", [(2, "qform"), (4, "qform"), (1, "sform")])
def test_qform_sform_disagreement_read_as_slicer_does(logic, tmp_path, sform_code, wins):
    """nibabel's ``affine`` prefers any sform; ITK (Slicer) uses the sform only when its code is 1.

    The core follows Slicer, so what the user sees in Slicer is what the model gets."""
    arr = np.random.default_rng(2).normal(size=(10, 12, 8)).astype(np.float32)
    qform = _affine((2.0, 2.0, 3.0), _rot(10, 2), (-1, -1, 1), (20, 30, -12))
    sform = _affine((2.0, 2.0, 3.0), np.eye(3), (1, 1, 1), (-60, 40, 10))
    img = nib.Nifti1Image(arr, None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=sform_code)
    nib.save(img, tmp_path / "qs.nii.gz")
    node = logic.readVolume(tmp_path / "qs.nii.gz")
    expected = qform if wins == "qform" else sform
    np.testing.assert_allclose(logic.ijkToRas(node), expected, atol=1e-5)
    np.testing.assert_allclose(nib.load(tmp_path / "qs.nii.gz").affine, sform, atol=1e-5)  # nibabel differs
    np.testing.assert_allclose(Volume.from_file(tmp_path / "qs.nii.gz").affine, expected, atol=1e-5)
    logic.writeVolume(node, tmp_path / "qs.nrrd")
    np.testing.assert_allclose(Volume.from_file(tmp_path / "qs.nrrd").affine, expected, atol=1e-5)


def test_scaled_integer_nifti_reads_scaled(logic, tmp_path):
    """int16 with scl_slope/scl_inter: Slicer's node holds the scaled values, as nibabel's get_fdata."""
    raw = (np.arange(10 * 12 * 8).reshape(10, 12, 8) % 301).astype(np.int16)
    img = nib.Nifti1Image(raw, _affine((1.0, 1.0, 2.0)))
    img.header.set_slope_inter(0.5, 100.0)
    img.set_data_dtype(np.int16)
    nib.save(img, tmp_path / "scaled.nii.gz")
    stored = nib.load(tmp_path / "scaled.nii.gz").dataobj
    assert (stored.slope, stored.inter) == (0.5, 100.0)  # really stored scaled
    np.testing.assert_array_equal(stored.get_unscaled(), raw)
    expected = raw * 0.5 + 100.0
    node = logic.readVolume(tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(_node_array(node), expected)
    np.testing.assert_allclose(Volume.from_file(tmp_path / "scaled.nii.gz").array, expected)
    logic.writeVolume(node, tmp_path / "scaled.nrrd")
    np.testing.assert_allclose(Volume.from_file(tmp_path / "scaled.nrrd").array, expected)


def test_volume_under_a_transform_is_refused(logic, tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "t1.nii.gz")
    node = logic.readVolume(tmp_path / "t1.nii.gz")
    transform = logic.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="Harden the transform"):
        logic.writeVolume(node, tmp_path / "x.nrrd")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        logic.readVolume(tmp_path / "nope.nii.gz")


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    write_checkpoint(path)  # modalities mri_t1, mri_t2, ct, clinical
    return path


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    """One synthetic patient of the project's generator: oblique LPS int16 volumes + brain labels."""
    root = tmp_path_factory.mktemp("cohort")
    summary = generate_cohort(root / "c", 1, shape=(40, 40, 32), seed=3, progress=False)
    return Path(summary["patient_dirs"][0])


@pytest.fixture(scope="module")
def run(checkpoint, patient, tmp_path_factory):
    """The Logic end to end: Slicer-read volumes -> real subprocess -> results in the scene."""
    scene = slicer.vtkMRMLScene()
    logic = ClinFuseDiffMRMLLogic(scene)
    nodes = {m: logic.readVolume(patient / f"{m}.nii.gz") for m in ("mri_t1", "mri_t2", "ct")}
    out = tmp_path_factory.mktemp("results") / "P"
    settings = InferenceSettings(checkpoint=checkpoint, useTTT=True, tttSteps=2, numSamples=3, device="cpu",
                                 useClinical=True, clinicalValues="age=61; sex=F", clinicalPatientId="P1",
                                 outputFolder=out)
    progress, log = [], []
    t0 = time.time()
    # The patient has T1 and T2 ticked; CT is loaded but unticked (the model imputes it).
    results = logic.runInference({"mri_t1": nodes["mri_t1"], "mri_t2": nodes["mri_t2"]}, settings,
                                 logCallback=log.append, progressCallback=lambda pc, stage: progress.append(pc))
    return dict(scene=scene, logic=logic, nodes=nodes, results=results, progress=progress, log=log,
                seconds=time.time() - t0, out=out)


def test_logic_end_to_end_writes_and_loads_results(run):
    res = run["results"]
    assert run["progress"] and run["progress"][-1] == 100 and run["progress"] == sorted(run["progress"])
    assert {"prediction.json", "segmentation.seg.nrrd", "report.png"} <= set(res.files)
    assert res.record["patient_id"] == "P1"
    assert res.record["modalities"]["used"] == ["mri_t1", "mri_t2", "clinical"]
    assert res.record["modalities"]["missing"] == ["ct"]
    assert res.segmentationNode.GetScene() is run["scene"] and res.tableNode.GetScene() is run["scene"]


def test_segmentation_read_by_slicer_lines_up_with_the_input(run, patient):
    """Slicer's reader + export onto the T1 grid == the file's voxels (Dice 1), and it is the brain."""
    import slicerio

    logic, res, t1 = run["logic"], run["results"], run["nodes"]["mri_t1"]
    seg = res.segmentationNode.GetSegmentation()
    segment = seg.GetSegment(seg.GetSegmentIdBySegmentName("brain"))
    assert segment is not None and segment.GetLabelValue() == 1
    assert res.segmentationNode.GetDisplayNode() is not None
    assert res.segmentationNode.GetSegmentation().ContainsRepresentation("Closed surface")
    # reference geometry: the T1 volume
    ref = res.segmentationNode.GetNodeReferenceID(res.segmentationNode.GetReferenceImageGeometryReferenceRole())
    assert ref == t1.GetID()
    mask_kji = logic.segmentArray(res.segmentationNode, "brain", t1)
    assert mask_kji.shape == slicer.util.arrayFromVolume(t1).shape
    mask = mask_kji.transpose(2, 1, 0)
    f = slicerio.read_segmentation(str(run["out"] / "segmentation.seg.nrrd"))
    np.testing.assert_allclose(f["ijkToLPS"], LPS @ logic.ijkToRas(t1), atol=1e-4)  # file on the T1 grid
    file_brain = np.asarray(f["voxels"]) == 1
    assert _dice(mask, file_brain) == 1.0 and mask.sum() > 1000
    # against the synthetic patient's own brain (labels 1-4: CSF, GM, WM, lesion) on the input grid
    labels = np.asarray(nib.load(patient / "brain_labels.nii.gz").dataobj)
    brain = np.isin(labels, [1, 2, 3, 4])
    dice = _dice(mask, brain)
    assert dice > 0.8, f"brain segment vs the synthetic brain: Dice {dice:.3f}"
    # a voxel-shifted mask would score much lower: the check can fail on a geometry error
    assert _dice(np.roll(mask, 3, axis=0), brain) < dice - 0.05


def test_table_node_holds_the_prediction(run):
    res, logic = run["results"], run["logic"]
    rec = json.loads((run["out"] / "prediction.json").read_text(encoding="utf-8"))
    rows = logic.tableRows(res.tableNode)
    table = res.tableNode.GetTable()
    assert [table.GetColumnName(c) for c in range(5)] == ["Section", "Name", "Value", "95% lower", "95% upper"]
    expected = predictionTableRows(rec)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert got[:2] == want[:2]
        for g, w in zip(got[2:], want[2:]):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-9)
    by = {(s, n): (v, lo, hi) for s, n, v, lo, hi in rows}
    pred = rec["prediction"]
    top = pred["predicted_class"]
    assert by[("prediction", top)][0] == pytest.approx(pred["probabilities"][top])
    lo, hi = pred["probability_interval"][top]
    assert by[("probability", top)][1:] == (pytest.approx(lo), pytest.approx(hi)) and lo <= by[("prediction", top)][0] <= hi
    probs = [v for (s, _n), (v, _lo, _hi) in by.items() if s == "probability"]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    unc = {n: v for (s, n), (v, _lo, _hi) in by.items() if s == "uncertainty"}
    assert {"std", "entropy", "mutual_information"} <= set(unc) and all(np.isfinite(v) and v >= 0 for v in unc.values())
    assert {n for (s, n) in by if s == "contribution"} == {"mri_t1", "mri_t2", "clinical"}
    assert {n for (s, n) in by if s == "missing"} == {"ct"}
    assert res.tableNode.GetAttribute("ClinFuseDiff.patient_id") == "P1"
    assert res.tableNode.GetAttribute("ClinFuseDiff.checkpoint_sha256") == rec["model"]["checkpoint_sha256"]


def test_scene_saved_and_reloaded_keeps_the_results(run, tmp_path):
    logic, res = run["logic"], run["results"]
    mrml = logic.saveScene(tmp_path / "scene" / "patient.mrml")
    assert mrml.is_file() and sorted(p.suffix for p in mrml.parent.iterdir() if p.suffix in (".nrrd", ".tsv"))
    rows_before = logic.tableRows(res.tableNode)
    mask_before = logic.segmentArray(res.segmentationNode, "brain", run["nodes"]["mri_t1"])

    scene2, logic2 = ClinFuseDiffMRMLLogic.loadScene(mrml)
    t1 = scene2.GetFirstNodeByName("mri_t1")
    seg = scene2.GetFirstNodeByName(res.segmentationNode.GetName())
    table = scene2.GetFirstNodeByName(res.tableNode.GetName())
    assert t1 is not None and seg is not None and table is not None
    np.testing.assert_allclose(logic2.ijkToRas(t1), logic.ijkToRas(run["nodes"]["mri_t1"]), atol=1e-5)
    np.testing.assert_array_equal(_node_array(t1), _node_array(run["nodes"]["mri_t1"]))
    np.testing.assert_array_equal(logic2.segmentArray(seg, "brain", t1), mask_before)
    rows_after = logic2.tableRows(table)
    assert [r[:2] for r in rows_after] == [r[:2] for r in rows_before]
    for a, b in zip(rows_after, rows_before):
        for x, y in zip(a[2:], b[2:]):
            # Slicer's .tsv writer keeps 6 significant digits
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-5, abs=1e-12)
    assert table.GetAttribute("ClinFuseDiff.patient_id") == "P1"


# ----------------------------------------------------------------------------- failures
def _far_copy(src: Path, dst: Path) -> Path:
    img = nib.load(src)
    far = img.affine.copy()
    far[:3, 3] += 600.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), far), dst)
    return dst


@pytest.mark.parametrize("case, message", [
    ("no_overlap", "overlap"),
    ("other_modalities", "trained for the image modalities"),
])
def test_bad_inputs_fail_with_the_commands_message(checkpoint, patient, tmp_path, case, message):
    scene = slicer.vtkMRMLScene()
    logic = ClinFuseDiffMRMLLogic(scene)
    t1 = logic.readVolume(patient / "mri_t1.nii.gz")
    if case == "no_overlap":
        other = {"mri_t2": logic.readVolume(_far_copy(patient / "mri_t2.nii.gz", tmp_path / "far_t2.nii.gz"))}
    else:  # the checkpoint has no PET
        other = {"pet": logic.readVolume(patient / "pet.nii.gz")}
    before = scene.GetNumberOfNodes()
    settings = InferenceSettings(checkpoint=checkpoint, useTTT=False, numSamples=2, device="cpu")
    with pytest.raises(RuntimeError, match=message) as err:
        logic.runInference({"mri_t1": t1, **other}, settings, workDir=tmp_path)
    assert "clinfusediff infer: error:" in str(err.value)
    assert scene.GetNumberOfNodes() == before  # no half results in the scene


def test_invalid_settings_rejected_before_starting(checkpoint, logic, tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "t1.nii.gz")
    t1 = logic.readVolume(tmp_path / "t1.nii.gz")
    with pytest.raises(ValueError, match="does not exist"):
        logic.startInference({"mri_t1": t1}, InferenceSettings(checkpoint=tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="not an image modality"):
        logic.startInference({"clinical": t1}, InferenceSettings(checkpoint=checkpoint))
    with pytest.raises(ValueError, match="at least one"):
        logic.startInference({}, InferenceSettings(checkpoint=checkpoint))
    with pytest.raises(ValueError, match="name=value"):
        logic.startInference({"mri_t1": t1}, InferenceSettings(checkpoint=checkpoint, useClinical=True,
                                                                 clinicalValues="age 61"))


def test_cancel_stops_the_subprocess(checkpoint, patient, tmp_path):
    logic = ClinFuseDiffMRMLLogic(slicer.vtkMRMLScene())
    t1 = logic.readVolume(patient / "mri_t1.nii.gz")
    job = logic.startInference({"mri_t1": t1}, InferenceSettings(checkpoint=checkpoint, device="cpu"), workDir=tmp_path)
    pid = job.process.pid
    time.sleep(0.5)
    job.cancel()
    deadline = time.time() + 30
    while job.poll() and time.time() < deadline:
        time.sleep(0.1)
    assert not job.poll(), "the subprocess did not stop"
    assert job.cancelled and job.process.returncode != 0
    with pytest.raises(RuntimeError, match="Cancelled"):
        job.finish()
    assert not job.workDir.exists()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
