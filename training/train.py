"""Headless training entry point: ``python training/train.py --config Resources/Configs/demo.yaml
[overrides]``. The same code path as ``clinfusediff train`` (this script only calls it); works
under ``torchrun --standalone --nproc_per_node=N training/train.py ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ClinFuseDiffCore.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
