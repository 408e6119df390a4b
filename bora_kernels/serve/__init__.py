"""Serving many adapters over one model: the continuous-batching engine (``engine.py``)."""

from .engine import Engine, QueueFull, Request, SamplingParams, UnknownAdapter

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams", "UnknownAdapter"]
