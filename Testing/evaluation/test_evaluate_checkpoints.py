"""The evaluation on real (tiny) checkpoints: checkpoint resolution, methods, default metrics."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "ttt"))
from test_inference import write_checkpoint  # noqa: E402

from ClinFuseDiffCore.evaluation import protocol as P  # noqa: E402
from ClinFuseDiffCore.inference import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    for f in ("mean", "diffusion"):
        (root / f).mkdir()
        write_checkpoint(root / f / "best.pt", fusion=f)
    return root


def test_resolve_checkpoints_forms(run_dir, tmp_path):
    runs = P.resolve_checkpoints([str(run_dir)])
    assert runs == [{"mean": run_dir / "mean" / "best.pt", "diffusion": run_dir / "diffusion" / "best.pt"}]
    named = P.resolve_checkpoints([f"base={run_dir / 'mean' / 'best.pt'}", str(run_dir / "diffusion" / "best.pt")])
    assert sorted(named[0]) == ["base", "diffusion"]
    assert len(P.resolve_checkpoints([str(run_dir), str(run_dir)])) == 2  # two runs = two seeds
    with pytest.raises(FileNotFoundError, match="best.pt"):
        P.resolve_checkpoints([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no such file"):
        P.resolve_checkpoints([str(tmp_path / "nope.pt")])
    with pytest.raises(ValueError, match="two checkpoints"):
        d = str(run_dir / "diffusion" / "best.pt")
        P.resolve_checkpoints([d, d])


def test_all_subsets_with_real_models_and_metrics(run_dir):
    prs = {n: Predictor.from_checkpoint(run_dir / n / "best.pt") for n in ("mean", "diffusion")}
    g = torch.Generator().manual_seed(0)
    P_, M = 6, 4
    tokens = torch.randn(P_, M, 16, generator=g)
    enc = {n: {"tokens": tokens} for n in prs}
    pav = torch.ones(P_, M, dtype=torch.bool)
    pav[0, 2] = False  # a patient really lacking ct
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    methods = {s: P.methods_for_run(prs, enc, samples=2, chunk_size=32) for s in (0, 1)}
    res = P.evaluate_all_subsets(methods, pav, P.Targets("classification", target), prs["mean"].modalities)
    assert res["methods"] == ["mean", "diffusion", "diffusion+ttt"]
    assert len(res["subsets"]) == 15
    full = res["per_subset"]["diffusion"]["mri_t1+mri_t2+ct+clinical"]
    assert set(full["metrics"]) == {"auroc", "balanced_accuracy", "ece", "brier"}
    assert full["n_patients"] == 6 and full["n_complete"] == 5
    assert res["per_subset"]["mean"]["ct"]["n_patients"] == 5  # patient 0 has no ct
    ex = res["method_extra"]["diffusion+ttt"]
    # 15 subsets x 6 patients minus patient 0's duplicates (7 subsets containing ct reduce to
    # ones without it, 1 subset ("ct") is skipped) = 90 - 8 = 82 episodes per seed
    assert ex["episodes"] == 2 * 82
    assert 0 <= ex["accepted"] <= ex["episodes"]
    # mean fusion is deterministic: identical numbers for both seeds
    m = res["per_subset"]["mean"]["mri_t1"]["metrics"]["brier"]
    assert m["std"] == 0.0
    # diffusion and diffusion+ttt share noise: where no update was kept they are identical
    assert "diffusion+ttt - diffusion" in res["comparisons"]
    # K = 2 diffusion samples differ (spread > 0 at every subset size); mean fusion has none
    unc = res["uncertainty_by_size"]
    assert sorted(unc["diffusion"]) == ["1", "2", "3", "4"]
    assert all(v["mean"] > 0 for v in unc["diffusion"].values())
    assert unc["mean"] == {}


@pytest.mark.parametrize("kw, match", [({"seeds": 0}, "--seeds must be >= 1, got 0"),
                                       ({"chunk_size": 0}, "--chunk-size must be >= 1, got 0"),
                                       ({"samples": 0}, "--samples must be >= 1, got 0"),
                                       ({"part": "train"}, "part 'train' not in")])
def test_evaluate_checkpoints_rejects_bad_settings_before_writing(run_dir, tmp_path, kw, match):
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=match):
        P.evaluate_checkpoints([str(run_dir)], out, **kw)
    assert not out.exists()  # nothing written
