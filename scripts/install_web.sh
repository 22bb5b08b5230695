#!/usr/bin/env bash
# Install what the Slicer-side tests and the web app need, into ./.venv (made by scripts/install.sh):
#   - slicer-core + trame-slicer (Kitware, Apache-2.0): trame-slicer[standalone]==2.0.0 pins one
#     consistent set (slicer-core 5.11.0.x, vtk 9.6.0) -> pyproject extra [web];
#   - playwright (the Python driver only; never `playwright install`, which downloads a browser)
#     -> pyproject extra [webtest];
#   - Debian's chromium and the EGL/GL libraries for headless rendering (apt-get, when root).
# The packages the core depends on are pinned to what is installed, so nothing else moves.
# Note: TotalSegmentator's optional preview dependency fury wants vtk<9.4; pip reports that
# conflict, and ClinFuseDiff never imports fury (TotalSegmentator imports it only for previews).
# Without root or apt, the system part is skipped with a message; those tests then skip.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/install.sh first (no .venv)"; exit 1; }
PY=.venv/bin/python

apt_pkgs=(chromium libegl1 libegl-mesa0 libgl1)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (apt-get)"
    apt-get update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n apt-get update -q >/dev/null || true
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "WARNING: ${missing[*]} not installed (needs root/apt): the browser tests will skip"
  fi
fi

pins=()
for dist in torch numpy scipy pandas scikit-learn monai nibabel SimpleITK; do
  v=$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || true)
  [ -n "$v" ] && pins+=("$dist==$v")
done
if ! "$PY" -c "import slicer, trame_slicer, playwright; slicer.vtkMRMLScene()" >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[web,webtest]" "${pins[@]}" 2>&1 | grep -v "fury 0.12.0 requires vtk" || true
fi
"$PY" -c "import slicer, trame_slicer, vtk; slicer.vtkMRMLScene(); print('slicer-core + trame-slicer ready (vtk', vtk.__version__ + ')')"
