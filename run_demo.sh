#!/usr/bin/env bash
# README command (a): install everything and run the main job.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
.venv/bin/clinfusediff demo "$@"
