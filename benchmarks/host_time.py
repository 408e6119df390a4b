"""Host time per op call, measured without a GPU.

On a GPU, small calls of our ops are bound by host time: Python, torch's launches and Triton's
(benchmarks/NOTES.md). This script measures that host time without a GPU: Triton's CUDA driver is
replaced by the stand-in of ``tests/compile_for_gpu.py`` (an H100 that compiles every kernel down to
``ptxas`` and launches nothing), and the ops take their GPU path (tile sizes, Triton kernels) on CPU
tensors. Each call then runs the same Python as on a GPU, Triton's launch included, the kernels'
device work excluded. Torch ops still run on the CPU: shapes are kept small so that their work
stays a small part of the figure (a torch op's host cost on a GPU is not the same as here).

    python benchmarks/host_time.py [--calls 1000] [--rounds 5] [--json FILE] [CASE ...]

Every case is timed with each kernel launch made two ways, in interleaved rounds: ``direct``
(``_common.launch``: Triton's per-call work done once per argument key) and ``triton``
(``kernel[grid](...)``, Triton's own launch every call). A figure is the fastest round's mean
microseconds of CPU time per call (the thread's, not wall time: on a shared virtual machine wall
time moved by 30% between runs, CPU time by a few percent). The first run compiles every kernel
for sm_90 (about a minute; Triton caches them for later runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the stand-in driver

import torch  # noqa: E402

import compile_for_gpu  # noqa: E402

T, D, R, K, N = 256, 8, 16, 64, 64  # tokens, adapters (contexts), rank, in and out features: small
IVON_TENSORS, IVON_SIZE = 256, 64


def cases() -> dict:
    """``{name: (callable, needs grad)}`` over bf16 tensors."""
    from bora_kernels.ops import context_lora_delta, lora_delta, lora_plan
    from bora_kernels.ops.context_lora_delta import context_plan
    from bora_kernels.ops import nf4_matmul
    from bora_kernels.bench.ivon import training_step
    from bora_kernels.optim import IVON
    from bora_kernels.quant import quantize_nf4

    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(T, K, generator=gen).to(dt)
    xg = x.clone().requires_grad_()
    a = torch.randn(D, R, K, generator=gen).to(dt).requires_grad_()
    b = torch.randn(D, N, R, generator=gen).to(dt).requires_grad_()
    dy = torch.randn(T, N, generator=gen).to(dt)
    base = torch.randn(T, N, generator=gen).to(dt)
    scaling = torch.full((D,), 2.0)
    ids = torch.arange(T) % D  # a decode-like mix: neighbours on different adapters
    plan = lora_plan(ids, (T,), D)
    contexts = torch.arange(T) * D // T  # runs of one context, as in a Context-PEFT batch
    cplan = context_plan(contexts, (T,), D)
    one_hot = torch.nn.functional.one_hot(contexts, D).to(dt)
    optimizers = {}
    for capturable in (False, True):
        params = [torch.nn.Parameter(torch.randn(IVON_SIZE, generator=gen)) for _ in range(IVON_TENSORS)]
        for p in params:
            p.grad = torch.randn(IVON_SIZE, generator=gen)
        optimizers[capturable] = IVON(params, lr=0.1, ess=1e4, capturable=capturable)

    nf4 = quantize_nf4(torch.randn(N, K, generator=gen).to(dt), 64)  # contents unused: nothing runs
    x16, x1024 = x[:16], torch.randn(1024, K, generator=gen).to(dt)  # the split-K and the dense path

    return {
        "lora_delta fwd, ids": (lambda: lora_delta(x, a, b, ids, scaling), False),
        "lora_delta fwd, plan": (lambda: lora_delta(x, a, b, plan, scaling), False),
        "lora_delta fwd, plan, add_to": (lambda: lora_delta(x, a, b, plan, scaling, add_to=base), False),
        "lora_delta fwd+bwd, plan": (lambda: lora_delta(xg, a, b, plan, scaling).backward(dy), True),
        "lora_plan": (lambda: lora_plan(ids, (T,), D), False),
        "context_lora_delta fwd, ids": (lambda: context_lora_delta(x, a, b, contexts, scaling), False),
        "context_lora_delta fwd, plan": (lambda: context_lora_delta(x, a, b, cplan, scaling), False),
        "context_lora_delta fwd, one-hot": (lambda: context_lora_delta(x, a, b, one_hot, scaling), False),
        "context_lora_delta fwd+bwd, ids": (lambda: context_lora_delta(xg, a, b, contexts, scaling).backward(dy), True),
        "context_lora_delta fwd+bwd, plan": (lambda: context_lora_delta(xg, a, b, cplan, scaling).backward(dy), True),
        "nf4_matmul fwd, M 16 (Triton split-K)": (lambda: nf4_matmul(x16, nf4), False),
        "nf4_matmul fwd, M 1024 (dequantize + F.linear)": (lambda: nf4_matmul(x1024, nf4), False),
        "nf4 dequantize + F.linear, M 1024 (no op)": (lambda: torch.nn.functional.linear(x1024, nf4.dequantize()),
                                                       False),
        f"IVON step + sample, {IVON_TENSORS} tensors": (training_step(optimizers[False]), True),
        f"IVON step + sample, {IVON_TENSORS} tensors, capturable": (training_step(optimizers[True]), True),
    }


def per_call_us(fn, calls: int) -> float:
    """Mean microseconds of this thread's CPU time per call (time another process or the
    hypervisor takes from this machine's cores is not counted), with Python's garbage collector
    held off as ``timeit`` does."""
    gc.collect()
    gc.disable()
    try:
        start = time.thread_time()
        for _ in range(calls):
            fn()
        return (time.thread_time() - start) / calls * 1e6
    finally:
        gc.enable()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help="substrings of the case names to run (default: all)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per launch path (default 5)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be at least 1")
    try:
        compile_for_gpu._install()
    except Exception as error:  # no CUDA backend in this Triton, or its driver interface changed
        print(f"cannot stand in for an H100 with this Triton: {error!r}", file=sys.stderr)
        return compile_for_gpu.UNSUPPORTED
    from bora_kernels.ops import _common, _dispatch

    _common.ASSUME_GPU = True
    _dispatch.triton_interpreted = lambda: True  # CPU tensors take the Triton path
    direct_available = _common.DIRECT_LAUNCH
    chosen = {name: case for name, case in cases().items() if not args.cases or any(c in name for c in args.cases)}
    if not chosen:
        parser.error(f"no case matches {args.cases}")
    paths = ("direct", "triton") if direct_available else ("triton",)
    figures = {name: {path: float("inf") for path in paths} for name in chosen}
    for _ in range(args.rounds):
        for path in paths:
            _common.DIRECT_LAUNCH = path == "direct"
            for name, (fn, grad) in chosen.items():
                with torch.enable_grad() if grad else torch.no_grad():
                    per_call_us(fn, 10)  # a new key goes through Triton once
                    figures[name][path] = min(figures[name][path], per_call_us(fn, args.calls))
    _common.DIRECT_LAUNCH = direct_available

    import triton

    print(f"host CPU us per call (triton {triton.__version__}, torch {torch.__version__}, kernels compiled for sm_90, "
          f"not launched; best of {args.rounds} rounds of {args.calls})")
    width = max(len(name) for name in figures)
    print(f"{'case':{width}s} " + " ".join(f"{p:>8s}" for p in paths) + ("   triton/direct" if len(paths) == 2 else ""))
    for name, row in figures.items():
        ratio = f"   {row['triton'] / row['direct']:6.2f}x" if len(paths) == 2 else ""
        print(f"{name:{width}s} " + " ".join(f"{row[p]:8.1f}" for p in paths) + ratio)
    if args.json:
        from bora_kernels.bench.timing import environment

        env = environment(torch.device("cpu"))
        env["timer"] = "thread_time (CPU time), stand-in H100 driver (compiled for sm_90, not launched)"
        Path(args.json).write_text(json.dumps({"environment": env, "calls": args.calls, "rounds": args.rounds,
                                               "host_us": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
