"""The serving engine's prefix cache on two workloads, off (the baseline) against on.

    python benchmarks/prefix_cache.py [--device cpu|cuda] [--rounds 2] [--quick] [--json FILE]

- ``system``: 16 requests at once over 4 adapters (adapter ``i % 4``), each a shared 480-token
  system prompt plus its own 32 tokens, 8 greedy tokens generated.
- ``choices``: lm-eval's multiple-choice scoring as its ``local-completions`` model asks it of
  ``bora-serve`` (``echo``, ``logprobs`` 1, ``max_tokens`` 1): 8 questions of 4 choices over 4
  adapters (question ``q`` on adapter ``q % 4``), each prompt 400 tokens of few-shot examples
  shared by all, a 40-token question and a 2-token answer; the prompt is scored.

The model is a 4-layer Llama (hidden 512, vocabulary 32000) with rank-16 adapters on every linear
layer but the head, built from a config with random weights (the figures do not depend on what
it learned); the engine runs the ops' default backend for the device (the torch path on CPU),
``max_batch`` 8. Each round runs the workload with the cache off and on, alternating, each in a
fresh engine; a figure is the wall time from the first submission to the last request's end.
``--quick`` (the test's smoke run) shrinks the model to 2 layers of hidden 64 and keeps the
workloads, so it reuses the same prompt tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = [f"task{i}" for i in range(4)]
VOCAB = 32000


def config(quick: bool = False):
    import transformers

    hidden, intermediate, layers, heads = (64, 128, 2, 4) if quick else (512, 1376, 4, 8)
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                    max_position_embeddings=2048)


def workloads(seed: int = 0) -> dict[str, list[tuple[str, list[int], dict]]]:
    """Each workload's requests: (adapter, prompt, sampling parameters)."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(n)]

    system = tokens(480)
    shots = tokens(400)
    questions = [tokens(40) for _ in range(8)]
    return {
        "system": [(ADAPTERS[i % 4], system + tokens(32), {"max_tokens": 8}) for i in range(16)],
        "choices": [(ADAPTERS[q % 4], shots + questions[q] + tokens(2), {"max_tokens": 1, "prompt_logprobs": 1})
                    for q in range(8) for _ in range(4)],
    }


def run_once(folder: Path, requests: list, cache_tokens: int, device: str, quick: bool) -> dict:
    import transformers

    from bora_kernels.serve import Engine, Request, SamplingParams

    torch.manual_seed(0)
    engine = Engine(transformers.LlamaForCausalLM(config(quick)).eval().to(device), max_adapters=len(ADAPTERS),
                    max_lora_rank=16, max_batch=8, prefix_cache_tokens=cache_tokens)
    for name in ADAPTERS:
        engine.load_adapter(name, folder / name)
    engine.start()
    ends = []
    start = time.perf_counter()
    for adapter, prompt, params in requests:
        ended = threading.Event()
        ends.append(ended)
        engine.submit(Request(list(prompt), adapter, SamplingParams(temperature=0, **params),
                              lambda token, finish, ended=ended: finish is not None and ended.set()))
    for ended in ends:
        ended.wait()
    wall = time.perf_counter() - start
    stats = dict(engine.stats)
    engine.shutdown(60)
    return {"wall_s": wall, "prompt_tokens": stats["prompt_tokens"], "reused_tokens": stats["cached_prompt_tokens"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small model (a smoke run; no figure to quote)")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    import transformers

    import bora_kernels as bk

    results = {}
    with tempfile.TemporaryDirectory(prefix="bora-prefix-cache-") as tmp:
        torch.manual_seed(1)
        model = bk.inject(transformers.LlamaForCausalLM(config(args.quick)), TARGETS, len(ADAPTERS), r=16, alpha=32,
                          adapter_names=ADAPTERS)
        for layer in bk.model.adapter_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.02)
        for name in ADAPTERS:
            bk.save_peft_adapter(model, name, Path(tmp) / name)
        for workload, requests in workloads().items():
            records = results[workload] = {"off": [], "on": []}
            for _ in range(args.rounds):
                for label, cache_tokens in (("off", 0), ("on", 8192)):
                    record = run_once(Path(tmp), requests, cache_tokens, args.device, args.quick)
                    records[label].append(record)
                    print(f"{workload}: prefix cache {label}: {record['wall_s']:.2f} s, "
                          f"{record['reused_tokens']} of {record['prompt_tokens']} prompt tokens reused", flush=True)
            best = {label: min(r["wall_s"] for r in runs) for label, runs in records.items()}
            print(f"{workload}: {best['off'] / best['on']:.2f}x (fastest round each way)", flush=True)
    results["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
