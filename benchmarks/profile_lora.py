"""Where the time of one ``lora_delta`` call goes on a GPU: host (Python, launches) against device
(kernels), for the plan, the forward and forward+backward (notes: NOTES.md).

    python benchmarks/profile_lora.py [--tokens 16 4096] [--adapters 32] [--rank 16]

Host time is the wall time of many calls launched back to back without a sync, divided by the
count, while the GPU is kept busy ahead of the host, with kernels launched by ``_common.launch``
and, beside it, by Triton's own launch; device time sums the kernels that ``torch.profiler``
records for one call. When host > device, the call is launch-bound.
"""

import argparse
import cProfile
import pstats
import time

import torch

from bora_kernels.arguments import POSITIVE_INT
from bora_kernels.ops import _common, lora_delta, lora_plan


def host_us(fn, calls=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def device_us(fn, calls=20):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events) / calls
    top = sorted(events, key=lambda e: -e.device_time_total)[:8]
    return total, [(e.key[:60], e.count // calls, e.device_time_total / calls) for e in top]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=POSITIVE_INT, nargs="+", default=[16, 4096])
    parser.add_argument("--adapters", type=POSITIVE_INT, default=32)
    parser.add_argument("--rank", type=POSITIVE_INT, default=16)
    parser.add_argument("--features", type=POSITIVE_INT, default=4096)
    parser.add_argument("--cprofile", action="store_true", help="also print the host's top functions")
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    direct = _common.DIRECT_LAUNCH  # False where this Triton has no direct launch path
    d, r, k = args.adapters, args.rank, args.features
    a = (torch.randn(d, r, k, device=dev, dtype=dt) / 64).requires_grad_()
    b = (torch.randn(d, k, r, device=dev, dtype=dt) / 4).requires_grad_()
    scaling = torch.full((d,), 2.0, device=dev)
    ranks = torch.full((d,), r, device=dev, dtype=torch.int32)
    for t in args.tokens:
        x = torch.randn(t, k, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(t, k, device=dev, dtype=dt)
        ids = (torch.arange(t, device=dev) * d // t)[torch.randperm(t, device=dev)]
        plan = lora_plan(ids, (t,), d)
        cases = {
            "plan": lambda: lora_plan(ids, (t,), d),
            "fwd (ids)": lambda: lora_delta(x.detach(), a.detach(), b.detach(), ids, scaling, ranks),
            "fwd (plan)": lambda: lora_delta(x.detach(), a.detach(), b.detach(), plan, scaling, ranks),
            "fwd+bwd (plan)": lambda: lora_delta(x, a, b, plan, scaling, ranks).backward(dy),
        }
        print(f"T={t} D={d} r={r} K=N={k} bf16")
        for name, fn in cases.items():
            host = host_us(fn)
            _common.DIRECT_LAUNCH = False  # every kernel through Triton's own launch, for comparison
            stock = host_us(fn)
            _common.DIRECT_LAUNCH = direct
            dev_total, top = device_us(fn)
            print(f"  {name:16s} host {host:8.1f} us (Triton's own launch: {stock:8.1f})   device {dev_total:8.1f} us")
            for key, count, us in top:
                print(f"      {us:8.1f} us  x{count}  {key}")
            if args.cprofile and name == "fwd+bwd (plan)":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(50):
                    fn()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
