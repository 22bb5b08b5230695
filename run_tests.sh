#!/usr/bin/env bash
# README command (b): install everything (with the test, brain-extraction and TotalSegmentator
# extras) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh test,brain,totalseg
.venv/bin/python -m pytest Testing "$@"
