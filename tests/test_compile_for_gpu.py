"""Every Triton kernel compiles for an H100 (sm_90) and fits it, on CI's CPU-only machine: the
interpreter that runs the kernels in the other tests accepts code that the compiler refuses. And
every launch that ``_common.launch`` makes directly reaches the launcher with the compiled kernel,
grid and arguments Triton's own launch would give. ``tests/compile_for_gpu.py`` does the work in
fresh processes (this one has the interpreter on), with the installed Triton (CI's) and with the
GPU machine's (3.6, which ``make`` installs beside the venv in ``triton-3.6.0``), both at once."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
GPU_TRITON = Path(sys.prefix) / "triton-3.6.0"  # the Makefile's GPU_TRITON, inside the venv
UNSUPPORTED = 3


def _start(triton_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = [str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")]
    if triton_dir is not None:
        path.insert(0, str(triton_dir))
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.Popen([sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_every_kernel_compiles_for_an_h100():
    runs = {"installed triton": None}
    if (GPU_TRITON / "triton").is_dir():
        runs["the GPU machine's triton 3.6"] = GPU_TRITON
    else:
        warnings.warn(f"no Triton at {GPU_TRITON} (`make setup` installs the GPU machine's there): compiling with the "
                      f"installed Triton only")
    started = {name: _start(triton_dir) for name, triton_dir in runs.items()}  # two cores: both at once
    checked = 0
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=1500)
        if process.returncode == UNSUPPORTED:
            warnings.warn(f"{name} cannot compile for sm_90 here: {stderr.strip().splitlines()[-1]}")
            continue
        assert process.returncode == 0, f"{name}:\n" + stdout[-3000:] + stderr[-5000:]
        if runs[name] is not None:
            assert "triton 3.6.0" in stdout, stdout[:500]
        for kernel in ("_lora_shrink_expand_kernel", "_lora_weight_grad_kernel", "_context_vector_kernel",
                       "_ivon_step_kernel", "_nf4_matmul_kernel", "_nf4_dequantize_kernel", "_nf4_quantize_kernel"):
            assert kernel in stdout, f"{name}:\n{stdout}"
        assert "checked against Triton's own" in stdout, f"{name}:\n{stdout}"
        checked += 1
    if not checked:
        pytest.skip("no Triton here can compile for sm_90")
