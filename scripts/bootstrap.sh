#!/usr/bin/env bash
# Installs what vitkernels needs into the current Python, never pulling CUDA wheels onto a machine
# without them: torch is installed only when missing, and then as the pinned CPU wheel
# (a bare `pip install torch` would pull several GB of CUDA packages). A machine that already has a
# (CUDA) torch keeps it. Then the package itself, built against that torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==${VITKERNELS_TORCH_VERSION:-2.13.0}"
fi
for mod in triton:triton ninja:ninja pytest:pytest numpy:numpy packaging:packaging; do
  "$PY" -c "import ${mod%%:*}" 2>/dev/null || pip_install "${mod##*:}"
done
# --no-deps: the dependencies were settled above; this must never resolve torch again.
pip_install --no-build-isolation --no-deps -e .
