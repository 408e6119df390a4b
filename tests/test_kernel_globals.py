"""What compiled Triton refuses and the interpreter that CI runs lets through: a kernel that reads a
plain module global (only ``tl.constexpr(...)`` values, other jitted functions and modules may be
used), and a float literal outside fp32's range, which compiles as fp64. Also the host helpers that
stand in for ``triton.cdiv`` and ``triton.next_power_of_2``."""

import dis
import importlib
import math
import pkgutil
import types

import triton
import triton.language as tl

import bora_kernels
from bora_kernels.ops._common import cdiv, next_power_of_2


def _jitted_functions():
    for info in pkgutil.walk_packages(bora_kernels.__path__, "bora_kernels."):
        if ".bench" in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if isinstance(fn, types.FunctionType) and type(obj).__module__.startswith("triton"):
                yield f"{info.name}.{name}", fn


def test_kernels_read_only_constexpr_globals():
    found = dict(_jitted_functions())
    assert "bora_kernels.ops.lora_delta.triton._lora_shrink_expand_kernel" in found, sorted(found)
    bad = []
    for qualname, fn in found.items():
        # globals only: co_names also holds attribute names (``tl.cdiv`` beside a host ``cdiv``)
        for name in {i.argval for i in dis.get_instructions(fn) if i.opname == "LOAD_GLOBAL"}:
            value = fn.__globals__.get(name)
            if value is None or isinstance(value, (tl.constexpr, types.ModuleType)):
                continue
            if getattr(value, "fn", None) is not None or type(value).__module__.startswith("triton"):
                continue  # another jitted function, or a triton object
            bad.append(f"{qualname} reads {name} = {value!r}")
    assert not bad, "kernels read plain globals (use tl.constexpr(...)):\n" + "\n".join(bad)


def test_kernels_use_no_float_literal_outside_fp32():
    """Compiled, a literal such as 1e-38 (below fp32's normal range) is typed fp64, and fp32-only
    math (``tl.div_rn``, libdevice) then fails to compile; the interpreter runs it (H100, 2026-11-23)."""
    tiny, huge = 2.0 ** -126, (2 - 2 ** -23) * 2.0 ** 127
    bad = [f"{qualname}: {c!r}" for qualname, fn in _jitted_functions() for c in fn.__code__.co_consts
           if isinstance(c, float) and math.isfinite(c) and c != 0 and not tiny <= abs(c) <= huge]
    assert not bad, "float literals that compile as fp64 (write fp32 bits, see quant/triton.py):\n" + "\n".join(bad)


def test_host_helpers_match_triton():
    assert [cdiv(a, b) for a in range(70) for b in range(1, 9)] == \
        [triton.cdiv(a, b) for a in range(70) for b in range(1, 9)]
    assert [next_power_of_2(n) for n in range(1, 300)] == [triton.next_power_of_2(n) for n in range(1, 300)]
