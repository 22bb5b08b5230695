#!/usr/bin/env bash
# README command (b): install everything (with the test, brain-extraction, TotalSegmentator and
# real-data benchmark extras; the benchmark's GPL packages are test/benchmark-only, never a
# runtime dependency) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh test,brain,totalseg,benchmark
scripts/install_web.sh  # slicer-core, trame-slicer, playwright, chromium: Testing/slicer on real MRML and in a browser
.venv/bin/python -m pytest Testing "$@"
