#!/usr/bin/env bash
# The test suite: set-up, then pytest. Without a CUDA build of torch, tests/conftest.py sets
# TRITON_INTERPRET=1 so the Triton kernels run on CPU, and the CUDA C++ kernels run on the vkemu
# CPU emulator (tests/cuda_emu, needs g++ and the CUDA headers); GPU tests (marked gpu) skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
