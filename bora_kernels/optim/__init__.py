"""Optimizers: ``IVON``, whose step (posterior update plus next weight sample) is one fused kernel."""

from .ivon import IVON

__all__ = ["IVON"]
