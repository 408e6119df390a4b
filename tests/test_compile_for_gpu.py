"""Every Triton kernel compiles for an H100 (sm_90) and fits it, on CI's CPU-only machine: the
interpreter that runs the kernels in the other tests accepts code that the compiler refuses. And
every launch that ``_common.launch`` makes directly reaches the launcher with the compiled kernel,
grid and arguments Triton's own launch would give. ``tests/compile_for_gpu.py`` does the work in a
fresh process (this one has the interpreter on), once with the installed Triton (CI's) and once
with the GPU machine's (3.6, which ``make`` installs beside the venv in ``triton-3.6.0``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
GPU_TRITON = Path(sys.prefix) / "triton-3.6.0"  # the Makefile's GPU_TRITON, inside the venv


@pytest.mark.parametrize("triton_dir", [pytest.param(None, id="installed-triton"),
                                        pytest.param(GPU_TRITON, id="gpu-machine-triton-3.6")])
def test_every_kernel_compiles_for_an_h100(triton_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = [str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")]
    if triton_dir is not None:
        if not (triton_dir / "triton").is_dir():
            pytest.skip(f"no Triton at {triton_dir} (`make setup` installs the GPU machine's there)")
        path.insert(0, str(triton_dir))
    env["PYTHONPATH"] = os.pathsep.join(path)
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1200, env=env)
    if result.returncode == 3:
        pytest.skip("this Triton cannot compile for sm_90 here: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    if triton_dir is not None:
        assert "triton 3.6.0" in result.stdout, result.stdout[:500]
    for kernel in ("_lora_shrink_expand_kernel", "_lora_weight_grad_kernel", "_context_vector_kernel",
                   "_ivon_step_kernel", "_nf4_matmul_kernel", "_nf4_dequantize_kernel", "_nf4_quantize_kernel"):
        assert kernel in result.stdout, result.stdout
    assert "checked against Triton's own" in result.stdout, result.stdout
