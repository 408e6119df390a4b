"""Compiled Triton (unlike the interpreter that CI runs) refuses a kernel that reads a plain module
global; only ``tl.constexpr(...)`` values, other jitted functions and modules may be used."""

import importlib
import pkgutil
import types

import triton.language as tl

import bora_kernels


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
    assert "bora_kernels.ops.lora_delta.triton._lora_shrink_kernel" in found, sorted(found)
    bad = []
    for qualname, fn in found.items():
        for name in fn.__code__.co_names:
            value = fn.__globals__.get(name)
            if value is None or isinstance(value, (tl.constexpr, types.ModuleType)):
                continue
            if getattr(value, "fn", None) is not None or type(value).__module__.startswith("triton"):
                continue  # another jitted function, or a triton object
            bad.append(f"{qualname} reads {name} = {value!r}")
    assert not bad, "kernels read plain globals (use tl.constexpr(...)):\n" + "\n".join(bad)
