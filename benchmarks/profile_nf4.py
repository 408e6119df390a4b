"""Where the time of an NF4 decode call goes on a GPU: ``do_bench`` (what ``bora-bench nf4``
reports: the L2 flushed before each call, host hidden) against the kernels' own device time
(``torch.profiler``), for both CUDA GEMV kernels (CUDA cores and tensor cores, forced, so that the
rows give the crossover ``kNF4GemvMmaMinRows`` encodes), the dense bf16 ``F.linear`` and
dequantize + ``F.linear`` (the path M above ``CSRC_MAX_M`` takes) beside them (notes: NOTES.md).

    python benchmarks/profile_nf4.py [--rows 1 4 5 8 9 16] [--features 4096 4096]

The difference between the two columns is launch latency and whatever the flush leaves behind
(dirty L2 lines written back during the call); the device column is what a CUDA graph would see.
"""

import argparse

import torch
import torch.nn.functional as F
from profile_lora import device_us
from triton.testing import do_bench

from bora_kernels.arguments import POSITIVE_INT
from bora_kernels.ops.nf4_matmul import _csrc_gemv, nf4_matmul_csrc
from bora_kernels.quant import quantize_nf4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=POSITIVE_INT, nargs="+", default=[1, 4, 5, 8, 9, 16])
    parser.add_argument("--features", type=POSITIVE_INT, nargs=2, default=[4096, 4096], metavar=("K", "N"))
    args = parser.parse_args()
    k, n = args.features
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    weight = quantize_nf4(w, 64, double_quant=True)
    dense = weight.dequantize(torch.bfloat16)
    print(f"K={k} N={n} bf16, double quantization, blocksize 64: do_bench (flushed L2) and device time, us")
    for m in args.rows:
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        fns = {"dense F.linear": lambda: F.linear(x, dense),
               "dequant+linear": lambda: F.linear(x, weight.dequantize(torch.bfloat16))}
        if _csrc_gemv(x, weight, None) is not None:
            for kernel in ("cores", "mma"):
                fns[f"GEMV {kernel}"] = lambda kernel=kernel: nf4_matmul_csrc(x, weight, None, (m, n), kernel=kernel)
        for name, fn in fns.items():
            bench = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            device, top = device_us(fn)
            kernels = ", ".join(f"{key} {us:.1f}" for key, _, us in top[:2])
            print(f"  M={m:<2d} {name:16s} do_bench {bench:7.1f}   device {device:7.1f}   ({kernels})")


if __name__ == "__main__":
    main()
