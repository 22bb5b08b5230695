#!/usr/bin/env bash
# Reproduce docs/RESULTS.md: the main job, then experiments (a)+(d), (b) and (c), sequentially
# (each is CPU-heavy; run them one after another). Outputs under outputs/.
# Usage: bash training/demo_experiments/run_all.sh [BASE_DIR]   (default BASE_DIR=outputs/demo)
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE="${1:-outputs/demo}"
uptime
/usr/bin/time -v clinfusediff demo --out "$BASE" --seeds 3 2> "$BASE.time" || { cat "$BASE.time"; exit 1; }
grep -E "Elapsed|User time|System time" "$BASE.time"
python training/demo_experiments/run_experiment.py main   --base "$BASE" --out outputs/experiments/main
python training/demo_experiments/run_experiment.py unseen --base "$BASE" --out outputs/experiments/unseen
python training/demo_experiments/run_experiment.py site   --base "$BASE" --out outputs/experiments/site
uptime
