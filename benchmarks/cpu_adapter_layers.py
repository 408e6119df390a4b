"""One adapter layer on the CPU: ours (one mixed batch, the ops' torch path) against PEFT's LoRA
layer given ``adapter_names`` (a loop over the adapters in the batch), and the bare base layer;
no grad, one thread, medians of calls taken in turns. ``--layer embedding`` (default):
``MultiLoRAEmbedding`` over a ``vocab x hidden`` ``nn.Embedding``; ``--layer linear``:
``MultiLoRALinear`` over a ``hidden x hidden`` ``nn.Linear``.

    python benchmarks/cpu_adapter_layers.py [--layer embedding|linear] [--vocab 32000] [--hidden 1024]
        [--adapters 8] [--rank 16] [--sequences 8] [--length 256] [--calls 30] [--quick] [--json FILE]

Each sequence uses one adapter (``sequence % adapters``). The outputs of ours and PEFT's are
compared before timing. glibc's allocator matters here: with its defaults it hands the torch
path's multi-megabyte temporaries back to the kernel after every call, which then faults their
pages in again (benchmarks/NOTES.md, 2026-12-05, twenty-first session);
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set high keep them, and the record says
which were set. ``--quick`` (the test's smoke run): a small layer and 3 calls.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bora_kernels as bk  # noqa: E402
from bora_kernels.ops import use_backend  # noqa: E402

ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("vocab", 32000), ("hidden", 1024), ("adapters", 8), ("rank", 16), ("sequences", 8),
                          ("length", 256), ("calls", 30)):
        parser.add_argument(f"--{name}", type=positive, default=default)
    parser.add_argument("--layer", choices=("embedding", "linear"), default="embedding")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the record here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.adapters, args.rank, args.sequences, args.length, args.calls = \
            500, 64, 3, 4, 4, 16, 3
    import peft

    torch.set_num_threads(1)
    torch.manual_seed(0)
    embedding = args.layer == "embedding"
    base = nn.Embedding(args.vocab, args.hidden) if embedding else nn.Linear(args.hidden, args.hidden, bias=False)
    layer_type = bk.nn.MultiLoRAEmbedding if embedding else bk.nn.MultiLoRALinear
    ours = layer_type(copy.deepcopy(base), args.adapters, r=args.rank, alpha=2 * args.rank,
                      adapter_names=[f"a{d}" for d in range(args.adapters)])
    with torch.no_grad():  # (PEFT starts one of A and B at zero: nothing to compare)
        ours.lora_A.normal_()
        ours.lora_B.normal_(std=0.1)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = copy.deepcopy(base)

    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["layer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Holder(), config, adapter_name="a0")
        for d in range(1, args.adapters):
            model.add_adapter(f"a{d}", config)
    theirs = model.base_model.model.layer
    with torch.no_grad():
        for d in range(args.adapters):
            a, b = ours.adapter_weights(d)
            (theirs.lora_embedding_A[f"a{d}"] if embedding else theirs.lora_A[f"a{d}"].weight).copy_(a)
            (theirs.lora_embedding_B[f"a{d}"] if embedding else theirs.lora_B[f"a{d}"].weight).copy_(b)

    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.sequences, args.length), generator=generator) if embedding else \
        torch.randn(args.sequences, args.length, args.hidden, generator=generator)
    ids = torch.arange(args.sequences) % args.adapters
    names = [f"a{int(d)}" for d in ids]
    calls = {"base": lambda: base(x), "ours": lambda: ours(x, ids), "peft": lambda: theirs(x, adapter_names=names)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad(), use_backend("torch"):
        error = (calls["ours"]() - calls["peft"]()).abs().max().item()
        if not error <= 1e-4 * calls["peft"]().abs().max().item():
            raise SystemExit(f"ours and PEFT's outputs differ by {error}")
        for _ in range(args.calls):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    record = {"layer": args.layer,
              "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "adapters", "rank", "sequences", "length")
                        if embedding or k != "vocab"},
              "calls": args.calls, "allocator": {k: os.environ.get(k) for k in ALLOCATOR},
              "torch": torch.__version__, "threads": 1,
              **{f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}}
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
