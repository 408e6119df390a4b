"""Serving many adapters over one model.

- ``engine.py``: the continuous-batching engine (one model thread, adapter slots, own KV cache);
- ``prefix_cache.py``: prompt prefixes' keys and values kept between requests, per adapter;
- ``guided.py``: outputs restricted to one of a list of strings, or to a pattern's matches;
- ``pattern.py``: regular expressions as automata over characters (for guided patterns);
- ``json_schema.py``: JSON schemas as such patterns (guided JSON);
- ``app.py``: the OpenAI-compatible HTTP API over it (FastAPI; extra ``[serve]``);
- ``cli.py``: ``bora-serve`` / ``python -m bora_kernels.serve``;
- ``demo.py``: the tiny model and adapters ``bora-serve --demo`` serves;
- ``ray.py``: the engine as a Ray Serve deployment with model multiplexing (extra ``[ray]``).
"""

from .engine import (Engine, InvalidParams, QueueFull, Request, SamplingParams, SlotsBusy, TokenLogprobs,
                     UnknownAdapter)

__all__ = ["Engine", "InvalidParams", "QueueFull", "Request", "SamplingParams", "SlotsBusy", "TokenLogprobs",
           "UnknownAdapter"]
