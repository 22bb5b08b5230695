#!/usr/bin/env bash
# Install ClinFuseDiff into ./.venv (created if absent). Usage: scripts/install.sh [EXTRAS]
#   EXTRAS: pip extras, e.g. "test,brain,totalseg" (default: none).
# torch: if the environment already has one (your CUDA/ROCm/CPU build), it is kept. Otherwise the
# CPU wheel torch==2.13.0 is installed first, so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
# Pin the torch already installed, so no extra (TotalSegmentator, deepbet) swaps it for another.
if [[ ",$extras," == *",totalseg,"* ]]; then
  # TotalSegmentator pulls torchvision (through timm); pin the release built for this torch
  # (torch 2.MINOR <-> torchvision 0.(MINOR+15): 2.13 -> 0.28), or pip replaces torch. Beside a
  # CPU-only torch, PyPI's torchvision may fail to import ("torchvision::nms does not exist");
  # ClinFuseDiff's TotalSegmentator backend never imports it, so that is harmless.
  TORCH_MINOR=$(echo "$TORCH_VERSION" | cut -d. -f2)
  python -m pip install -q -e "$spec" "torch==${TORCH_VERSION}" "torchvision==0.$((TORCH_MINOR + 15)).*"
  # A torchvision that cannot import is worse than none: torchmetrics (and torchsurv through it)
  # import it whenever it is installed and then fail. Remove it in that case; TotalSegmentator's
  # path through ClinFuseDiff never needs it (tested by Testing/data/test_totalsegmentator.py).
  if ! python -c "import torchvision" >/dev/null 2>&1; then
    echo "torchvision does not import beside torch ${TORCH_VERSION}; uninstalling it (not needed)"
    python -m pip uninstall -q -y torchvision
  fi
else
  python -m pip install -q -e "$spec" "torch==${TORCH_VERSION}"
fi
python -c "import torch, ClinFuseDiffCore; print('installed ClinFuseDiffCore', ClinFuseDiffCore.__version__, 'with torch', torch.__version__)"
