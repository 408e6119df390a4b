"""Tile sweep and per-kernel breakdown for ``lora_delta`` on a GPU (tuning notes: NOTES.md).

    python benchmarks/tune_lora.py [--tokens 4096 16] [--adapters 32] [--rank 16] [--json FILE]

For each case: the floor (bytes over copy bandwidth, FLOPs over the bf16 rate, given as
arguments), the time of each kernel alone with the current tiles, then forward and
forward+backward for every tile choice of a small grid, best first.
"""

import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from bora_kernels.arguments import POSITIVE, POSITIVE_INT, output_file
from bora_kernels.ops import lora_plan
from bora_kernels.ops.lora_delta import LoRADeltaFunction
from bora_kernels.ops.lora_delta import triton as kernels


def bench(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # microseconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=POSITIVE_INT, nargs="+", default=[4096, 16])
    parser.add_argument("--adapters", type=POSITIVE_INT, default=32)
    parser.add_argument("--rank", type=POSITIVE_INT, default=16)
    parser.add_argument("--features", type=POSITIVE_INT, default=4096)
    parser.add_argument("--copy-GBps", type=POSITIVE, default=3000.0)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    k = n = args.features
    d, r = args.adapters, args.rank
    a = torch.randn(d, r, k, device=dev, dtype=dt) / 64
    b = torch.randn(d, n, r, device=dev, dtype=dt) / 4
    scaling = torch.full((d,), 2.0, device=dev)
    ranks = torch.full((d,), r, device=dev, dtype=torch.int32)
    weight = torch.randn(n, k, device=dev, dtype=dt) / 64
    report = []
    default_tiles = kernels._tiles
    for t in args.tokens:
        x = torch.randn(t, k, device=dev, dtype=dt)
        dy = torch.randn(t, n, device=dev, dtype=dt)
        ids = (torch.arange(t, device=dev) * d // t)[torch.randperm(t, device=dev)]
        plan = lora_plan(ids, (t,), d)
        pb = plan
        bytes_fwd = (t * k + t * n + d * r * (k + n)) * 2
        bytes_bwd = bytes_fwd + (2 * t * k + 2 * t * n + 2 * d * r * (k + n)) * 2
        entry = {"tokens": t, "adapters": d, "rank": r, "K": k, "N": n,
                 "floor_fwd_us": bytes_fwd / args.copy_GBps / 1e3,
                 "floor_fwd_bwd_us": bytes_bwd / args.copy_GBps / 1e3}
        tiles = default_tiles(t, d, r, dev)
        out = torch.empty(t, n, device=dev, dtype=dt)
        h = torch.empty(t, tiles["BLOCK_R"], device=dev, dtype=torch.float32)
        programs = kernels._row_programs(t, pb.bounds.numel() - 1, tiles["BLOCK_M"])
        split = kernels.column_splits(programs, n, tiles, dev)
        entry["default_tiles"] = {**tiles, "column_split": split}
        entry["kernels_us"] = {
            "plan (sort + searchsorted)": bench(lambda: lora_plan(ids, (t,), d)),
            **{f"shrink_expand (column split {s})": bench(
                lambda s=s: kernels.lora_shrink_expand(x, a, b, out, pb, ranks, scaling, tiles, False, h, split=s))
               for s in sorted({1, split, 2 * split})},
            "weight_grads dA + dB": bench(lambda: kernels.lora_weight_grads(
                [kernels.GradJob(h, x, torch.empty_like(a), False),
                 kernels.GradJob(h, dy, torch.empty_like(b).transpose(1, 2), True)], pb, ranks, scaling, tiles)),
            "F.linear base": bench(lambda: torch.nn.functional.linear(x, weight)),
        }
        sweep = []
        grid = [(bm, bk_, bn, 4) for bm, bk_, bn in itertools.product((16, 32, 64), (64, 128, 256), (64, 128, 256))]
        grid += [(64, 128, 128, 8), (64, 256, 256, 8), (128, 128, 128, 8), (128, 256, 256, 8)]
        for bm, bk_, bn, warps in grid:
            cfg = dict(BLOCK_M=bm, BLOCK_K=bk_, BLOCK_N=bn, BLOCK_R=tiles["BLOCK_R"], num_warps=warps)
            kernels._tiles = lambda *_a, cfg=cfg: cfg
            try:
                fwd = bench(lambda: kernels.lora_delta_forward(x, a, b, pb, scaling, ranks, False))
                leaves = [x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()]

                def fb():
                    o = LoRADeltaFunction.apply(None, *leaves, scaling, ranks, plan, kernels)
                    torch.autograd.grad(o, leaves, dy)
                fwd_bwd = bench(fb)
            except Exception as exc:  # a tile that does not fit (shared memory) is a result too
                fwd = fwd_bwd = float("nan")
                cfg["error"] = type(exc).__name__
            finally:
                kernels._tiles = default_tiles
            sweep.append({**cfg, "fwd_us": fwd, "fwd_bwd_us": fwd_bwd})
        sweep.sort(key=lambda s: (s["fwd_us"] != s["fwd_us"], s["fwd_us"]))
        entry["sweep"] = sweep
        report.append(entry)
        print(f"T={t} D={d} r={r} K=N={k}: floor fwd {entry['floor_fwd_us']:.1f} us, "
              f"fwd+bwd {entry['floor_fwd_bwd_us']:.1f} us; tiles {tiles}")
        for name, us in entry["kernels_us"].items():
            print(f"   {name:<28s} {us:8.1f} us")
        for s in sweep[:8]:
            print(f"   BM={s['BLOCK_M']:<3d} BK={s['BLOCK_K']:<3d} BN={s['BLOCK_N']:<3d} w={s['num_warps']} "
                  f"fwd {s['fwd_us']:7.1f} us  fwd+bwd {s['fwd_bwd_us']:7.1f} us")
        best_fb = min((s for s in sweep if s["fwd_bwd_us"] == s["fwd_bwd_us"]), key=lambda s: s["fwd_bwd_us"])
        print(f"   best fwd+bwd: {best_fb}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
