#!/usr/bin/env bash
# GPU check: the GPU test suite, the start-up timing and the kernel benchmark in one go.
# Run from the repository root on a machine with an NVIDIA GPU, CuPy and torch:
#   OUT=out bash scripts/gpu_check.sh            # everything
#   BENCH="--shapes 4096x4096 --ms 1,16" bash scripts/gpu_check.sh   # a smaller benchmark
#   SKIP_TESTS=1 / SKIP_BENCH=1 skip a part; TESTS="tests/test_gpu_kernels.py" narrows the tests.
#   SANITIZE=1 also runs every dispatched kernel variant on small matrices under compute-sanitizer memcheck and
#   racecheck (scripts/sanitize_kernels.py) and fails on any error the tool reports.
# Logs and JSON go to $OUT; a short table is printed last.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  date -u +"date: %Y-%m-%dT%H:%MZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| cupy', cupy.__version__)"
} | tee "$OUT/env.txt"

tests_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
  $PY -m pytest -q -m gpu ${TESTS:-tests} --maxfail=15 --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
fi

sanitize_rc=0
if [ -n "${SANITIZE:-}" ]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 $PY scripts/sanitize_kernels.py > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    echo "compute-sanitizer $tool: rc=$rc, $(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitize_$tool.log") clean summaries"
    tail -n 3 "$OUT/sanitize_$tool.log"
    [ $rc -eq 0 ] || sanitize_rc=$rc
  done
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  $PY scripts/startup.py | tee "$OUT/startup.json"
  $PY scripts/host_breakdown.py --json "$OUT/host_breakdown.json" > "$OUT/host_breakdown.txt" 2>&1 \
    || echo "host breakdown failed: see $OUT/host_breakdown.txt"
  $PY scripts/bench.py ${BENCH:-} --json "$OUT/bench.json" --markdown "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  bench_rc=$?
  tail -n 3 "$OUT/bench.log"
  [ $bench_rc -eq 0 ] || { echo "benchmark failed (rc=$bench_rc)"; tail -n 30 "$OUT/bench.log"; }
fi

echo
echo "== summary =="
[ -z "${SKIP_TESTS:-}" ] && { grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 1; echo "gpu tests rc=$tests_rc"; }
[ -z "${SKIP_BENCH:-}" ] && [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
[ -f "$OUT/startup.json" ] && echo "startup: $(cat "$OUT/startup.json")"
[ -f "$OUT/host_breakdown.txt" ] && grep -E "^target|host_overhead" "$OUT/host_breakdown.txt"
[ $tests_rc -ne 0 ] && exit $tests_rc
exit $sanitize_rc
