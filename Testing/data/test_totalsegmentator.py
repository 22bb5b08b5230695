"""TotalSegmentator backend, run for real offline on a stand-in nnU-Net model.

The stand-in model (see ``build_standin_model``) is made the way nnU-Net makes a real one, minus the
training: a tiny fake raw dataset -> nnU-Net's own fingerprint extractor and ``ExperimentPlanner``
-> ``plans.json`` -> the network those plans describe, built by nnU-Net's trainer class, with random
weights -> ``checkpoint_final.pth`` in the folder TotalSegmentator loads for ``total_mr --fast``.
TotalSegmentator's whole pipeline then runs on it (reorient, resample to 3 mm, nnU-Net sliding
window, resample back, undo reorientation). The brain output channel gets a large bias, so the
expected result is known: every voxel of the input grid is brain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("totalsegmentator",
                    reason="TotalSegmentator not installed (the [totalseg] extra; CI installs it)")

from ClinFuseDiffCore.data.segmentation import BRAIN, brain_mask, get_backend
from ClinFuseDiffCore.data.segmentation.totalseg import (
    TotalSegmentatorBackend,
    required_weights,
    run_totalsegmentator,
)
from ClinFuseDiffCore.data.volume import Volume

pytestmark = pytest.mark.totalseg

TOTAL_MR_FAST = (852, "TotalSegMRI_total_3mm_1088subj", "nnUNetTrainer_2000epochs_NoMirroring")


def build_standin_model(home: Path, dataset_id: int, dataset_name: str, trainer: str,
                        labels: dict[int, str], channel: str, favour_label: int,
                        shape=(24, 24, 24), spacing: float = 3.0, seed: int = 0) -> Path:
    """Write ``home/nnunet/results/Dataset{id}_{name}/{trainer}__nnUNetPlans__3d_fullres`` with
    ``plans.json`` (nnU-Net's planner), ``dataset.json`` and ``fold_0/checkpoint_final.pth``
    (random weights; the seg layers' bias favours ``favour_label``). Needs the env variables
    nnUNet_raw / nnUNet_preprocessed pointing under ``home/standin_build``."""
    import nibabel as nib
    import torch
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    work = home / "standin_build"
    raw = work / "raw" / f"Dataset{dataset_id:03d}_{dataset_name}"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    for case in range(2):
        img = rng.normal(100, 20, shape).astype(np.float32)
        lab = rng.integers(0, 3, shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(img, affine), str(raw / "imagesTr" / f"case{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), str(raw / "labelsTr" / f"case{case}.nii.gz"))
    generate_dataset_json(str(raw), {0: channel}, {"background": 0, **{n: i for i, n in labels.items()}},
                          2, ".nii.gz", dataset_name=raw.name)
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=False)
    plan_experiments([dataset_id])  # nnU-Net's default ExperimentPlanner -> nnUNetPlans.json

    out = home / "nnunet" / "results" / raw.name / f"{trainer}__nnUNetPlans__3d_fullres"
    (out / "fold_0").mkdir(parents=True)
    shutil.copy(work / "preprocessed" / raw.name / "nnUNetPlans.json", out / "plans.json")
    shutil.copy(raw / "dataset.json", out / "dataset.json")
    plans = PlansManager(str(out / "plans.json"))
    dataset_json = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    torch.manual_seed(seed)
    net = nnUNetTrainer.build_network_architecture(
        plans, plans.get_configuration("3d_fullres"), 1,
        plans.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    weights = net.state_dict()
    for k in weights:
        if k.startswith("decoder.seg_layers.") and k.endswith(".bias"):
            weights[k][favour_label] += 50.0
    torch.save({"network_weights": weights, "trainer_name": trainer,
                "init_args": {"plans": plans.plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": dataset_json},
                "inference_allowed_mirroring_axes": None, "current_epoch": 0},
               out / "fold_0" / "checkpoint_final.pth")
    shutil.rmtree(work)
    return out


def oblique_lps_volume(shape=(40, 44, 36)) -> Volume:
    """A small MRI-like volume stored LPS-like (i, j flipped), rotated 17 degrees, 2/2/2.5 mm."""
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[-c, 0, s, 0], [0, -1, 0, 0], [s, 0, c, 0], [0, 0, 0, 1.0]])
    affine = affine @ np.diag([2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = [40.0, 50.0, -30.0]
    rng = np.random.default_rng(1)
    return Volume(rng.normal(100, 20, shape).astype(np.float32), affine, source="oblique_t1")


@pytest.fixture
def ts_home(tmp_path, monkeypatch):
    home = tmp_path / "totalseg_home"
    home.mkdir()
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("nnUNet_raw", str(home / "standin_build" / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(home / "standin_build" / "preprocessed"))
    return home


def test_missing_weights_fail_fast_with_instructions(ts_home):
    backend = get_backend("totalsegmentator")
    vol = oblique_lps_volume()
    with pytest.raises(FileNotFoundError) as e:  # not requests' ConnectionError after a timeout
        backend.segment(vol, "mri_t1")
    msg = str(e.value)
    for needle in ("totalseg_download_weights -t total_fast_mr", "totalseg_import_weights -i ZIP",
                   "TOTALSEG_HOME_DIR", "Dataset852_TotalSegMRI_total_3mm_1088subj"):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="totalseg_download_weights -t total_fast"):
        backend.segment(vol, "ct")
    assert not (ts_home / "nnunet").exists()  # nothing downloaded or created
    assert required_weights("total", fast=False)[0].name.startswith("Dataset291")


def test_licence_missing(ts_home):
    # backend: checked up front from TotalSegmentator's offline licence check
    backend = get_backend("totalsegmentator", task="brain_structures")
    with pytest.raises(PermissionError, match="totalseg_set_license"):
        backend.segment(oblique_lps_volume(), "ct")
    # TotalSegmentator's own sys.exit(1) for a licensed task is caught (no network needed: it
    # happens before any weights are looked for)
    with pytest.raises(PermissionError, match="licence"):
        run_totalsegmentator(oblique_lps_volume().to_nifti(), "brain_structures", fast=False)
    cfg = json.loads((ts_home / "config.json").read_text(encoding="utf-8"))
    assert cfg["send_usage_stats"] is False


def test_task_modality_mismatch():
    with pytest.raises(ValueError, match="total_mr"):
        TotalSegmentatorBackend(task="total").segment(oblique_lps_volume(), "mri_t1")
    with pytest.raises(ValueError, match="PET"):
        TotalSegmentatorBackend().segment(oblique_lps_volume(), "pet")
    with pytest.raises(ValueError, match="task"):
        TotalSegmentatorBackend(task="lungs")


@pytest.mark.slow
def test_total_mr_end_to_end_on_standin_model(ts_home):
    from totalsegmentator.map_to_binary import class_map

    dataset_id, name, trainer = TOTAL_MR_FAST
    folder = build_standin_model(ts_home, dataset_id, name, trainer, class_map["total_mr"], "MR",
                                 favour_label=50)  # 50 = brain in total_mr
    assert required_weights("total_mr", fast=True) == [folder.parents[0]]
    vol = oblique_lps_volume()
    before = vol.array.copy()
    # default backend: TotalSegmentator in a subprocess (spawn-safe without a __main__ guard)
    mask = brain_mask({"mri_t1": vol}, get_backend("totalsegmentator", fast=True, device="cpu"))
    assert np.array_equal(vol.array, before)
    assert mask.shape == vol.shape and np.array_equal(mask.affine, vol.affine)
    assert mask.meta["mask_backend"] == "totalsegmentator"
    assert np.all(mask.array == BRAIN)  # the stand-in's output covers exactly the input grid
    cfg = json.loads((ts_home / "config.json").read_text(encoding="utf-8"))
    assert cfg["send_usage_stats"] is False


def test_label_mapping_of_each_task():
    """TotalSegmentator ids -> ours: total 90/91 -> brain 1 / skull 2, total_mr 50 -> brain 1,
    brain_structures keeps its 16 named ids; other classes are dropped."""
    vol = oblique_lps_volume((6, 5, 4))
    ts = np.zeros(vol.shape, np.int32)
    ts[0], ts[1], ts[2], ts[3] = 90, 91, 50, 7  # brain, skull, (CT) lung_... , other
    backend = TotalSegmentatorBackend()
    ct = backend._to_labelmap(ts, "total", vol)
    assert ct.labels == {1: "brain", 2: "skull"}
    assert (ct.array()[0] == 1).all() and (ct.array()[1] == 2).all() and (ct.array()[2:] == 0).all()
    mr = backend._to_labelmap(ts, "total_mr", vol)
    assert mr.labels == {1: "brain"} and mr.brain().sum() == ts[2].size and mr.brain()[2].all()
    bs = backend._to_labelmap(ts, "brain_structures", vol)
    assert bs.labels[7] == "lentiform_nucleus" and len(bs.labels) == 16
    assert bs.brain()[3].all() and not bs.brain()[:3].any()  # 90/91/50 are not brain_structures ids
    assert np.array_equal(bs.volume.affine, vol.affine)
