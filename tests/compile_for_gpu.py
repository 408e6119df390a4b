"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

CI runs the kernels under Triton's interpreter, which accepts code that the compiler refuses (a
float literal typed fp64, two returns of different types, more shared memory than the SM has:
three such bugs reached the first GPU run). This script swaps Triton's CUDA driver for a stand-in
that reports an H100 and launches nothing, makes the ops take their Triton path on CPU tensors
with the GPU's tile sizes (``_common.ASSUME_GPU``), and calls every op forward and backward over
the dtypes and shapes that select different specialisations. Each kernel then goes through
Triton's whole pipeline down to ``ptxas``; only the launch is skipped, so outputs are garbage.
Every launch is also made twice more: directly by ``_common.launch`` and by Triton's own
``kernel[grid]``; the stand-in launcher records both, and they must reach it with the same
compiled kernel, grid and arguments (a probe kernel adds the argument kinds our ops never vary).

    python tests/compile_for_gpu.py     # a table: kernel, variants, registers, spills, shared memory

Exit status: 0 when everything compiled and fits and every direct launch matched, 1 on a compile
error, a launch mismatch or a kernel that does not fit an H100 (its shared memory, or spills to
local memory), 3 when this Triton has no CUDA backend or its driver interface does not take the
stand-in (``tests/test_compile_for_gpu.py`` skips then).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels

import torch  # noqa: E402
import triton  # noqa: E402

H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90
NO_FMA = ("_nf4_dequantize_kernel", "_nf4_matmul_kernel")  # see main()
UNSUPPORTED = 3


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": H100_SHARED, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1_980_000, "mem_clock_rate": 2_619_000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, threads: stand-ins


class H100Stub:
    """Triton's active-driver interface, as far as compiling and a skipped launch use it."""

    utils = _Utils()

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        return _Launcher()  # the launch is all that is skipped


LAUNCHES: list = []  # (launcher, grid, arguments) of every launch, for the launch check


class _Launcher:
    """A compiled kernel's launcher that records its calls instead of launching."""

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        LAUNCHES.append((self, (grid_x, grid_y, grid_z), packed_metadata, enter_hook, args))


def _install() -> None:
    from triton.runtime import driver

    driver.set_active(H100Stub())

    @triton.jit
    def probe(x_ptr):
        triton.language.store(x_ptr, 1.0)

    probe[(1,)](torch.empty(1))  # the stand-in fits this Triton, and ptxas runs


MISMATCHES: list = []  # launches where _common.launch and Triton's own launch differed
DIRECT: dict = {}  # kernel name -> launches _common.launch made directly (and checked)


def _same(a, b) -> bool:
    return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else type(a) is type(b) and a == b


def _describe(args, kwargs) -> str:
    def one(a):
        return f"{a.dtype}{tuple(a.shape)}@{a.data_ptr() % 16}" if isinstance(a, torch.Tensor) else repr(a)
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


def _checked_launch(kernel, grid, *args, **kwargs):
    """``_common.launch``, checked against Triton's own ``kernel[grid]``: the same compiled kernel,
    grid and arguments reach the launcher. The first call of a key goes through Triton; the second
    is the direct path, which is what is checked."""
    from bora_kernels.ops import _common

    _common.launch(kernel, grid, *args, **kwargs)
    LAUNCHES.clear()
    _common.launch(kernel, grid, *args, **kwargs)
    ours = LAUNCHES[:]
    LAUNCHES.clear()
    kernel[grid](*args, **kwargs)
    theirs = LAUNCHES[:]
    LAUNCHES.clear()
    name = kernel.fn.__name__
    if len(ours) != 1 or len(theirs) != 1 or ours[0][0] is not theirs[0][0] or ours[0][1:3] != theirs[0][1:3] \
            or len(ours[0][4]) != len(theirs[0][4]) or not all(map(_same, ours[0][4], theirs[0][4])):
        MISMATCHES.append(f"{name} grid {grid} args {_describe(args, kwargs)}: launch reached "
                          f"{[(id(c[0]), c[1]) for c in ours]}, Triton {[(id(c[0]), c[1]) for c in theirs]}")
    elif ours[0][3] is None:  # no hooks passed: the direct path ran
        DIRECT[name] = DIRECT.get(name, 0) + 1


def _check_launches() -> None:
    """Route every op's launches through ``_checked_launch``, and run a probe kernel over what
    Triton specialises on, in an order where a key that missed any of it would reuse a kernel
    compiled for other arguments."""
    import importlib
    import pkgutil

    import bora_kernels
    from bora_kernels.ops import _common

    for info in pkgutil.walk_packages(bora_kernels.__path__, "bora_kernels."):
        if info.name.endswith(".triton"):
            module = importlib.import_module(info.name)
            if getattr(module, "launch", None) is _common.launch:
                module.launch = _checked_launch

    tl = triton.language

    @triton.jit(do_not_specialize=["m"])
    def _launch_probe_kernel(x_ptr, f, n, m, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, (tl.load(x_ptr + offs) * f + n + m).to(x_ptr.dtype.element_ty))

    x = torch.zeros(64)
    for tensor, f, n, m, block in ((x, 1.0, 5, 5, 16), (x[1:], 1.0, 5, 5, 16), (x.to(torch.bfloat16), 1.0, 5, 5, 16),
                                   (x, 0.5, 5, 5, 16), (x, 1.0, 1, 5, 16), (x, 1.0, 16, 5, 16), (x, 1.0, 17, 5, 16),
                                   (x, 1.0, 2 ** 31, 5, 16), (x, 1.0, -2 ** 31 - 1, 5, 16), (x, 1.0, 5, 1, 16),
                                   (x, 1.0, 5, 2 ** 31, 16), (x, 1.0, 5, 2 ** 63, 16), (x, 1.0, 5, 5, 32),
                                   (x, 1.0, True, 5, 16), (x[4:], 2.0, 6, 7, 16)):
        _checked_launch(_launch_probe_kernel, (1,), tensor, f, n, m, BLOCK=block)
    if not DIRECT.get("_launch_probe_kernel"):
        MISMATCHES.append("_launch_probe_kernel: the direct path never ran")


def _exercise() -> None:
    """Every op, forward and backward, over what selects its kernels' specialisations."""
    from bora_kernels.ops import (_common, _dispatch, context_bias, context_lora_delta, context_scale, lora_delta,
                                  nf4_matmul)
    from bora_kernels.ops.nf4_matmul.triton import nf4_matmul_dx, nf4_matmul_forward
    from bora_kernels.optim import IVON
    from bora_kernels.quant import quantize_nf4

    _common.ASSUME_GPU = True
    _dispatch.triton_interpreted = lambda: True  # CPU tensors take the Triton path
    k, n = 256, 384
    # decode, prefill and a wide rank in bf16 and fp32; fp16 compiles as bf16 does, so decode only
    cases = [(dtype, *shape) for dtype in (torch.bfloat16, torch.float32)
             for shape in ((4, 4, 8), (512, 4, 16), (512, 2, 128))] + [(torch.float16, 4, 4, 8)]
    for dtype, tokens, adapters, rank in cases:
        x = torch.randn(tokens, k, dtype=dtype, requires_grad=True)
        a = torch.randn(adapters, rank, k, dtype=dtype, requires_grad=True)
        b = torch.randn(adapters, n, rank, dtype=dtype, requires_grad=True)
        ids = torch.arange(tokens) % adapters
        lora_delta(x, a, b, ids).float().sum().backward()
        base = torch.zeros(tokens, n, dtype=dtype, requires_grad=True)
        lora_delta(x, a, b, ids, add_to=base.clone()).float().sum().backward()
        weights = torch.rand(tokens, adapters, requires_grad=True)  # several contexts a token
        context_lora_delta(x, a, b, weights).float().sum().backward()
        with torch.no_grad():  # inference: the masked form where C * R <= 128, ids and weights, into add_to
            context_lora_delta(x, a, b, ids)
            context_lora_delta(x, a, b, weights, add_to=torch.zeros(tokens, n, dtype=dtype))
        u = torch.randn(tokens, n, dtype=dtype, requires_grad=True)
        vec = torch.randn(adapters, n, requires_grad=True)
        (context_bias(u, vec, weights).float().sum() + context_scale(u, vec, ids).float().sum()).backward()
    for dtype in (torch.bfloat16, torch.float32):  # an adapter per sequence
        x = torch.randn(2, 64, k, dtype=dtype, requires_grad=True)
        a = torch.randn(2, 16, k, dtype=dtype, requires_grad=True)
        b = torch.randn(2, n, 16, dtype=dtype, requires_grad=True)
        lora_delta(x, a, b, torch.tensor([1, 0])).float().sum().backward()
    for dtype in (torch.float32, torch.bfloat16):  # IVON: parameter dtypes, estimators, samples, noise, counters
        for samples, hess, noise, capturable in ((1, "price", "philox", False), (3, "gradsq", "philox", False),
                                                 (2, "price", "torch", False), (1, "price", "philox", True)):
            layer = torch.nn.Linear(64, 32).to(dtype)
            opt = IVON(layer.parameters(), lr=0.1, ess=1e4, mc_samples=samples, hess_approx=hess, clip_radius=1e-3,
                       noise=noise, capturable=capturable)
            for _ in range(2):
                for _ in range(samples):
                    with opt.sampled_params(train=True):
                        layer(torch.randn(8, 64, dtype=dtype)).float().square().sum().backward()
                opt.step()
            with opt.sampled_params(train=False, tau=2.0):
                pass
    for dtype, blocksize, double_quant in ((torch.bfloat16, 64, False), (torch.bfloat16, 256, True),
                                           (torch.float16, 64, True)):
        weight = quantize_nf4(torch.randn(n, k, dtype=dtype), blocksize, double_quant)
        weight.dequantize()
        for rows in (1, 16, 64):  # GEMV with split K; one 16-row tile; the tiled GEMM
            x = torch.randn(rows, k, dtype=dtype, requires_grad=True)
            nf4_matmul(x, weight, torch.randn(n, dtype=dtype)).float().sum().backward()
        # the tiled GEMM unsplit, as enough row tiles (M = 1024 on a wide weight) run it
        nf4_matmul_forward(torch.randn(64, k, dtype=dtype), weight, None, (64, n), split=1)
        nf4_matmul_dx(torch.randn(64, n, dtype=dtype), weight, (64, k), split=1)


def _resources(kernel) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        text = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            usage = dict(field.split(":", 1) for field in line.split() if ":" in field)
    return {"registers": int(usage.get("REG", -1)), "spill_bytes": int(usage.get("LOCAL", 0)),
            "shared": kernel.metadata.shared}


def _compiled() -> dict[str, list]:
    """Every kernel the exercise compiled, found in all of bora_kernels' loaded modules (so that a
    new op's kernels are listed without naming them here)."""
    found = {}
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith("bora_kernels"):
            continue
        for name, fn in vars(module).items():
            if isinstance(fn, triton.runtime.JITFunction) and name not in found:
                kernels = [k for cache in fn.device_caches.values() for k in cache[0].values()]
                if kernels:
                    found[name] = kernels
    return found


def main() -> int:
    try:
        _install()
    except Exception:
        traceback.print_exc()
        print(f"this Triton ({triton.__version__}) cannot compile for sm_90 here", file=sys.stderr)
        return UNSUPPORTED
    try:
        _check_launches()
        _exercise()
    except Exception:
        traceback.print_exc()
        return 1
    failed = False
    print(f"triton {triton.__version__}, compiled for sm_90")
    print(f"{'kernel':34s} {'variants':>8s} {'registers':>10s} {'spill B':>8s} {'shared B':>9s}")
    for name, kernels in sorted(_compiled().items()):
        rows = [_resources(k) for k in kernels]
        regs = max(r["registers"] for r in rows)
        spill = max(r["spill_bytes"] for r in rows)
        shared = max(r["shared"] for r in rows)
        print(f"{name:34s} {len(rows):8d} {regs:10d} {spill:8d} {shared:9d}")
        failed |= spill > 0 or shared > H100_SHARED
    if failed:
        print("a kernel spills registers or needs more shared memory than an H100 has", file=sys.stderr)
    # the kernels that read NF4 scales compute a double-quantized absmax as bitsandbytes does,
    # code * nested absmax and + offset rounded apart (quant.triton.scale_operands turns fusion
    # off): an fp32 FMA in their PTX means the compiler contracted it
    contracted = [name for name in NO_FMA for k in _compiled().get(name, []) if "fma.rn.f32" in k.asm["ptx"]]
    if contracted:
        print(f"fp32 FMA in {sorted(set(contracted))}: code * nested + offset contracted", file=sys.stderr)
        failed = True
    print("\nlaunches made directly by _common.launch and checked against Triton's own: "
          + ", ".join(f"{name} {count}" for name, count in sorted(DIRECT.items())))
    undirect = sorted(set(_compiled()) - set(DIRECT))
    if undirect:
        MISMATCHES.append(f"kernels never launched directly: {undirect}")
    if MISMATCHES:
        print("_common.launch differs from Triton's own launch:\n" + "\n".join(MISMATCHES), file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
