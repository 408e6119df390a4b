"""``_common.launch``: which calls it makes directly, with what, and that its key never lets two
calls Triton would compile apart share a compiled kernel. Triton's own argument specialisation
(``native_specialize_impl``, the function its launches call) is the oracle; the kernel, its
compiled variants and the driver are stand-ins, so this runs in-process under the interpreter."""

import types

import pytest
import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from bora_kernels.ops import _common

STREAM = 7


class FakeCompiled:
    """A compiled variant: records the calls its launcher gets."""

    def __init__(self, key):
        self.key, self.function, self.packed_metadata, self.calls = key, object(), (4, 1, 0), []

    def run(self, *call):
        self.calls.append(call)


class FakeKernel:
    """A JITFunction as ``launch`` sees it; ``kernel[grid](...)`` specialises the arguments as
    Triton does and returns (compiling once) the variant for that specialisation."""

    def __init__(self, signature, not_specialized=(), refuse=False):
        self.arg_names = [name for name, _ in signature]
        self.params = [types.SimpleNamespace(num=i, is_constexpr=constexpr, do_not_specialize=name in not_specialized)
                       for i, (name, constexpr) in enumerate(signature)]
        self.variants, self.triton_launches, self.refuse = {}, [], refuse

    def specialisation(self, args, kwargs):
        bound = dict(zip(self.arg_names, args)) | kwargs
        return tuple(("constexpr", bound[p_name]) if p.is_constexpr else
                     native_specialize_impl(BaseBackend, bound[p_name], False, not p.do_not_specialize, True)
                     for p_name, p in zip(self.arg_names, self.params)), \
            tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.arg_names))

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            key = self.specialisation(args, kwargs)
            compiled = self.variants.setdefault(key, FakeCompiled(key))
            if self.refuse:
                compiled.run = lambda *call: (_ for _ in ()).throw(TypeError("function takes 9 arguments"))
            self.triton_launches.append((compiled, grid))
            return compiled
        return run


@pytest.fixture
def compiled_mode(monkeypatch):
    """``launch`` as on a GPU: compiled kernels, a driver with a current device and stream."""
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: STREAM)
    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "_driver", types.SimpleNamespace(active=active))
    if not _common.DIRECT_LAUNCH:
        pytest.skip(f"no direct launch with Triton {triton.__version__}")
    monkeypatch.setattr(_common, "DIRECT_LAUNCH", True)


SIGNATURE = [("x_ptr", False), ("f", False), ("n", False), ("m", False), ("BLOCK", True)]


def test_second_call_goes_straight_to_the_launcher(compiled_mode):
    kernel = FakeKernel(SIGNATURE)
    x = torch.zeros(64)
    first = _common.launch(kernel, (3,), x, 0.5, 7, 9, BLOCK=32, num_warps=4)
    assert len(kernel.triton_launches) == 1 and not first.calls
    second = _common.launch(kernel, (3,), x, 0.5, 7, 9, BLOCK=32, num_warps=4)
    assert second is first and len(kernel.triton_launches) == 1
    (call,) = first.calls  # the grid padded to 3 dims, the stream, no hooks, constexprs in signature order
    assert call[:4] == (3, 1, 1, STREAM) and call[4] is first.function and call[5] == first.packed_metadata
    assert call[6:9] == (None, None, None) and call[9] is x and call[10:] == (0.5, 7, 9, 32)


# each call after the first differs from the one before in one thing Triton specialises on, or in
# one thing it does not (then the variant must be shared)
CALLS = [
    ("aligned", lambda x: (x, 1.0, 5, 5), {}),
    ("unaligned pointer", lambda x: (x[1:], 1.0, 5, 5), {}),
    ("aligned again at another offset", lambda x: (x[4:], 1.0, 5, 5), {}),
    ("bf16 pointer", lambda x: (x.to(torch.bfloat16), 1.0, 5, 5), {}),
    ("another float value (not specialised)", lambda x: (x, 0.25, 5, 5), {}),
    ("int 1", lambda x: (x, 1.0, 1, 5), {}),
    ("int divisible by 16", lambda x: (x, 1.0, 32, 5), {}),
    ("another int divisible by 16", lambda x: (x, 1.0, 48, 5), {}),
    ("int64 range", lambda x: (x, 1.0, 2 ** 31, 5), {}),
    ("negative int64 range", lambda x: (x, 1.0, -2 ** 31 - 1, 5), {}),
    ("bool for an int", lambda x: (x, 1.0, True, 5), {}),
    ("unspecialised int: 1 is just an int32", lambda x: (x, 1.0, 5, 1), {}),
    ("unspecialised int: 16 too", lambda x: (x, 1.0, 5, 16), {}),
    ("unspecialised int64", lambda x: (x, 1.0, 5, 2 ** 40), {}),
    ("unspecialised uint64", lambda x: (x, 1.0, 5, 2 ** 63), {}),
    ("another constexpr", lambda x: (x, 1.0, 5, 5), {"BLOCK": 64}),
    ("another launch option value", lambda x: (x, 1.0, 5, 5), {"num_warps": 8}),
    ("another launch option, same value", lambda x: (x, 1.0, 5, 5), {"BLOCK": 16, "num_stages": 4}),
]


def test_key_never_merges_what_triton_specialises_apart(compiled_mode):
    kernel = FakeKernel(SIGNATURE, not_specialized=("m",))
    x = torch.zeros(64)
    direct = []
    for round_ in range(2):  # the first round fills the keys, the second runs directly
        for name, make, extra in CALLS:
            kwargs = extra if "BLOCK" in extra and len(extra) > 1 else {"BLOCK": 16, "num_warps": 4} | extra
            args = make(x)
            expected = kernel.variants.get(kernel.specialisation(args, kwargs))
            got = _common.launch(kernel, (1,), *args, **kwargs)
            assert expected is None or got is expected, f"round {round_}, {name}: another call's kernel"
            assert got.key == kernel.specialisation(args, kwargs), name
        direct.append(sum(len(v.calls) for v in kernel.variants.values()))
    assert direct[1] - direct[0] == len(CALLS), "the second round should launch every call directly"
    assert direct[0] > 0  # calls Triton would not tell apart share a key: "aligned again", "another float"
    assert len(kernel.triton_launches) == len(CALLS) - direct[0]


def test_hooks_interpreter_and_positional_constexprs_take_tritons_path(compiled_mode, monkeypatch):
    x = torch.zeros(64)
    positional = FakeKernel(SIGNATURE)
    for _ in range(3):
        _common.launch(positional, (1,), x, 1.0, 5, 5, 16)  # BLOCK by position
    assert len(positional.triton_launches) == 3
    kernel = FakeKernel(SIGNATURE)
    hook = lambda metadata: None  # noqa: E731 - a profiler's
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            _common.launch(kernel, (1,), x, 1.0, 5, 5, BLOCK=16)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.triton_launches) == 3
    monkeypatch.setattr(_common, "INTERPRETED", True)
    _common.launch(kernel, (1,), x, 1.0, 5, 5, BLOCK=16)
    assert len(kernel.triton_launches) == 4


def test_a_refusing_launcher_turns_the_direct_path_off(compiled_mode):
    kernel = FakeKernel(SIGNATURE, refuse=True)
    x = torch.zeros(64)
    _common.launch(kernel, (1,), x, 1.0, 5, 5, BLOCK=16)
    with pytest.warns(RuntimeWarning, match="launches through Triton's own path"):
        _common.launch(kernel, (1,), x, 1.0, 5, 5, BLOCK=16)
    assert not _common.DIRECT_LAUNCH and len(kernel.triton_launches) == 2


def test_cache_starts_over_when_full(compiled_mode, monkeypatch):
    monkeypatch.setattr(_common, "_LAUNCH_CACHE_SIZE", 3)
    kernel = FakeKernel(SIGNATURE)
    x = torch.zeros(64)
    for n in range(2, 9):  # seven keys
        _common.launch(kernel, (1,), x, 1.0, n, 5, BLOCK=16)
    assert len(_common._launch_caches[id(kernel)].entries) <= 3
    _common.launch(kernel, (1,), x, 1.0, 8, 5, BLOCK=16)  # the newest key is still there
    assert sum(len(v.calls) for v in kernel.variants.values()) == 1


@pytest.mark.gpu
def test_direct_launches_compute_what_tritons_own_do_on_a_gpu(monkeypatch):
    """Every op, twice per launch path (the second call of a key is the direct launch): bitwise the
    same outputs and gradients as with every kernel launched by Triton itself."""
    from bora_kernels.ops import context_bias, context_lora_delta, lora_delta, nf4_matmul
    from bora_kernels.optim import IVON
    from bora_kernels.quant import quantize_nf4

    if not _common.DIRECT_LAUNCH:
        pytest.skip(f"no direct launch with Triton {triton.__version__}")
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(3, 50, 96, device=dev, dtype=dt, generator=gen)
    a = torch.randn(4, 8, 96, device=dev, dtype=dt, generator=gen)
    b = torch.randn(4, 80, 8, device=dev, dtype=dt, generator=gen)
    weights = torch.rand(3, 50, 4, device=dev, generator=gen)
    u = torch.randn(3, 50, 80, device=dev, dtype=dt, generator=gen)
    nf4 = quantize_nf4(torch.randn(80, 96, device=dev, dtype=dt, generator=gen), blocksize=32)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, weights, u)]
        xl, al, bl, wl, ul = leaves
        outs = [lora_delta(xl, al, bl, torch.tensor([2, -1, 0], device=dev)),
                context_lora_delta(xl, al, bl, wl), context_bias(ul, bl[:, :, 0].float(), wl),
                nf4_matmul(xl[:, :4], nf4)]
        torch.autograd.backward([o.float().sum() for o in outs])
        torch.manual_seed(1)  # the layer's initial weights and IVON's noise seed
        layer = torch.nn.Linear(96, 80, device=dev)
        opt = IVON(layer.parameters(), lr=0.1, ess=1e4)
        with opt.sampled_params(train=True):
            layer(x[0].float()).square().sum().backward()
        opt.step()
        return [o.detach() for o in outs] + [t.grad for t in leaves] + [layer.weight.detach().clone()]

    results = {}
    for direct in (True, False):
        monkeypatch.setattr(_common, "DIRECT_LAUNCH", direct)
        run()  # keys seen once
        results[direct] = run()
    for got, want in zip(results[True], results[False]):
        assert torch.equal(got, want)
