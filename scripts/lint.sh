#!/usr/bin/env bash
# Lint and format checks (CI runs this before the tests): ruff check + ruff format --check for the
# Python (config in pyproject.toml), clang-format --dry-run for csrc/ and the CUDA emulator
# (tests/cuda_emu; config in .clang-format). Installs the pinned tools when they are missing.
# `scripts/lint.sh --fix` rewrites the files instead of checking them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=19.1.7

if [ "$("$PY" -m ruff --version 2>/dev/null || true)" != "ruff $RUFF_VERSION" ]; then
  "$PY" -m pip install -q "ruff==$RUFF_VERSION"
fi
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("clang-format"))' 2>/dev/null || true)" \
  != "$CLANG_FORMAT_VERSION" ]; then
  "$PY" -m pip install -q "clang-format==$CLANG_FORMAT_VERSION"
fi
# The pip package's console script, beside this Python (a system clang-format may be another version).
CLANG_FORMAT="$("$PY" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "clang-format"))')"
[ -x "$CLANG_FORMAT" ] || CLANG_FORMAT="$(command -v clang-format)"

mapfile -t CXX_FILES < <(git ls-files 'csrc/*.cu' 'csrc/*.cuh' 'csrc/*.h' 'csrc/*.cpp' \
  'tests/cuda_emu/*.cu' 'tests/cuda_emu/*.cuh' 'tests/cuda_emu/*.h' 'tests/cuda_emu/*.cpp' \
  'tests/cuda_emu/include/*')

if [ "${1:-}" = "--fix" ]; then
  "$PY" -m ruff check --fix .
  "$PY" -m ruff format .
  "$CLANG_FORMAT" -i "${CXX_FILES[@]}"
  exit 0
fi
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$CLANG_FORMAT" --dry-run --Werror "${CXX_FILES[@]}"
echo "lint: ruff check, ruff format and clang-format are clean"
