#!/usr/bin/env bash
# Everything that needs CUDA, in one go (see GPU.md): the ceilings, the GPU tests, a
# compute-sanitizer run of each kernel, the benchmark suites, the tile sweep, then the table.
# Run from the repository root on a CUDA machine:  bash benchmarks/gpu_check.sh [results dir] [step...]
# Steps (default: all, in this order): ceilings ext tests sanitizer gemv ivon nf4 context lora model
# graphs profile serve tiles table (gemv: the NF4 GEMV kernels by M, host against device time;
# graphs: the op suites timed from CUDA graph replays, device work alone; profile: the same split
# for lora_delta). Each suite writes its own results file as soon as it finishes, so a run cut off by a
# time limit keeps what it measured; `model` runs its --quick grid (PEFT's mixed batch alone
# takes minutes at 64 adapters). Carried wheels in .whl/ (bitsandbytes, ivon-opt, the serving
# stack) are installed into .site/ first. QUICK=1 runs every suite's --quick grid (a lent GPU's
# 15 device-minutes do not hold the full grids): QUICK=1 bash benchmarks/gpu_check.sh DIR ext tests nf4
# BUDGET_S=N ends the whole run within N seconds: each command gets what is left (less 20 s for
# writing results) and is skipped when under 15 s are left, so that a lease's time limit never
# kills the run and its files (benchmarks/gpu_lease.sh uses it). PYTHON picks the interpreter
# (default python3: a lent machine's python3 is the one with torch); PYTEST_WORKERS=N runs the GPU
# tests in N processes (pytest-xdist).
set -uo pipefail
results=${1:-benchmarks/results}
shift || true
steps=" ${*:-ceilings ext tests sanitizer gemv ivon nf4 context lora dora model graphs profile serve tiles table} "
want() { [[ "$steps" == *" $1 "* ]]; }
mkdir -p "$results"
py=${PYTHON:-python3}
budget=${BUDGET_S:-0}
python() { "$py" "$@"; }
# limited SECONDS CMD...: CMD under the lesser of SECONDS and what BUDGET_S leaves (none without
# BUDGET_S); a skipped or timed-out command fails the run
limited() {
  local secs=$1; shift
  [[ $1 == python ]] && set -- "$py" "${@:2}"  # timeout runs programs, not shell functions
  if (( budget <= 0 )); then "$@"; return; fi
  local left=$(( budget - SECONDS - 20 ))
  if (( left < 15 )); then echo "skipped, ${left} s of BUDGET_S left: $*"; return 1; fi
  (( secs > left )) && secs=$left
  timeout -k 5 "$secs" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "stopped after ${secs} s (BUDGET_S): $*"
  return $rc
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH="$PWD/.site:$PYTHONPATH"
fi
stamp=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")-$(date -u +%Y-%m-%d)
status=0
step() { echo; echo "=== $* ==="; }

if want ceilings; then
  step "ceilings"
  limited 60 python benchmarks/ceilings.py | tee "$results/$stamp-ceilings.json"
fi
copy=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['copy_GBps'])" "$results/$stamp-ceilings.json" 2>/dev/null || echo 3000)

if want ext; then
  step "CUDA extension (csrc/): built at install, or JIT-built now"
  limited 240 python - <<'PY' || status=1
import logging, time
logging.basicConfig(level=logging.INFO)
from bora_kernels._cuda_ext import extension
t = time.perf_counter()
ext = extension()
print(f"extension: {ext} ({time.perf_counter() - t:.0f} s)")
raise SystemExit(ext is None)
PY
fi

if want tests; then
  step "GPU tests (pytest -m gpu)"
  workers=()
  if [[ -n ${PYTEST_WORKERS:-} ]]; then
    if python -c "import xdist" 2>/dev/null; then workers=(-n "$PYTEST_WORKERS"); else echo "pytest-xdist missing: one process"; fi
  fi
  limited 900 python -m pytest -q -m gpu tests -p no:cacheprovider "${workers[@]}" || status=1
fi

if want sanitizer && ! command -v compute-sanitizer >/dev/null; then
  echo "compute-sanitizer not found; skipped"
elif want sanitizer; then
  step "compute-sanitizer (memcheck) on one small run of each kernel"
  limited 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$py" - <<'PY' || status=1
import torch
from bora_kernels.ops import lora_delta
x = torch.randn(3, 70, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
a = torch.randn(5, 12, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
b = torch.randn(5, 80, 12, device="cuda", dtype=torch.bfloat16, requires_grad=True)
out = lora_delta(x, a, b, torch.tensor([0, -1, 4], device="cuda"), ranks=torch.tensor([12, 3, 7, 1, 12]))
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("memcheck run finished: lora_delta forward and backward (shrink_expand, weight_grad)")
from bora_kernels.ops.ivon_step import StepScalars, ivon_step
n = 5000
st = [torch.randn(n, device="cuda"), torch.zeros(n, device="cuda"), torch.ones(n, device="cuda")]
avg = [torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")]
s = StepScalars(0.1, 100.0, 1e-4, 0.9, 0.999, 0.1, 1.0)
g = torch.randn(n, device="cuda", dtype=torch.bfloat16)
sample = torch.empty(n, device="cuda", dtype=torch.bfloat16)
ivon_step(*st, s, grad=g, count=2, avg_grad=avg[0], avg_hess_stat=avg[1], sample=sample, eps_now=0, eps_next=1)
torch.cuda.synchronize()
print("memcheck run finished: ivon_step (fold, update, draw)")
from bora_kernels.ops import nf4_matmul
from bora_kernels.quant import quantize_nf4
w = quantize_nf4(torch.randn(200, 320, device="cuda", dtype=torch.bfloat16), 64)
for m in (3, 9, 40):  # the CUDA GEMV, Triton split-K, Triton tiled
    x = torch.randn(m, 320, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    nf4_matmul(x, w, torch.randn(200, device="cuda", dtype=torch.bfloat16)).sum().backward()
# both GEMV kernels up to the largest M, N off their 8- and 16-row blocks, 33 chunks of 32 per row
# (a lane's group of four partial; the tensor cores' last 128-wide chunk a quarter full)
from bora_kernels.ops.nf4_matmul import nf4_matmul_csrc
w = quantize_nf4(torch.randn(203, 1056, device="cuda", dtype=torch.float16), 32)
for m in (1, 8, 9, 16):
    for kernel in ("cores", "mma"):
        nf4_matmul_csrc(torch.randn(m, 1056, device="cuda", dtype=torch.float16), w, None, (m, 203), kernel=kernel)
torch.cuda.synchronize()
print("memcheck run finished: nf4_matmul (CUDA GEMV on CUDA and tensor cores, split-K, tiled; forward and dx)")
PY
fi

if want gemv; then  # sets kNF4GemvMmaMinRows (csrc/nf4_gemv/nf4_gemv.h)
  step "the NF4 GEMV kernels by M: host against device time (benchmarks/profile_nf4.py)"
  limited 120 python benchmarks/profile_nf4.py --rows 1 2 4 5 8 9 12 16 || status=1
fi

for suite in ivon nf4 context lora dora model; do
  want $suite || continue
  step "benchmarks: bora-bench $suite"
  quick=""; [[ $suite == model || $suite == dora || ${QUICK:-0} == 1 ]] && quick="--quick"
  limited 900 python -m bora_kernels.bench $suite --device cuda $quick --json "$results/$stamp-$suite.json" || status=1
done

if want graphs; then
  step "device time alone: the op suites replayed from CUDA graphs (bora-bench --graph, quick grids)"
  for suite in context lora nf4; do
    limited 120 python -m bora_kernels.bench $suite --device cuda --quick --graph --json "$results/$stamp-$suite-graph.json" || status=1
  done
  # IVON at the sizes where the eager step is host-bound (1M, 16M)
  limited 120 python -m bora_kernels.bench ivon --device cuda --quick --graph --params 1048576 16777216 \
    --json "$results/$stamp-ivon-graph.json" || status=1
fi

if want profile; then
  step "lora_delta: host against device time per call (benchmarks/profile_lora.py)"
  limited 120 python benchmarks/profile_lora.py --tokens 16 64 4096 || status=1
  limited 60 python benchmarks/profile_lora.py --tokens 64 --adapters 1 || status=1  # decode at one adapter (NOTES: D=1)
fi

if want serve; then
  step "serving load test (bora-bench serve; needs fastapi, uvicorn, httpx)"
  if python -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
    quick=""; [[ ${QUICK:-0} == 1 ]] && quick="--quick"
    limited 600 python -m bora_kernels.bench serve --device cuda $quick --json "$results/$stamp-serve.json" || status=1
    # the same over an NF4 base: decode steps through the CUDA GEMV (M <= 16) and dequantize + cuBLAS
    limited 600 python -m bora_kernels.bench serve --device cuda $quick --quantize nf4 \
      --json "$results/$stamp-serve-nf4.json" || status=1
  else
    echo "fastapi/uvicorn/httpx missing (carry their wheels in .whl/); skipped"
  fi
  # the engine's prefix cache, off against on: a shared system prompt, lm-eval's multiple choice
  limited 300 python benchmarks/prefix_cache.py --device cuda --json "$results/$stamp-prefix-cache.json" || status=1
fi

if want tiles; then
  step "lora_delta tile sweep"
  limited 900 python benchmarks/tune_lora.py --copy-GBps "$copy" --json "$results/$stamp-lora-tiles.json" || status=1
fi

if want table; then
  step "table"
  limited 60 python -m bora_kernels.bench table --results "$results"
fi
exit $status
