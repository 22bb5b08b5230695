"""One epoch convention everywhere (issue 14, item 7): epochs are numbered from 1 in the log
lines, history.json, the checkpoints and the train summary."""

import json
import logging

from train_cohorts import tabular_config, write_tabular_cohort

from ClinFuseDiffCore.training.checkpoint import load_checkpoint
from ClinFuseDiffCore.training.trainer import train


def test_best_epoch_matches_its_log_line_history_and_checkpoint(tmp_path, caplog):
    root = write_tabular_cohort(tmp_path / "cohort")
    cfg = tabular_config(root, ["training.epochs=3", "model.fusion=mean", "training.monitor=val_loss"])
    with caplog.at_level(logging.INFO, logger="ClinFuseDiffCore.training.trainer"):
        r = train(cfg, tmp_path / "run", show_progress=False)
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert 1 <= r.best_epoch <= 3
    best = r.history[r.best_epoch - 1]
    assert best["epoch"] == r.best_epoch and best["val_loss"] == r.best_metric
    # the log line that names the best epoch carries the best value, and no second epoch number
    line = [m for m in caplog.messages if m.startswith(f"epoch {r.best_epoch}/3:")]
    assert len(line) == 1 and f"val_loss={r.best_metric:.4g}" in line[0], caplog.messages
    assert "epoch=" not in line[0]
    assert load_checkpoint(r.best_path)["epoch"] == r.best_epoch
    assert load_checkpoint(r.last_path)["epoch"] == 3
    on_disk = json.loads((tmp_path / "run" / "history.json").read_text(encoding="utf-8"))
    assert [h["epoch"] for h in on_disk] == [1, 2, 3]
