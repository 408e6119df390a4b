#!/usr/bin/env bash
# One call on a lent GPU (15 device-minutes, the machine's start included): the checks that
# matter most for what is still open, ended by this script well inside the call's limit, with
# the results packed into $OUT/results.tgz every 5 s (a call returns at most 8 files, and none
# when its limit kills it). Run from the repository root, carrying .whl (bitsandbytes, ivon-opt):
#   device run: bash benchmarks/gpu_lease.sh      with timeout_s at least BUDGET_S + 60
# BUDGET_S (default 420) is the whole run; STEPS (default: the NF4 GEMV profile, the op suites,
# their CUDA-graph timings, lora_delta's profile) run first with 3/5 of it, then the GPU tests
# with what is left. QUICK
# (default 1) picks the suites' quick grids; PYTEST_WORKERS (default 4) the test processes.
set -uo pipefail
out=${OUT:-/tmp/gpu-lease}
budget=${BUDGET_S:-420}
work=${TMPDIR:-/tmp}
results=$work/gpu-lease-results
rm -rf "$results"; mkdir -p "$out" "$results"
log=$results/gpu_check.log
steps=${STEPS:-ceilings ext gemv nf4 context ivon graphs profile}
export QUICK=${QUICK:-1} PYTEST_WORKERS=${PYTEST_WORKERS:-4} PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -rfE --tb=short"
{
  # shellcheck disable=SC2086 # the steps are words
  BUDGET_S=$(( budget * 3 / 5 )) bash benchmarks/gpu_check.sh "$results" $steps
  echo "gpu_check (suites) rc=$?"
  BUDGET_S=$(( budget - SECONDS )) bash benchmarks/gpu_check.sh "$results" tests
  echo "gpu_check (tests) rc=$?"
} > "$log" 2>&1 &
run=$!
pack() {
  tar czf "$work/gpu-lease.tgz" -C "$work" gpu-lease-results \
    && cp "$work/gpu-lease.tgz" "$out/results.tgz.new" && mv -f "$out/results.tgz.new" "$out/results.tgz"
}
while kill -0 "$run" 2>/dev/null; do sleep 5; pack; done
wait "$run"
pack
# what the call's reply shows: each step, what stopped or failed, the end of the log
grep -E "^===|rc=|stopped after|skipped,|passed|failed|^(FAILED|ERROR)|extension:" "$log" | cut -c1-300 | tail -120
echo "--- end of the log ---"
tail -c 4000 "$log"
