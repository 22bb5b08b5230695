"""Select the way you evaluate: the mean-over-subsets validation monitor and training.selection."""

import pytest
import torch
from train_cohorts import tabular_config, write_tabular_cohort

from ClinFuseDiffCore.training.checkpoint import load_checkpoint
from ClinFuseDiffCore.training.trainer import mean_over_subsets, train


def _additive_predict(tokens, available):
    """Class-1 logit = sum of the first token entry of the available modalities (class-0 logit 0)."""
    score = (tokens[..., 0] * available.float()).sum(-1)  # (N,)
    return torch.stack([torch.zeros_like(score), score], -1)  # (N, 2)


def test_mean_over_subsets_known_answer():
    # 2 modalities (a, b), 5 patients; the last one lacks b.
    a = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    tokens = torch.stack([a, b], -1)[..., None].repeat(1, 1, 3)  # (P=5, M=2, E=3)
    present = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    target = torch.tensor([0, 1, 0, 1, 1])
    mean, per = mean_over_subsets(_additive_predict, tokens, present, "classification", target)
    # {a}: all 5 patients, scores a = [0,1,0,1,2] -> perfect ranking, AUROC 1
    # {b}: patients 0-3 only, scores b = [1,0,1,0] vs y [0,1,0,1] -> AUROC 0
    # {a,b}: patients 0-3 score a+b = 1 (ties, AUROC 0.5 among them), patient 4 scores a = 2 ->
    #        positives {1,3,4} vs negatives {0,2}: pairs 2x3 = 6, wins 2 (patient 4), ties 4 -> 4/6
    assert per == {"0": pytest.approx(1.0), "1": pytest.approx(0.0), "0+1": pytest.approx(4 / 6)}
    assert mean == pytest.approx((1.0 + 0.0 + 4 / 6) / 3)
    # a subset whose metric is undefined (one class) is left out of the mean
    one_class = torch.tensor([0, 0, 0, 0, 1])
    mean1, per1 = mean_over_subsets(_additive_predict, tokens, present, "classification", one_class)
    assert "1" not in per1 and mean1 == pytest.approx((per1["0"] + per1["0+1"]) / 2)
    # survival: C-index of the risk in column 0, regression: MAE
    time = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    event = torch.ones(5)
    m_s, per_s = mean_over_subsets(lambda t, av: _additive_predict(t, av)[:, 1:], tokens, present,
                                   "survival", time, time, event)
    assert set(per_s) == {"0", "1", "0+1"} and 0.0 <= m_s <= 1.0
    m_r, per_r = mean_over_subsets(lambda t, av: _additive_predict(t, av)[:, 1:], tokens, present,
                                   "regression", torch.zeros(5))
    assert per_r["0"] == pytest.approx(a.abs().mean().item()) and per_r["1"] == pytest.approx(0.5)


def test_subset_monitor_in_training_and_last_selection(tmp_path):
    root = write_tabular_cohort(tmp_path / "cohort")
    cfg = tabular_config(root, ["training.epochs=3", "model.fusion=diffusion",
                                "training.monitor=val_mean_subsets_auroc"])
    r = train(cfg, tmp_path / "sub", show_progress=False)
    vals = [h["val_mean_subsets_auroc"] for h in r.history]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert r.best_metric == max(vals) and r.history[r.best_epoch - 1]["val_mean_subsets_auroc"] == r.best_metric
    # deterministic readout: the same weights give the same monitor value
    again = train(cfg, tmp_path / "sub2", show_progress=False)
    assert [h["val_mean_subsets_auroc"] for h in again.history] == vals

    # selection=last: fixed schedule, best.pt is the final epoch, no early stopping even with a
    # monitor that never improves (lr 0) and patience 0
    cfg_last = tabular_config(root, ["training.epochs=4", "training.lr=0.0", "model.fusion=mean",
                                     "training.early_stopping_patience=0", "training.monitor=val_loss",
                                     "training.selection=last"])
    last = train(cfg_last, tmp_path / "last", show_progress=False)
    assert len(last.history) == 4 and last.best_epoch == 4
    best_ck, last_ck = load_checkpoint(last.best_path), load_checkpoint(last.last_path)
    assert best_ck["epoch"] == last_ck["epoch"] == 4
    assert last.best_metric == last.history[-1]["val_loss"]
    # the same run with selection=best stops early (the control: the assertion above can fail)
    best = train(tabular_config(root, ["training.epochs=4", "training.lr=0.0", "model.fusion=mean",
                                       "training.early_stopping_patience=0", "training.monitor=val_loss"]),
                 tmp_path / "best", show_progress=False)
    assert len(best.history) < 4 and load_checkpoint(best.best_path)["epoch"] == 1


def test_encoder_monitor_is_validated(tmp_path):
    root = write_tabular_cohort(tmp_path / "cohort")
    bad = tabular_config(root, ["training.epochs=1", "training.encoder_monitor=val_c_index"])
    with pytest.raises(ValueError, match="training.encoder_monitor"):
        train(bad, tmp_path / "bad", show_progress=False)


def test_cv_selection_picks_the_epoch_count_from_the_fold_mean(tmp_path, caplog):
    """Issue 14 item 5: on a few dozen validation patients the chosen epoch is noise; selection=cv
    chooses the epoch count on K folds of train + validation, then trains a fixed schedule."""
    import json
    import logging

    import numpy as np

    from ClinFuseDiffCore.training.trainer import train_with_selection

    root = write_tabular_cohort(tmp_path / "cohort", n=32)
    cfg = tabular_config(root, ["training.epochs=4", "model.fusion=mean", "training.monitor=val_auroc",
                                "training.selection=cv", "training.cv_folds=3", "training.lr=1e-2"])
    with pytest.raises(ValueError, match="train_with_selection"):
        train(cfg, tmp_path / "direct", show_progress=False)
    with caplog.at_level(logging.INFO, logger="ClinFuseDiffCore"):
        r = train_with_selection(cfg, tmp_path / "cv", show_progress=False)
    sel = json.loads((tmp_path / "cv" / "cv_selection.json").read_text(encoding="utf-8"))
    curves = np.array(sel["fold_curves"], dtype=float)  # (3 folds, 4 epochs)
    assert curves.shape == (3, 4) and sel["folds"] == 3
    np.testing.assert_allclose(sel["mean_curve"], np.nanmean(curves, 0))
    assert sel["chosen_epochs"] == int(np.nanargmax(np.nanmean(curves, 0))) + 1
    # the final model ran exactly the chosen number of epochs, fixed schedule
    assert len(r.history) == sel["chosen_epochs"] == r.best_epoch
    # folds cover train + validation exactly once each, never the test part
    split = json.loads((tmp_path / "cv" / "split.json").read_text(encoding="utf-8"))
    seen = []
    for f in range(1, 4):
        fs = json.loads((tmp_path / "cv" / "cv" / f"fold_{f}" / "split.json").read_text(encoding="utf-8"))
        assert not set(fs["val"]) & set(split["test"]) and not set(fs["train"]) & set(split["test"])
        seen += fs["val"]
    assert sorted(seen) == sorted(split["train"] + split["val"])
    assert any("cv selection: val_auroc mean over 3 folds" in m for m in caplog.messages)


def test_small_validation_split_is_said(tmp_path, caplog):
    import logging

    root = write_tabular_cohort(tmp_path / "cohort")
    cfg = tabular_config(root, ["training.epochs=1", "model.fusion=mean", "training.monitor=val_auroc"])
    with caplog.at_level(logging.INFO, logger="ClinFuseDiffCore"):
        train(cfg, tmp_path / "run", show_progress=False)
    warned = [m for m in caplog.messages if "validation split has only 6 patients" in m]
    assert len(warned) == 1 and "training.selection=cv" in warned[0] and "the default is best" in warned[0]
    assert any(m.startswith("selection: training.selection=best on val_auroc (6 validation") for m in caplog.messages)
