"""``bora-bench serve``: a load test of ``bora-serve`` against the same server batching one
adapter at a time.

Each run starts ``python -m bora_kernels.serve`` on loopback (a fresh process), warms it up with
one request per adapter, then sends ``requests`` streamed completions from ``concurrency``
clients, request ``i`` on adapter ``i % adapters`` with a random lowercase prompt and
``max_tokens`` tokens (``ignore_eos``, greedy, so every request generates the same count). It
measures throughput (generated tokens per second of wall time), latency and time to the first
token (p50, p99), and counts failed requests (an error status or a broken stream) and lost ones
(not finished within ``time_limit``).

The baseline is the same server, model, adapters and clients with ``--schedule per-adapter``:
only requests for the running batch's adapter join it, so each forward serves one adapter (what
a server without multi-adapter kernels does, e.g. PEFT with ``set_adapter`` per batch), with
continuous batching still on, so the difference measured is the mixing of adapters alone.

The adapters are random PEFT LoRA adapters (rank ``rank`` on every linear layer but the output
head) for the model, written to a temporary adapter root: throughput does not depend on what
they learned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEDULES = {"bora (mixed adapters per step)": "mixed", "baseline (one adapter per step)": "per-adapter"}


@dataclasses.dataclass
class LoadCase:
    requests: int = 256
    concurrency: int = 32
    adapters: int = 16
    max_tokens: int = 32
    prompt_tokens: tuple[int, int] = (8, 32)
    rank: int = 8
    time_limit: float = 600.0
    quantize: str | None = None  # "nf4": both servers keep the base in NF4 (bora-serve --quantize)
    slots: int | None = None  # adapter slots of both servers (--max-adapters; default: one per adapter)


QUICK = LoadCase(requests=64, concurrency=16, adapters=8, max_tokens=16)


def make_adapters(model_dir: Path, out: Path, count: int, rank: int, seed: int = 0) -> list[str]:
    """``count`` random PEFT adapters for the model in ``model_dir``, saved under ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    import bora_kernels as bk
    from bora_kernels.serve.engine import DEFAULT_TARGETS

    torch.manual_seed(seed)
    names = [f"load{d:02d}" for d in range(count)]
    model = bk.inject(AutoModelForCausalLM.from_pretrained(model_dir), DEFAULT_TARGETS, count, r=rank,
                      alpha=2 * rank, adapter_names=names)
    for layer in bk.model.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    for name in names:
        bk.save_peft_adapter(model, name, out / name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Return once the server process ``proc`` answers ``url``'s ``/health``; raise
    ``RuntimeError`` when it exits first or ``timeout`` seconds pass (killing it)."""
    import httpx

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            error = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"bora-serve exited with {proc.returncode}: {error}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"bora-serve did not answer /health within {timeout:g} s")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def start_server(model_dir: Path, root: Path, case: LoadCase, schedule: str,
                 device: str) -> tuple[subprocess.Popen, str, str]:
    """Start bora-serve for ``case``; returns the process, its URL and the line it printed on
    starting (what it serves: adapters, schedule, NF4 base)."""
    port = free_port()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # CPU figures are for the torch path, never the interpreter
    command = [sys.executable, "-m", "bora_kernels.serve", "--model", str(model_dir), "--adapter-root", str(root),
               "--port", str(port), "--device", device, "--max-adapters", str(case.slots or case.adapters),
               "--max-lora-rank", str(case.rank), "--max-batch", str(case.concurrency),
               "--max-queue", str(case.requests + case.adapters), "--schedule", schedule,
               "--served-model-name", "base", "--no-access-log", "--log-level", "warning"]
    if case.quantize:
        command += ["--quantize", case.quantize]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 300)
    banner = ""  # printed before the server answers, so it is in the pipe by now
    while not banner.startswith("bora-serve:"):
        banner = proc.stderr.readline()
        if not banner:
            break
    return proc, url, banner.strip()


async def _one(client, url: str, body: dict) -> dict:
    """One streamed completion: latency, time to first token, tokens, or the error."""
    start = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"status {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event["choices"] and event["choices"][0]["text"] and first is None:
                    first = time.perf_counter() - start
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except Exception as err:  # a broken connection is a failed request, not a crashed benchmark
        return {"error": f"{type(err).__name__}: {err}"}
    if not done:
        return {"error": "the stream ended without [DONE]"}
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def _load(url: str, bodies: list[dict], concurrency: int, time_limit: float) -> tuple[list[dict], float]:
    import httpx

    results: list[dict | None] = [None] * len(bodies)
    queue = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(time_limit)) as client:
        async def worker():
            for i in queue:
                results[i] = await _one(client, url, bodies[i])

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    return results, wall


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_schedule(model_dir: Path, root: Path, names: list[str], case: LoadCase, schedule: str, device: str,
                 seed: int = 0) -> dict:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def body(adapter: str) -> dict:
        length = rng.randint(*case.prompt_tokens)
        return {"model": adapter, "prompt": "".join(rng.choice(letters) for _ in range(length)),
                "max_tokens": case.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}

    proc, url, banner = start_server(model_dir, root, case, schedule, device)
    try:
        warm = [body(name) for name in names]
        asyncio.run(_load(url, warm, case.concurrency, case.time_limit))
        bodies = [body(names[i % len(names)]) for i in range(case.requests)]
        results, wall = asyncio.run(_load(url, bodies, case.concurrency, case.time_limit))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r for r in results if r is not None and "error" not in r]
    errors = [r["error"] for r in results if r is not None and "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"schedule": schedule, "server": banner, "completed": len(ok), "failed": len(errors), "lost": results.count(None),
            "errors": errors[:5], "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_p50_s": _percentile(latencies, 0.5), "latency_p99_s": _percentile(latencies, 0.99),
            "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
            "wrong_token_counts": sum(r["tokens"] != case.max_tokens for r in ok)}


def _s(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _summary(r: dict) -> str:
    return (f"{r['tokens_per_s']:.0f} tokens/s, latency p50 {_s(r['latency_p50_s'])} s p99 {_s(r['latency_p99_s'])} s, "
            f"TTFT p50 {_s(r['ttft_p50_s'], 3)} s, {r['failed']} failed, {r['lost']} lost")


def run(case: LoadCase, model_dir: Path | None, device: str, echo=print) -> dict:
    """Both schedules on one model; returns the records and the throughput ratio."""
    from bora_kernels.serve import demo

    model_dir = Path(model_dir) if model_dir else demo.ensure() / "base"
    records = {}
    with tempfile.TemporaryDirectory(prefix="bora-bench-serve-") as tmp:
        root = Path(tmp)
        names = make_adapters(model_dir, root, case.adapters, case.rank)
        for label, schedule in SCHEDULES.items():
            records[label] = run_schedule(model_dir, root, names, case, schedule, device)
            echo(f"  {label}: {_summary(records[label])}", file=sys.stderr)
    ours, base = records.values()
    return {"case": dataclasses.asdict(case), "model": str(model_dir), "runs": records,
            "throughput_ratio": ours["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None}


def format_result(result: dict, device_name: str) -> str:
    case = result["case"]
    lines = [f"bora-bench serve on {device_name}: {case['requests']} requests from {case['concurrency']} clients "
             f"over {case['adapters']} adapters, {case['max_tokens']} tokens each"
             + (f", base in {case['quantize'].upper()}" if case.get("quantize") else "")
             + (f", {case['slots']} adapter slots (the others loaded on demand)" if case.get("slots") else ""),
             "| server | tokens/s | latency p50 / p99 (s) | TTFT p50 / p99 (s) | failed | lost |",
             "|---|---|---|---|---|---|"]
    for label, r in result["runs"].items():
        lines.append(f"| {label} | {r['tokens_per_s']:.0f} | {_s(r['latency_p50_s'])} / {_s(r['latency_p99_s'])} | "
                     f"{_s(r['ttft_p50_s'], 3)} / {_s(r['ttft_p99_s'], 3)} | {r['failed']} | {r['lost']} |")
    lines.append(f"throughput ratio (bora / baseline): {_s(result['throughput_ratio'])}x")
    return "\n".join(lines)
