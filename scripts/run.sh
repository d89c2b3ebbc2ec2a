#!/usr/bin/env bash
# The main job on whatever device is here: set-up, the device report, the correctness check of every
# op x fused backend, then the op benchmarks (real-model shapes on a GPU; tiny shapes, labelled
# "CPU timing", on a CPU). Results land in out/ (JSON + CSV). Extra args go to `vitkernels-bench ops`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=${PYTHON:-python3}
# Without a CUDA build of torch, the Triton kernels are checked in the interpreter on CPU tensors.
if ! "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
fi
mkdir -p out
"$PY" -m vitkernels.info
"$PY" -m vitkernels.bench check --quick
"$PY" -m vitkernels.bench ops --json out/ops.json --csv out/ops.csv --no-progress "$@"
