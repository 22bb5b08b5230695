"""Smoke test of the main job: ``clinfusediff demo --quick`` end to end on real generated files."""

from __future__ import annotations

import json

import numpy as np

from ClinFuseDiffCore.cli import main
from ClinFuseDiffCore.training.checkpoint import load_checkpoint


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--out", str(out), "--seeds", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out

    # Training: encoders once, then the three fusions (two-stage).
    for name in ("encoders", "mean", "attention", "diffusion"):
        assert (out / "train" / name / "best.pt").is_file(), name

    # Evaluation: every non-empty subset of the 4 quick modalities, every method, both seeds.
    res = json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    assert len(res["subsets"]) == 2**4 - 1
    assert set(res["methods"]) == {"mean", "attention", "diffusion", "diffusion+ttt"}
    assert res["seeds"] == [0, 1]
    for m in res["methods"]:
        full = res["summary"][m]["auroc"]["full"]["mean"]
        assert 0.0 <= full <= 1.0

    # Inference: one test patient, one modality removed, the three files.
    split = json.loads((out / "train" / "split.json").read_text(encoding="utf-8"))
    pred = json.loads((out / "inference" / "prediction.json").read_text(encoding="utf-8"))
    assert pred["patient_id"] in split["test"]
    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    dropped = summary["inference"]["dropped"]
    assert dropped in pred["modalities"]["missing"] and dropped not in pred["modalities"]["used"]
    probs = list(pred["prediction"]["probabilities"].values())
    assert np.isclose(sum(probs), 1.0, atol=1e-4)
    # The default is attention with the token imputer (the research experiment's winner): the
    # dropped modality's token is imputed, and TTT is not used with it.
    assert summary["inference"]["fusion"] == "attention"
    assert pred["modalities"]["imputed"] == [dropped] and pred["ttt"]["used"] is False
    ck = load_checkpoint(out / "train" / "attention" / "best.pt")
    assert bool(ck["model"]["imputer.fitted"]) and "imputer.fitted" not in load_checkpoint(
        out / "train" / "encoders" / "best.pt")["model"]
    from ClinFuseDiffCore.outputs import read_segmentation

    seg, labels, _ = read_segmentation(out / "inference" / pred["segmentation"]["file"])
    assert "brain" in labels.values() and (seg.array > 0).any()
    assert (out / "inference" / "report.png").stat().st_size > 1000

    assert set(summary["seconds"]) >= {"generate", "preprocess", "train", "evaluate", "infer", "total"}
    assert "diffusion+ttt" in printed and str(out / "inference" / "prediction.json") in printed


def test_demo_rejects_bad_seeds(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--seeds", "0"]) == 1
    assert not (tmp_path / "d" / "train").exists()
