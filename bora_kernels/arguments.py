"""Value types for ``argparse`` shared by our command lines (``bora-bench``, ``bora-serve`` and the
recipes in ``python/``): a bad value stops the program while it parses its arguments, with an error
that names the flag and says what it takes (``argument --steps: must be >= 1, got 0``), before any
work starts or any file is written."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def number(kind: type = int, *, above: float | None = None, at_least: float | None = None,
           at_most: float | None = None, multiple_of: int | None = None, allow_inf: bool = False):
    """A ``type=`` for ``add_argument``: a ``kind`` (``int`` or ``float``; finite unless
    ``allow_inf``, never NaN) that is ``> above``, ``>= at_least``, ``<= at_most`` and a multiple
    of ``multiple_of``, each where given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if math.isnan(value) or (math.isinf(value) and not allow_inf):
            raise argparse.ArgumentTypeError(f"must be {'a number' if allow_inf else 'finite'}, got {text!r}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if at_least is not None and not value >= at_least:
            raise argparse.ArgumentTypeError(f"must be >= {at_least}, got {text}")
        if at_most is not None and not value <= at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most}, got {text}")
        if multiple_of is not None and value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {text}")
        return value

    return parse


POSITIVE_INT = number(int, at_least=1)
POSITIVE = number(float, above=0)
NON_NEGATIVE = number(float, at_least=0)


def available_device(text: str) -> str:
    """A ``type=`` for ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked, but no CUDA device is visible "
                                             f"(torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} asked, but this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s)")
    return text


def _check_writable(path: Path, what: str) -> Path:
    """``path`` can be written, or made: its nearest existing ancestor is a folder we may write."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r} cannot be made: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r} cannot be written: {str(existing)!r} is read-only")
    return path


def output_folder(text: str) -> Path:
    """A ``type=`` for the folder a program writes its results into when it ends, checked when it
    starts (a folder, or one that can be made, that we may write), so that a long run cannot end
    unable to save what it measured."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return _check_writable(Path(text), "folder")


def output_file(text: str) -> Path:
    """A ``type=`` for a file a program writes when it ends, checked as ``output_folder``."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    return _check_writable(Path(text), "file")
