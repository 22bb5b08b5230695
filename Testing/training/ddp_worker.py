"""Run by test_ddp.py under ``torchrun --standalone --nproc_per_node=2``: train on a tiny
tabular cohort with gloo, then dump this rank's final parameters for the test to compare."""

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from train_cohorts import tabular_config

from ClinFuseDiffCore.training.trainer import train

root, out, dump = (Path(a) for a in sys.argv[1:4])
torch.set_num_threads(1)
cfg = tabular_config(root, ["training.epochs=2", "model.fusion=attention", "training.batch_size=3"])
result = train(cfg, out, show_progress=False)
dump.mkdir(parents=True, exist_ok=True)
torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()},
           dump / f"rank{os.environ['RANK']}.pt")
