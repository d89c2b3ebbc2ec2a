#!/usr/bin/env bash
# The test suite: set-up (scripts/bootstrap.sh --test: torch if missing, pytest, timm and
# transformers for the parity tests), then pytest. Without a CUDA GPU, tests/conftest.py sets
# TRITON_INTERPRET=1 so the Triton kernels run on CPU, and the CUDA C++ kernels run on the vkemu
# CPU emulator (tests/cuda_emu, needs g++ and the CUDA headers); GPU tests (marked gpu) skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
exec "${PYTHON:-python3}" -m pytest -q "$@"
