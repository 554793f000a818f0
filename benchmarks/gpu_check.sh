#!/usr/bin/env bash
# One call on a lent GPU: build the extension, run the GPU tests, time every kernel against
# its baselines and the hardware floor, print a short table last.
#
# Each benchmarks/gpu_*.py is standalone; lines it prints starting with "TABLE " are
# gathered into the final table (format: TABLE | kernel | case | time | vs baseline | note |).
# Logs go to $OUT (the device tool brings that folder back).
set -u
OUT=${OUT:-/tmp/gtp_gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/device.txt"

echo "== build"
pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; echo "BUILD FAILED"; }
python -c "import gtp_kernels.ops.lsq as l; print('extension:', l.extension_status())" 2>&1 | tee -a "$OUT/build.log"

echo "== GPU tests"
timeout ${GTP_TEST_TIMEOUT:-240} python -m pytest tests -q -x -p no:cacheprovider -m "not slow" >"$OUT/tests.log" 2>&1
echo "pytest exit: $?"; tail -5 "$OUT/tests.log"

for script in benchmarks/gpu_*.py; do
  name=$(basename "$script" .py)
  echo "== $name"
  timeout ${GTP_BENCH_TIMEOUT:-150} python "$script" >"$OUT/$name.log" 2>&1
  echo "exit: $?"; grep -v '^TABLE ' "$OUT/$name.log" | tail -3
done

echo
echo "== summary ($(($(date +%s) - start)) s, $(head -2 "$OUT/device.txt" | tail -1))"
cat "$OUT"/gpu_*.log 2>/dev/null | grep '^TABLE ' | sed 's/^TABLE //' | tee "$OUT/summary.md"
