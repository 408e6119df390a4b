"""Median wall time of a callable, and the facts a result file must carry."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch


def median_seconds(fn, device: torch.device, quick: bool = False) -> float:
    """Median time of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (it flushes L2 before every run, so inputs are read from
    HBM as in a real layer). CPU: repeated ``perf_counter`` runs after a warm-up, at least 5 and
    until about 0.3 s (0.1 s with ``quick``) have been spent.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                        return_mode="median") / 1e3
    fn()
    budget = 0.1 if quick else 0.3
    times: list[float] = []
    while len(times) < 5 or (sum(times) < budget and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


GRAPH_TIMER = "median of CUDA graph replays: device time, no host work; L2 flushed before each call"


class NotCapturable(RuntimeError):
    """``graph_median_seconds`` could not capture the callable (it syncs with the host, say)."""


def graph_median_seconds(fn, device: torch.device, quick: bool = False) -> float:
    """Median device time of ``fn()`` replayed from a CUDA graph: what a call costs once its host
    work is gone, as in a server or training loop that captures its steps.

    Two graphs are captured after a warm-up on a side stream: ``n`` times (flush L2; ``fn()``) and
    ``n`` times the flush alone (writing twice the L2's bytes, so that inputs come from HBM as in
    ``do_bench``); a figure is the difference of their replay times over ``n``, and the median is
    taken over rounds that replay both. Raises ``NotCapturable`` naming the error when ``fn``
    cannot be captured; the device is usable afterwards.
    """
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
    flush = torch.empty(max(2 * l2_bytes, 2 ** 20) // 4, dtype=torch.int32, device=device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles and caches outside the capture
            fn()
        start = time.perf_counter()
        for _ in range(3):
            flush.zero_()
            fn()
        torch.cuda.synchronize(device)
        host_bound = (time.perf_counter() - start) / 3  # at least the device time
    calls = max(5, min(200, int((0.01 if quick else 0.03) / max(host_bound, 1e-6))))
    graphs = {}
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    flush.zero_()
                    if with_fn:
                        fn()
        except Exception as error:  # noqa: BLE001 - any capture failure is reported, not raised
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            try:
                torch.cuda.synchronize(device)
            except RuntimeError as sticky:  # the capture left an error behind: say so too
                reason += f"; then {type(sticky).__name__}: {(str(sticky).splitlines() or [''])[0]}"
            raise NotCapturable(reason) from error
        graphs[with_fn] = graph
    per_call = []
    for _ in range(5 if quick else 11):
        elapsed = {}
        for with_fn, graph in graphs.items():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize(device)
            elapsed[with_fn] = begin.elapsed_time(end)
        per_call.append(max(elapsed[True] - elapsed[False], 0.0) / calls)
    del graphs
    return statistics.median(per_call) / 1e3


def interleaved_medians(fns: dict, device: torch.device, rounds: int) -> dict:
    """``{key: median seconds}`` of long calls (whole models: milliseconds to seconds each), timed
    in rounds that run every callable once in turn, each between device syncs, after one warm-up
    call each. A drift over the run then falls on every variant alike: on an H100 the base model
    alone sped up by 30% from the first case to the last of one run (2026-11-23), which timing
    variants one after the other turns into a bias of the ratios."""
    for fn in fns.values():
        fn()
    times: dict = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory ``fn()`` allocates on a CUDA device beyond what was allocated before (its output
    included), in MiB; None elsewhere (CPU allocations are not tracked)."""
    if device.type != "cuda":
        return None
    fn()  # warm-up: caches and autotuning are not the op's memory
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment(device: torch.device) -> dict:
    """Device, versions and commit: what a figure means nothing without."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "peft": peft_version,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
        # how IVON's sampled_params swaps the sample in (optim/ivon.py): "storage" or "repoint"
        "ivon_sample_swap": "storage" if hasattr(torch.UntypedStorage, "_swap_data_ptr_") else "repoint",
    }
