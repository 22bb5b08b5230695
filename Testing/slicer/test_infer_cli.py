"""``clinfusediff infer`` end to end on a tiny real checkpoint, as the shell and the Slicer module run it."""

from __future__ import annotations

import ast
import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/: the tiny checkpoint helper
from test_inference import write_checkpoint  # noqa: E402

from ClinFuseDiffCore.cli import build_parser, main  # noqa: E402
from ClinFuseDiffCore.data.volume import Volume  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    write_checkpoint(path)  # modalities mri_t1, mri_t2, ct, clinical
    return path


def _head(shape=(24, 24, 20), seed=0, ct=False):
    """(I, J, K) a bright ellipsoid 'brain' (CT: brain in HU inside a skull ring)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = (x / 0.7) ** 2 + (y / 0.75) ** 2 + (z / 0.65) ** 2
    rng = np.random.default_rng(seed)
    if ct:
        arr = np.full(shape, -1000.0)
        arr[r < 1.3] = 900.0
        arr[r < 1.0] = 35.0
        return (arr + rng.normal(0, 3, shape)).astype(np.float32), r < 1.0
    return (np.where(r < 1.0, 500.0, 0.0) + rng.normal(0, 10, shape)).astype(np.float32), r < 1.0


def _demo_patient(root: Path, pid="P1"):
    """A generic-layout cohort folder with one patient (T1 + CT) and its clinical row."""
    d = root / pid
    d.mkdir(parents=True)
    aff = np.diag([2.0, 2.0, 2.5, 1.0])
    aff[:3, 3] = [-23, -23, -24]
    t1, _ = _head()
    ct, _ = _head(ct=True)
    nib.save(nib.Nifti1Image(t1, aff), d / "mri_t1.nii.gz")
    nib.save(nib.Nifti1Image(ct, aff), d / "ct.nii.gz")
    with open(root / "clinical_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "age", "bmi", "grade", "sex"])
        w.writerow([pid, 61, 24.5, 2, "F"])
        w.writerow(["other", 40, 20, 1, "M"])
    return d


def test_infer_demo_patient_writes_three_outputs(ckpt, tmp_path, capsys):
    import slicerio

    patient = _demo_patient(tmp_path / "cohort")
    out = tmp_path / "out"
    rc = main(["infer", "--checkpoint", str(ckpt), "--patient", str(patient), "--samples", "3",
               "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "PROGRESS 100 done" in printed and printed.index("PROGRESS 2 ") < printed.index("PROGRESS 100")
    rec = json.loads((out / "prediction.json").read_text(encoding="utf-8"))
    assert rec["schema"] == "clinfusediff.prediction/1" and rec["patient_id"] == "P1"
    assert rec["modalities"]["used"] == ["mri_t1", "ct", "clinical"]  # clinical row from the cohort CSV
    assert rec["modalities"]["missing"] == ["mri_t2"]
    probs = rec["prediction"]["probabilities"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert rec["prediction"]["samples"] == 3
    # intervals are the 2.5/97.5 percentiles of the K = 3 per-sample probabilities (not a
    # normal approximation): every class has one, inside [0, 1] and around its mean
    assert rec["prediction"]["interval_method"] == "percentile"
    for name, (lo, hi) in rec["prediction"]["probability_interval"].items():
        assert 0.0 <= lo <= probs[name] + 1e-9 and probs[name] - 1e-9 <= hi <= 1.0
    assert set(rec["contributions"]) == {"mri_t1", "ct", "clinical"}
    assert rec["ttt"]["enabled"] is True and rec["ttt"]["steps"] == 3
    assert len(rec["model"]["checkpoint_sha256"]) == 64 and rec["model"]["config_hash"]
    assert rec["timings_s"]["total"] > 0
    # segmentation: brain (and skull, the fallback backend on CT) on the CT grid
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    names = {s["labelValue"]: s["name"] for s in seg["segments"]}
    assert names.get(1) == "brain"
    ct_img = nib.load(patient / "ct.nii.gz")
    np.testing.assert_allclose(seg["ijkToLPS"], LPS @ ct_img.affine, atol=1e-5)
    vox = np.asarray(seg["voxels"])
    assert vox.shape == ct_img.shape
    _, brain = _head(ct=True)
    found = vox == 1
    dice = 2 * (found & brain).sum() / (found.sum() + brain.sum())
    assert dice > 0.7, dice
    assert rec["segmentation"]["file"] == "segmentation.seg.nrrd" and rec["segmentation"]["modality"] == "ct"
    assert (out / "report.png").stat().st_size > 30_000


def _slicer_style_nrrd(path: Path, arr_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Write as Slicer's volume storage node does: NRRD in LPS (SimpleITK stands in for ITK)."""
    sitk.WriteImage(Volume(arr_ijk, ijk_to_ras).to_sitk(), str(path))


def test_infer_like_the_slicer_module(ckpt, tmp_path, capsys):
    """Oblique NRRD volumes + typed clinical values, segmentation on the reference (first) volume."""
    import slicerio

    a = np.deg2rad(10.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([2.0, 2.0, 2.5])
    ijk_to_ras[:3, 3] = [23, 23, -24]
    t1, brain = _head()
    t2, _ = _head(seed=1)
    inp = tmp_path / "input"
    inp.mkdir()
    _slicer_style_nrrd(inp / "mri_t1.nrrd", t1, ijk_to_ras)
    _slicer_style_nrrd(inp / "mri_t2.nrrd", t2 * 0.7, ijk_to_ras)
    (inp / "clinical.csv").write_text("patient_id,age,sex\npatient,63,M\n")
    out = tmp_path / "out"
    rc = main(["infer", "--checkpoint", str(ckpt), "--modality", f"mri_t1={inp / 'mri_t1.nrrd'}",
               "--modality", f"mri_t2={inp / 'mri_t2.nrrd'}", "--reference", "mri_t1",
               "--clinical", str(inp / "clinical.csv"), "--id", "patient", "--id-column", "patient_id",
               "--no-ttt", "--samples", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    rec = json.loads((out / "prediction.json").read_text(encoding="utf-8"))
    assert rec["ttt"]["enabled"] is False
    assert rec["modalities"]["used"] == ["mri_t1", "mri_t2", "clinical"]
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    np.testing.assert_allclose(seg["ijkToLPS"], LPS @ ijk_to_ras, atol=1e-4)  # the reference grid
    found = np.asarray(seg["voxels"]) == 1
    dice = 2 * (found & brain).sum() / (found.sum() + brain.sum())
    assert dice > 0.7, dice


@pytest.mark.parametrize("case, message", [
    ("missing_file", "does not exist"),
    ("bad_name", "not an image modality"),
    ("not_in_checkpoint", "trained for the image modalities"),
    ("no_overlap", "overlap"),
    ("unknown_id", "no row with"),
    ("missing_checkpoint", "no such file"),
    ("malformed", "NAME=PATH"),
])
def test_infer_bad_inputs_clear_error_nonzero_exit(ckpt, tmp_path, capsys, case, message):
    patient = _demo_patient(tmp_path / "cohort")
    t1, ct = patient / "mri_t1.nii.gz", patient / "ct.nii.gz"
    args = ["infer", "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "out")]
    mods = [f"mri_t1={t1}", f"ct={ct}"]
    if case == "missing_file":
        mods = [f"mri_t1={tmp_path / 'nope.nii.gz'}"]
    elif case == "bad_name":
        mods = [f"t1={t1}"]
    elif case == "not_in_checkpoint":
        mods = [f"mri_t1={t1}", f"pet={ct}"]
    elif case == "no_overlap":
        img = nib.load(ct)
        far = img.affine.copy()
        far[:3, 3] += 500.0
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), far), tmp_path / "far.nii.gz")
        mods = [f"mri_t1={t1}", f"ct={tmp_path / 'far.nii.gz'}"]
    elif case == "unknown_id":
        args += ["--clinical", str(tmp_path / "cohort" / "clinical_data.csv"), "--id", "nobody"]
    elif case == "missing_checkpoint":
        args[2] = str(tmp_path / "none.pt")
    elif case == "malformed":
        mods = [str(t1)]
    for m in mods:
        args += ["--modality", m]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0
    assert "clinfusediff infer: error:" in err and message in err, err
    assert not (tmp_path / "out" / "prediction.json").exists()


def test_module_command_line_parses_with_the_real_cli(ckpt, tmp_path):
    """The argument list the Slicer module and the web app build (ClinFuseDiffLib.common.inferArguments)
    is accepted by `clinfusediff infer`'s own parser and carries every setting."""
    sys.path.insert(0, str(REPO / "ClinFuseDiff"))
    from ClinFuseDiffLib.common import InferenceSettings, inferArguments

    files = {"mri_t1": tmp_path / "mri_t1.nrrd", "ct": tmp_path / "ct.nrrd"}
    s = InferenceSettings(checkpoint=ckpt, useTTT=True, tttSteps=5, numSamples=3, device="cpu",
                          useClinical=True, clinicalValues="age=63; sex=M", clinicalPatientId="P9")
    argv = inferArguments(s, files, tmp_path / "out", inputDir=tmp_path)
    a = build_parser().parse_args(argv)
    assert a.command == "infer" and a.checkpoint == str(ckpt)
    assert a.modality == [f"mri_t1={files['mri_t1']}", f"ct={files['ct']}"] and a.reference == "mri_t1"
    assert (a.ttt_steps, a.samples, a.device, a.out, a.patient_id) == (5, 3, "cpu", str(tmp_path / "out"), "P9")
    assert (tmp_path / "clinical.csv").read_text(encoding="utf-8") == "patient_id,age,sex\nP9,63,M\n"
    a = build_parser().parse_args(inferArguments(InferenceSettings(checkpoint=ckpt, useTTT=False), files, "o"))
    assert a.no_ttt and a.clinical is None and a.device == "auto"
    with pytest.raises(ValueError, match="does not exist"):
        inferArguments(InferenceSettings(checkpoint=tmp_path / "none.pt"), files, "o")
    with pytest.raises(ValueError, match="name=value"):
        inferArguments(InferenceSettings(checkpoint=ckpt, useClinical=True, clinicalValues="age 63"), files, "o")
