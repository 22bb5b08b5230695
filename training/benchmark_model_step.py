"""Headless entry point: ``python training/benchmark_model_step.py [options]`` runs
``ClinFuseDiffCore/benchmark/model_step.py`` (see its docstring for the options and what it measures)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ClinFuseDiffCore.benchmark.model_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
