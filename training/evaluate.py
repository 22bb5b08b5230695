"""Headless evaluation entry point: ``python training/evaluate.py --checkpoint RUN_DIR [--data ROOT]
[--seeds 3] [--out DIR]``. The same code path as ``clinfusediff evaluate`` (this script only calls
it)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ClinFuseDiffCore.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
