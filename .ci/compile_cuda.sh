#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc for sm_90 (compile only, nothing runs): a CUDA syntax or type
# error fails CI on machines without a GPU. The .cu sources are torch-free, so a bare CUDA toolkit
# suffices. Skips (exit 0, with a message) when nvcc is absent; any compile error exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: SKIPPED - nvcc not found (set NVCC=/path/to/nvcc to enable)"
  exit 0
fi

shopt -s nullglob
sources=(csrc/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "compile_cuda: FAILED - no csrc/*.cu found" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "compile_cuda: $("$NVCC" --version | tail -1)"
status=0
for src in "${sources[@]}"; do
  obj="$tmp/$(basename "$src" .cu).o"
  start=$(date +%s)
  # -Werror all-warnings: a warning in device code (e.g. host call from device) is a bug here.
  if "$NVCC" -arch=sm_90 -std=c++17 -O3 -Xptxas -warn-spills -Werror all-warnings \
      -Icsrc -c "$src" -o "$obj"; then
    echo "compile_cuda: ok     $src ($(( $(date +%s) - start )) s)"
  else
    echo "compile_cuda: FAILED $src" >&2
    status=1
  fi
done
exit $status
