"""Performance benchmark (issue 7): ``python training/benchmark.py [--config demo] [--out DIR]
[--quick] [--run RUN_DIR] [--device cuda]``. Prints a table and writes ``<out>/benchmark.json``.
The same code path as ``clinfusediff benchmark`` (this script only calls it); the measurements
are described in ``ClinFuseDiffCore/benchmark/`` and ``docs/BENCHMARK.md``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ClinFuseDiffCore.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
