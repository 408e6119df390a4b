"""The server's counters and histograms, written in Prometheus' text format (version 0.0.4).

Counters and histograms are updated from the server's event loop; gauges are read when the page is
rendered. No dependency: the format is a few lines per metric."""

from __future__ import annotations

import bisect
import collections
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# name -> (type, help)
METRICS = {
    "bora_requests_total": ("counter", "Finished generation requests, by adapter and finish reason."),
    "bora_http_errors_total": ("counter", "Requests refused with an error status, by status code."),
    "bora_prompt_tokens_total": ("counter", "Prompt tokens of the requests served, by adapter."),
    "bora_generation_tokens_total": ("counter", "Generated tokens, by adapter."),
    "bora_engine_steps_total": ("counter", "Decode steps the engine ran (one forward over the running batch each)."),
    "bora_engine_step_sequences_total": ("counter", "Sequences summed over decode steps (divided by steps: the mean batch)."),
    "bora_engine_prefilled_tokens_total": ("counter", "Prompt tokens the engine prefilled (once per shared prefill)."),
    "bora_engine_prefix_cache_hit_tokens_total": ("counter", "Of those, tokens reused from the prefix cache."),
    "bora_prefix_cache_tokens": ("gauge", "Prompt tokens the prefix cache holds."),
    "bora_queue_depth": ("gauge", "Requests waiting to join the batch."),
    "bora_batch_size": ("gauge", "Sequences in the running batch."),
    "bora_adapters_loaded": ("gauge", "Adapters loaded (serving or draining)."),
    "bora_adapter_loads_total": ("counter", "Adapters written into a slot (at start, by a load, or on demand)."),
    "bora_adapter_evictions_total": ("counter", "Adapters that gave up their slot to one a request named."),
    "bora_request_latency_seconds": ("histogram", "Time from arrival to the last token."),
    "bora_time_to_first_token_seconds": ("histogram", "Time from arrival to the first token."),
}


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: tuple) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        # name -> labels -> [bucket counts..., sum, count]
        self._histograms: dict[str, dict[tuple, list]] = collections.defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            cells = self._histograms[name].setdefault(key, [0] * (len(LATENCY_BUCKETS) + 2))
            cells[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1  # the first bucket with value <= le
            cells[-2] += value
            cells[-1] += 1

    def render(self, counters: dict[str, float], gauges: dict[str, float]) -> str:
        """The exposition text; ``counters`` and ``gauges`` are read from the engine now."""
        lines = []
        with self._lock:
            for name, (kind, text) in METRICS.items():
                lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
                if kind == "counter" and name in counters:
                    lines.append(f"{name} {counters[name]:g}")
                elif kind == "counter":
                    lines.extend(f"{name}{_labels(k)} {v:g}" for k, v in sorted(self._counters.get(name, {}).items()))
                elif kind == "gauge":
                    lines.append(f"{name} {gauges.get(name, 0):g}")
                else:
                    for key, cells in sorted(self._histograms.get(name, {}).items()):
                        total = 0
                        for le, n in zip(LATENCY_BUCKETS, cells):
                            total += n
                            lines.append(f"{name}_bucket{_labels(key + (('le', f'{le:g}'),))} {total}")
                        lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {cells[-1]}")
                        lines.append(f"{name}_sum{_labels(key)} {cells[-2]:g}")
                        lines.append(f"{name}_count{_labels(key)} {cells[-1]}")
        return "\n".join(lines) + "\n"
