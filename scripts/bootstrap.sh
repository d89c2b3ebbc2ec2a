#!/usr/bin/env bash
# Installs what vitkernels needs into the current Python. A machine that already has torch keeps it
# (a CUDA torch on a GPU machine, say): nothing here ever replaces or upgrades an installed torch.
#
# Without torch, it installs torch ${VITKERNELS_TORCH_VERSION:-2.14.1} with the torchvision of the
# same release (the pair timm needs to import; a CUDA build that also runs on CPU).
# VITKERNELS_TORCH_VERSION=2.13.0 takes the CPU-only wheel instead, without torchvision (then the
# timm / transformers parity tests skip).
#
#   bash scripts/bootstrap.sh          # the package and its runtime dependencies
#   bash scripts/bootstrap.sh --test   # + pytest and the parity-test dependencies (timm, transformers)
#
# The package is installed editable against that torch (--no-build-isolation). Its CUDA extension
# is compiled only where it can run (a GPU is visible) or when VITKERNELS_SKIP_CUDA_BUILD=0 asks for
# it; elsewhere the tests run the CUDA C++ kernels on the vkemu CPU emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TEST=0
[[ "${1:-}" == "--test" ]] && TEST=1
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  version=${VITKERNELS_TORCH_VERSION:-2.14.1}
  case "$version" in
    2.13.0) pip_install "torch==2.13.0" ;;  # the CPU wheel; torchvision has no matching CPU build here
    2.14.1) pip_install "torch==2.14.1" "torchvision==0.29.1" ;;
    *) pip_install "torch==$version" ;;
  esac
fi

# Every later install is constrained to the torch now present, so no dependency can swap it.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# (the distribution's version: torch.__version__ may carry a local label, e.g. +cu130, that pip's
# metadata for the installed wheel does not.)
"$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$constraints"

need=()
for mod in triton:triton ninja:ninja numpy:numpy packaging:packaging; do
  "$PY" -c "import ${mod%%:*}" 2>/dev/null || need+=("${mod##*:}")
done
if [[ $TEST == 1 ]]; then
  for mod in pytest:pytest timm:timm transformers:transformers matplotlib:matplotlib; do
    "$PY" -c "import ${mod%%:*}" 2>/dev/null || need+=("${mod##*:}")
  done
fi
if (( ${#need[@]} )); then
  pip_install -c "$constraints" "${need[@]}" || {
    # timm needs a torchvision built for this torch; without one the parity tests skip (and say why).
    echo "[bootstrap] could not install all of: ${need[*]}; retrying without timm" >&2
    need=("${need[@]/timm/}")
    pip_install -c "$constraints" ${need[@]}
  }
fi

if [[ -z "${VITKERNELS_SKIP_CUDA_BUILD:-}" ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  export VITKERNELS_SKIP_CUDA_BUILD=1  # no GPU: the extension could not run here
fi
# --no-deps: the dependencies were settled above; this must never resolve torch again.
pip_install --no-build-isolation --no-deps -e .
