#!/usr/bin/env bash
# Set up megaloop in ./.venv: `./setup.sh` (runtime) or `./setup.sh --dev` (plus test tools).
# On a machine that already has torch (e.g. a GPU cluster with a CUDA build) the venv reuses it
# through --system-site-packages; elsewhere torch is pinned to 2.13.0 (CPU build on this kind of
# machine: an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the torch already installed for $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
TORCH_VERSION=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
# Constrain every later install to the torch we have, so no dependency can swap it.
echo "torch==${TORCH_VERSION}" > .venv/torch-constraint.txt
export DS_BUILD_OPS=0   # DeepSpeed: no C++/CUDA op builds at install time
$PIP install -q -c .venv/torch-constraint.txt -e ".${extras}"
echo "setup: done (torch ${TORCH_VERSION}); activate with: source .venv/bin/activate"
