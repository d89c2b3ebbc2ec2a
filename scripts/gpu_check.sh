#!/usr/bin/env bash
# One command for a lent GPU: build the CUDA extension, print the device report and the self-check,
# then run the whole test suite (GPU tests included). Logs go to $OUT (default ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16}
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -m vitkernels.info --check 2>&1 | tee "$OUT/info.log"
python -m pytest -q -x --junitxml="$OUT/tests.xml" "$@" 2>&1 | tee "$OUT/tests.log" | tail -40
exit "${PIPESTATUS[0]}"
