#!/usr/bin/env bash
# One command for a lent GPU: install the package (building the CUDA extension), run the GPU tests,
# the correctness sweep and the benchmarks, and leave logs and results JSON under OUT.
#
#   bash bench/gpu_suite.sh [OUT_DIR] [--part tests|ops|kernels|switches|compile|flex|models|hf|all] [--quick] [--no-install]
#   bash bench/gpu_suite.sh [OUT_DIR] --part proof [--dry-run] [--deadline S] [--steps A,B] [--skip A,B]
#
# --part proof hands over to bench/gpu_proof.py (its other arguments go with it): the one-call GPU
# proof for a 15-minute device session. Build for this card, CUDA C++ and Triton GPU tests, check,
# the headline op cases and 3 models (AMP) in ONE command of at most 9 minutes, at most 8 files under
# OUT, every step under its own timeout; a tiny CPU dry run without a GPU. See docs/benchmarks.md,
# "One-call GPU proof". The parts below were cut for 30-minute sessions.
#
# OUT_DIR defaults to $OUT (set on the lent machines), else ./out. Each part but `all` fits in one
# 10-minute call (install included); kernels and switches write one JSON per run, the others at most 5 files:
#   tests    pytest -m gpu: the CUDA C++ kernel tests, then the rest of tests/ (the Triton kernels);
#            then `vitkernels-bench check` (every dtype)
#   ops      `ops` on every case in bf16 (vitkernels, eager, sdpa and each SDPA backend), then the
#            representative cases in fp16 and fp32; peaks measured on the card
#   kernels  one kernel against another, bf16: every op forward on the forced "cuda" backend (the
#            CUDA C++ kernels, next to the Triton ones of `ops`), sr_attention on the general
#            FlashAttention kernels (VITKERNELS_SR_KERNEL=general) next to its N >> M kernels, mix_ffn
#            fused vs composite
#   switches each later kernel against the one it replaced (its switch), bf16, one JSON per run: the
#            attention backward split vs single-kernel (VITKERNELS_ATTN_BWD_KERNEL), the time axis
#            packed vs general (VITKERNELS_ATTN_PACKED), the CUDA window_attention forward v2 vs v1
#            (VITKERNELS_WINDOW_CUDA_KERNEL), the CUDA attention forward v2 vs v1 (VITKERNELS_ATTN_CUDA_KERNEL),
#            the dwconv backward v2 vs v1 (VITKERNELS_DWCONV_KERNEL),
#            the attention forward and backward through TMA descriptors vs pointers
#            (VITKERNELS_ATTN_TMA) and the window / sr / xca grids from the compiled kernel's
#            occupancy vs fixed (VITKERNELS_GRID)
#   compile  `ops` representative cases, bf16: vitkernels vs torch.compile of the eager composition
#   flex     `ops` representative cases, bf16: vitkernels vs compiled FlexAttention
#   models   `models` (every model in vitkernels.models), bf16 mixed precision (AMP: float32 weights,
#            autocast): vitkernels and timm eager, then torch.compile of timm for a few models
#   hf       `models` vs Hugging Face transformers (bf16 AMP): every model with a transformers
#            counterpart as hf-eager, hf-sdpa and hf+patch_hf next to vitkernels
#   all      every part in turn (longer than one call: for machines without the 10-minute limit)
# --quick shrinks every part to a smoke test (about a minute of benchmarking each).
# Each benchmark step has a time budget (--budget) and a hard timeout; results are written after every
# case, so a step that is cut off still leaves its JSON.
#
# Results files are named <gpu>-<date>-<short sha>-<part>.json. The commit comes from git, or from
# $VITKERNELS_COMMIT when the tree is a copy without .git (the lent machines): run with
#   VITKERNELS_COMMIT=<full sha of the commit under test> bash bench/gpu_suite.sh --part ops
# Then, on the development machine (see docs/benchmarks.md, "Committing results"):
#   vitkernels-bench report <fetched dir>/*.json --merge bench/results --markdown docs/benchmarks.md
set -u
cd "$(dirname "$0")/.."

# --part proof: bench/gpu_proof.py takes over with the other arguments (its own timeouts and files).
ARGS=("$@")
REST=()
PROOF=0
i=0
while [ "$i" -lt "${#ARGS[@]}" ]; do
  a=${ARGS[$i]}
  if [ "$a" = "--part" ] && [ "${ARGS[$((i + 1))]:-}" = proof ]; then PROOF=1; i=$((i + 2)); continue; fi
  if [ "$a" = "--part=proof" ]; then PROOF=1; i=$((i + 1)); continue; fi
  REST+=("$a")
  i=$((i + 1))
done
if [ "$PROOF" = 1 ]; then
  exec "${PYTHON:-python3}" bench/gpu_proof.py ${REST[@]+"${REST[@]}"}
fi

PART=all
QUICK=0
INSTALL=1
OUT_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --part) PART="${2:-}"; shift 2 ;;
    --part=*) PART="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT_ARG="$1"; shift ;;
  esac
done
case "$PART" in tests|ops|kernels|switches|compile|flex|models|hf|all) ;; *) echo "gpu_suite.sh: --part must be proof, tests, ops, kernels, switches, compile, flex, models, hf or all" >&2; exit 2 ;; esac

OUT=${OUT_ARG:-${OUT:-out}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
# On a GPU the CUDA extension must be there: its tests fail (not skip) if it did not build.
export VITKERNELS_REQUIRE_CUDA_EXT=${VITKERNELS_REQUIRE_CUDA_EXT:-1}
if [ -z "${VITKERNELS_COMMIT:-}" ]; then
  VITKERNELS_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export VITKERNELS_COMMIT
FAILED=0

# run LOG LIMIT CMD...: stdout to the terminal and LOG, stderr (progress lines) to LOG only,
# killed after LIMIT seconds.
run() {
  local log=$1 limit=$2
  shift 2
  echo "+ $*" | tee -a "$log"
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" 2>>"$log" | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "  -> rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
  [ "$rc" = 0 ] || FAILED=1
  return 0
}

if [ "$INSTALL" = 1 ]; then
  if [ -z "${VITKERNELS_CUDA_ARCHS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    # build for this card only (half the nvcc time of the default "80;90a")
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    case "$cc" in
      90) export VITKERNELS_CUDA_ARCHS=90a ;;
      "") ;;
      *) export VITKERNELS_CUDA_ARCHS=$cc ;;
    esac
  fi
  echo "+ pip install --no-build-isolation --no-deps -e . (archs ${VITKERNELS_CUDA_ARCHS:-default}; log $OUT/build.log)"
  t0=$SECONDS
  if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "gpu_suite.sh: install failed (see $OUT/build.log)"
    exit 1
  fi
  echo "  -> installed in $((SECONDS - t0))s"
fi

NAME=$($PY -c "from vitkernels.bench import results as r; import torch; \
print(r.standard_name(r.metadata('cuda' if torch.cuda.is_available() else 'cpu'))[:-5])" 2>/dev/null || echo "unknown-run")
BENCH="$PY -m vitkernels.bench"
echo "results prefix: $OUT/$NAME (commit $VITKERNELS_COMMIT)"

part_tests() {
  local log="$OUT/tests.log"
  nvidia-smi >>"$log" 2>&1
  run "$log" 60 $PY -m vitkernels.info
  # The CUDA C++ kernels first (never executed before the first GPU run), then the Triton kernel
  # modules (marked gpu on a GPU; every autotune config included), so that a timeout in the
  # second step still leaves the first step's answer in the log.
  if [ "$QUICK" = 1 ]; then
    run "$log" 150 $PY -m pytest -q -x -m gpu tests/cuda/test_cuda_*.py
    run "$log" 200 $PY -m pytest -q -x -m gpu tests --ignore-glob='tests/cuda/test_cuda_*.py'
    run "$log" 120 $BENCH check --quick
  else
    run "$log" 180 $PY -m pytest -q -m gpu tests/cuda/test_cuda_*.py
    run "$log" 300 $PY -m pytest -q -m gpu tests --ignore-glob='tests/cuda/test_cuda_*.py'
    run "$log" 150 $BENCH check
  fi
}

part_ops() {
  local log="$OUT/ops.log"
  nvidia-smi >>"$log" 2>&1
  if [ "$QUICK" = 1 ]; then
    run "$log" 200 $BENCH ops --representative --dtype bf16 --no-compile --measure-peak --budget 120 \
      --json "$OUT/$NAME-ops.json" --csv "$OUT/$NAME-ops.csv"
  else
    run "$log" 390 $BENCH ops --dtype bf16 --no-compile --measure-peak --budget 300 \
      --json "$OUT/$NAME-ops.json" --csv "$OUT/$NAME-ops.csv"
    run "$log" 150 $BENCH ops --dtype fp16,fp32 --representative --no-compile --measure-peak --budget 80 \
      --json "$OUT/$NAME-ops-fp16-fp32.json"
  fi
}

part_kernels() {
  local log="$OUT/kernels.log" budget=240 sr_budget=120
  [ "$QUICK" = 1 ] && budget=60 && sr_budget=40
  nvidia-smi >>"$log" 2>&1
  run "$log" $((budget + 60)) $BENCH ops --backend cuda --impl vitkernels,eager --mode fwd --dtype bf16 \
    --budget $budget --json "$OUT/$NAME-kernels-cuda.json" --csv "$OUT/$NAME-kernels-cuda.csv"
  for kernel in auto general split; do
    VITKERNELS_SR_KERNEL=$kernel run "$log" $((sr_budget / 3 + 40)) $BENCH ops --op sr_attention --dtype bf16 \
      --impl vitkernels,eager,sdpa --budget $((sr_budget / 3)) --json "$OUT/$NAME-kernels-sr-$kernel.json"
  done
  for kernel in auto composite; do
    VITKERNELS_MIX_FFN_KERNEL=$kernel run "$log" $((sr_budget / 2 + 40)) $BENCH ops --op mix_ffn --dtype bf16 \
      --impl vitkernels,eager --budget $((sr_budget / 2)) --json "$OUT/$NAME-kernels-mix-ffn-$kernel.json"
  done
}

# Each A/B run gets `per` seconds of benchmarking (--budget) and 45 more for imports and compiles (its
# timeout): 13 runs, estimated at about 9 minutes with the install (unmeasured: no GPU run yet).

part_switches() {
  local log="$OUT/switches.log" per=15
  [ "$QUICK" = 1 ] && per=5
  nvidia-smi >>"$log" 2>&1
  # attention backward: the split kernels vs the single kernel (atomics / deterministic), ViT-B at
  # 224 and 384 px, training step only
  for kernel in split fused fused-deterministic; do
    VITKERNELS_ATTN_BWD_KERNEL=$kernel run "$log" $((per + 45)) $BENCH ops --op self_attention \
      --mode fwd+bwd --dtype bf16 --impl vitkernels,sdpa --budget $per \
      --json "$OUT/$NAME-switch-attn-bwd-$kernel.json"
  done
  # the time axis: packed short-sequence kernels vs the general ones
  for packed in auto off; do
    VITKERNELS_ATTN_PACKED=$packed run "$log" $((per + 45)) $BENCH ops --op space_time_attention \
      --case "8x224 time" --case "16x224 time" --dtype bf16 --impl vitkernels,eager --budget $per \
      --json "$OUT/$NAME-switch-time-packed-$packed.json"
  done
  # the CUDA window_attention forward: v2 (two windows per 8-warp CTA, Q before the K/V barrier) vs v1
  for kernel in auto v1; do
    VITKERNELS_WINDOW_CUDA_KERNEL=$kernel run "$log" $((per + 45)) $BENCH ops --op window_attention \
      --backend cuda --mode fwd --dtype bf16 --impl vitkernels --budget $per \
      --json "$OUT/$NAME-switch-window-cuda-$kernel.json"
  done
  # the CUDA attention forward: v2 (32 query rows per warp: each K / V fragment feeds two MMAs; D <= 64) vs v1
  for kernel in auto v1; do
    VITKERNELS_ATTN_CUDA_KERNEL=$kernel run "$log" $((per + 45)) $BENCH ops --op self_attention,attention \
      --backend cuda --mode fwd --dtype bf16 --impl vitkernels --budget $per \
      --json "$OUT/$NAME-switch-attention-cuda-$kernel.json"
  done
  # dwconv's backward: v2 (dz in the input dtype, dweight per thread) vs v1; and mix_ffn, whose backward runs it
  for kernel in auto v1; do
    VITKERNELS_DWCONV_KERNEL=$kernel run "$log" $((per + 45)) $BENCH ops --op dwconv,mix_ffn \
      --mode fwd+bwd --dtype bf16 --impl vitkernels,eager --budget $per \
      --json "$OUT/$NAME-switch-dwconv-$kernel.json"
  done
  # the attention forward and backward through TMA tensor descriptors (sm_90) vs pointer loads
  for tma in off on; do
    VITKERNELS_ATTN_TMA=$tma run "$log" $((per + 45)) $BENCH ops --op self_attention,attention \
      --mode fwd+bwd --dtype bf16 --impl vitkernels,sdpa --budget $per \
      --json "$OUT/$NAME-switch-attn-tma-$tma.json"
  done
  # persistent grids sized from the compiled kernel's occupancy vs the old assumed programs per SM
  for grid in auto fixed; do
    VITKERNELS_GRID=$grid run "$log" $((per + 45)) $BENCH ops --op window_attention,sr_attention,xca \
      --mode fwd+bwd --dtype bf16 --impl vitkernels --budget $per --json "$OUT/$NAME-switch-grid-$grid.json"
  done
}

part_compiled() {  # part_compiled compile|flex
  local impl=$1 log="$OUT/$1.log"
  nvidia-smi >>"$log" 2>&1
  if [ "$QUICK" = 1 ]; then
    run "$log" 240 $BENCH ops --representative --op self_attention,window_attention --dtype bf16 \
      --impl "vitkernels,$impl" --measure-peak --budget 150 --json "$OUT/$NAME-$impl.json"
  else
    run "$log" 450 $BENCH ops --representative --dtype bf16 --impl "vitkernels,$impl" --measure-peak --budget 360 \
      --json "$OUT/$NAME-$impl.json" --csv "$OUT/$NAME-$impl.csv"
  fi
}

part_models() {
  local log="$OUT/models.log"
  nvidia-smi >>"$log" 2>&1
  if [ "$QUICK" = 1 ]; then
    run "$log" 200 $BENCH models --model vit_tiny_patch16_224 --dtype bf16 --impl vitkernels,eager,compile \
      --budget 150 --json "$OUT/$NAME-models.json"
  else
    run "$log" 240 $BENCH models --dtype bf16 --impl vitkernels,eager --budget 180 --json "$OUT/$NAME-models.json"
    # torch.compile of whole models takes ~1 min each: a few representative ones (absent names are skipped)
    run "$log" 300 $BENCH models --dtype bf16 --impl vitkernels,compile --budget 200 \
      --model vit_base_patch16_224,swin_tiny_patch4_window7_224,pvt_v2_b2,segformer_b2,xcit_small_12_p16_224 \
      --json "$OUT/$NAME-models-compile.json"
  fi
}

part_hf() {
  local log="$OUT/hf.log"
  nvidia-smi >>"$log" 2>&1
  if [ "$QUICK" = 1 ]; then
    run "$log" 200 $BENCH models --model swin_tiny_patch4_window7_224 --dtype bf16 \
      --impl vitkernels,hf-eager,hf-sdpa,hf+patch_hf --budget 150 --json "$OUT/$NAME-models-hf.json"
  else
    # the models with a transformers counterpart (absent names are skipped); XCiT and ViViT model 3 have none
    run "$log" 420 $BENCH models --dtype bf16 --impl vitkernels,hf-eager,hf-sdpa,hf+patch_hf --budget 330 \
      --model vit_base_patch16_224,swin_tiny_patch4_window7_224,swin_base_patch4_window7_224,pvt_v2_b2,pvt_v2_b2_li \
      --model segformer_b2,timesformer_base_patch16_224,vivit_b_16x2_kinetics400 \
      --json "$OUT/$NAME-models-hf.json" --csv "$OUT/$NAME-models-hf.csv"
  fi
}

case "$PART" in
  tests) part_tests ;;
  ops) part_ops ;;
  kernels) part_kernels ;;
  switches) part_switches ;;
  compile) part_compiled compile ;;
  flex) part_compiled flex ;;
  models) part_models ;;
  hf) part_hf ;;
  all) part_tests; part_ops; part_kernels; part_switches; part_compiled compile; part_compiled flex; part_models; part_hf ;;
esac

echo "files in $OUT:"
ls -la "$OUT"
[ "$FAILED" = 0 ] && echo "gpu_suite.sh: part $PART done" || echo "gpu_suite.sh: part $PART: some steps FAILED (see logs)"
exit "$FAILED"
