#!/usr/bin/env bash
# The main job on whatever device is here: set-up, then versions / GPU / backends per op and the
# correctness self-check of every op and backend that can run on this device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Without a CUDA build of torch, the Triton kernels are checked in the interpreter on CPU tensors.
if ! "${PYTHON:-python3}" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
fi
exec "${PYTHON:-python3}" -m vitkernels.info --check "$@"
