"""The fused IVON step (``ops.ivon_step``) against its float64 reference, on both CPU paths, for
every mode a step can be in: fold one sample or the k-th, store the running means or update,
update from final means (after an all-reduce), draw or not; both Hessian estimators; fp32, fp16
and bf16 gradients and samples; sizes around the kernel's block. Outputs are poisoned."""

import math

import pytest
import torch

from bora_kernels.ops import use_backend
from bora_kernels.ops.ivon_step import StepScalars, ivon_step
from bora_kernels.ops.ivon_step.reference import ivon_step_reference
from bora_kernels.ops.ivon_step.triton import BLOCK
from conftest import KERNEL_AND_TORCH, NEEDS_INTERPRETER
from tolerances import assert_close

SIZES = [pytest.param(1, id="n1"), pytest.param(BLOCK - 1, id="block-1"),
         pytest.param(4 * BLOCK + 37, id="4block+37")]
# (grad, count, update, draw): what the optimizer asks of a call
MODES = [pytest.param(True, 1, True, True, id="fold1-update-draw"),
         pytest.param(True, 3, True, True, id="fold3-update-draw"),
         pytest.param(True, 1, False, True, id="fold1-store-draw"),
         pytest.param(True, 2, False, False, id="fold2-store"),
         pytest.param(False, 0, True, False, id="final-means-update"),
         pytest.param(False, 0, False, True, id="draw-only")]
SCALARS = StepScalars(lr=0.05 * (0.2 + 1e-3), ess=500.0, weight_decay=1e-3, beta1=0.9, beta2=0.999,
                      debias=1 - 0.9 ** 3, clip_radius=0.3)


def _state(n, gen):
    return dict(mean=torch.randn(n, generator=gen), momentum=0.1 * torch.randn(n, generator=gen),
                hess=torch.rand(n, generator=gen) + 0.05, avg_grad=torch.randn(n, generator=gen),
                avg_hess_stat=0.1 * torch.randn(n, generator=gen))


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("fold,count,update,draw", MODES)
@pytest.mark.parametrize("n", SIZES)
def test_step_matches_reference(backend, dtype, hess_approx, fold, count, update, draw, n):
    gen = torch.Generator().manual_seed(n + count)
    st = _state(n, gen)
    grad = torch.randn(n, generator=gen).to(dtype) if fold else None
    eps_now, eps_next = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    reads_avg = (fold and count > 1) or (not fold and update)
    writes_avg = fold and not update
    ref = ivon_step_reference(st["mean"], st["momentum"], st["hess"], SCALARS, grad=grad, count=count,
                              avg_grad=st["avg_grad"] if reads_avg else None,
                              avg_hess_stat=st["avg_hess_stat"] if reads_avg else None, update=update,
                              eps_now=eps_now, eps_next=eps_next if draw else None, draw_ess=2 * SCALARS.ess,
                              hess_approx=hess_approx)
    got = {k: v.clone() for k, v in st.items()}
    if writes_avg and not reads_avg:  # written only: poisoned
        got["avg_grad"].fill_(float("nan"))
        got["avg_hess_stat"].fill_(float("nan"))
    sample = torch.full((n,), float("nan"), dtype=dtype) if draw else None
    mean_copy = torch.full((n,), float("nan"), dtype=dtype) if update and dtype != torch.float32 else None
    with use_backend(backend):
        ivon_step(got["mean"], got["momentum"], got["hess"], SCALARS, grad=grad, count=count,
                  avg_grad=got["avg_grad"], avg_hess_stat=got["avg_hess_stat"], update=update, sample=sample,
                  mean_copy=mean_copy, eps_now=eps_now, eps_next=eps_next if draw else None,
                  draw_ess=2 * SCALARS.ess, hess_approx=hess_approx)
    for k in ("mean", "momentum", "hess"):
        if update:
            assert_close(got[k], ref[k], torch.float32, k)
        else:
            assert torch.equal(got[k], st[k]), f"{k} changed without update"
    if writes_avg:
        assert_close(got["avg_grad"], ref["avg_grad"], torch.float32, "avg_grad")
        assert_close(got["avg_hess_stat"], ref["avg_hess_stat"], torch.float32, "avg_hess_stat")
    if draw:
        assert_close(sample, ref["sample"], dtype, "sample")
    if mean_copy is not None:
        assert torch.equal(mean_copy, got["mean"].to(dtype)), "mean_copy is not the fp32 mean rounded"


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("step,beta1", [(1, 0.9), (3, 0.9), (57, 0.9), (400, 0.9), (7, 0.999), (2000, 0.999),
                                        (5, 0.0), (9, 1 - 2 ** -20)])
def test_counters_on_the_device_stand_for_the_host_values(backend, step, beta1):
    """``counters`` (a CUDA graph's optimizer): ``1 - beta1**t`` from the step count and Philox
    draws relative to the draws made give the same bits as the host's debias and draw indices."""
    gen = torch.Generator().manual_seed(step)
    n, draws = 2 * BLOCK + 77, 11
    st = _state(n, gen)
    grad = torch.randn(n, generator=gen)
    philox = backend == "triton"
    if philox:  # the host passes absolute draw indices, the counters' caller offsets from the draws made
        noise = {"host": (draws - 2, draws - 1), "counters": (-2, -1)}
    else:
        eps = (torch.randn(n, generator=gen), torch.randn(n, generator=gen))
        noise = {"host": eps, "counters": eps}
    outs = {}
    for how in ("host", "counters"):
        host = how == "host"
        scalars = SCALARS._replace(beta1=beta1, debias=1.0 - math.pow(beta1, step) if host else None)
        got = {k: v.clone() for k, v in st.items()}
        sample = torch.full((n,), float("nan"))
        with use_backend(backend):
            ivon_step(got["mean"], got["momentum"], got["hess"], scalars, grad=grad, count=2,
                      avg_grad=got["avg_grad"], avg_hess_stat=got["avg_hess_stat"], sample=sample,
                      eps_now=noise[how][0], eps_next=noise[how][1], seed=5,
                      counters=None if host else torch.tensor([step, draws]))
        outs[how] = [got["mean"], got["momentum"], got["hess"], sample]
    for a, b, name in zip(outs["host"], outs["counters"], ("mean", "momentum", "hess", "sample")):
        assert torch.equal(a, b), f"{name}: counters on the device differ from the host's values"


@NEEDS_INTERPRETER
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_kernel_and_torch_path_agree(hess_approx):
    """Same inputs, both paths: equal up to one rounding (torch's CPU sqrt is not correctly
    rounded, the kernel's is)."""
    gen = torch.Generator().manual_seed(7)
    n = 3 * BLOCK + 5
    st = _state(n, gen)
    grad, eps_now, eps_next = (torch.randn(n, generator=gen) for _ in range(3))
    outs = []
    for backend in ("triton", "torch"):
        got = {k: v.clone() for k, v in st.items()}
        sample = torch.full((n,), float("nan"))
        with use_backend(backend):
            ivon_step(got["mean"], got["momentum"], got["hess"], SCALARS, grad=grad, count=2,
                      avg_grad=got["avg_grad"], avg_hess_stat=got["avg_hess_stat"], sample=sample, eps_now=eps_now,
                      eps_next=eps_next, hess_approx=hess_approx)
        outs.append([got["mean"], got["momentum"], got["hess"], sample])
    for a, b, name in zip(*outs, ("mean", "momentum", "hess", "sample")):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err < 1e-6, f"{name}: paths differ by {err:.1e}"


def _philox_draw(n, draw, seed, scale=1.0, index_base=0, device="cpu"):
    """Philox noise from the kernel: a draw-only call with m = 0 and ess*(h + wd) = 1/scale^2."""
    s = StepScalars(0.0, 1.0 / scale ** 2, 0.0, 0.9, 0.999, 1.0, float("inf"))
    sample = torch.full((n,), float("nan"), device=device)
    ivon_step(torch.zeros(n, device=device), torch.zeros(n, device=device), torch.ones(n, device=device), s,
              update=False, sample=sample, eps_next=draw, seed=seed, index_base=index_base)
    return sample


@NEEDS_INTERPRETER
def test_philox_noise_statistics():
    """Per element over 256 draws: mean 0 and variance 1 within 5 standard errors (max over 2.5k
    elements of |z| stays under 5 with probability > 0.999); pooled mean and variance within 5
    standard errors; neighbouring elements and consecutive draws uncorrelated (|r| < 5/sqrt(N))."""
    n, draws = 2 * BLOCK + 501, 256
    with use_backend("triton"):
        z = torch.stack([_philox_draw(n, d, seed=1234) for d in range(draws)]).double()
    assert torch.isfinite(z).all()
    mean_se, var_se = 1 / draws ** 0.5, (2 / (draws - 1)) ** 0.5
    assert z.mean(0).abs().max() < 5 * mean_se
    assert (z.var(0) - 1).abs().max() < 5 * var_se
    total = z.numel()
    assert abs(z.mean().item()) < 5 / total ** 0.5
    assert abs(z.var().item() - 1) < 5 * (2 / total) ** 0.5
    for a, b in ((z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z[:, :BLOCK // 4], z[:, BLOCK // 4:BLOCK // 2])):
        r = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()
        assert abs(r) < 5 / a.numel() ** 0.5, f"correlation {r}"


@NEEDS_INTERPRETER
def test_philox_noise_is_repeatable_and_scaled():
    with use_backend("triton"):
        a = _philox_draw(1000, 3, seed=99)
        assert torch.equal(a, _philox_draw(1000, 3, seed=99))
        assert not torch.equal(a, _philox_draw(1000, 4, seed=99))
        assert not torch.equal(a, _philox_draw(1000, 3, seed=100))
        # a second group (index_base) gets its own stream; the scale is 1/sqrt(ess*(h + wd))
        assert not torch.equal(a, _philox_draw(1000, 3, seed=99, index_base=1000))
        assert torch.allclose(_philox_draw(1000, 3, seed=99, scale=0.25), 0.25 * a, rtol=1e-6, atol=0)


@pytest.mark.parametrize("call,match", [
    (lambda t: ivon_step(t, t, t[:-1], SCALARS), "hess must be a contiguous 1-D tensor of 8 elements"),
    (lambda t: ivon_step(t, t, t, SCALARS, grad=t.double()), "grad must be one of"),
    (lambda t: ivon_step(t, t, t, SCALARS, grad=t), "eps_now is needed"),
    (lambda t: ivon_step(t, t, t, SCALARS, grad=t, count=0, eps_now=t), "count must be >= 1"),
    (lambda t: ivon_step(t, t, t, SCALARS, grad=t, count=2, eps_now=t), "running means"),
    (lambda t: ivon_step(t, t, t, SCALARS, update=False, sample=t), "eps_next is needed"),
    (lambda t: ivon_step(t, t, t, SCALARS, update=False, sample=t, eps_next=-1), "Philox draw index"),
    (lambda t: ivon_step(t, t, t, SCALARS, hess_approx="kfac"), "hess_approx must be"),
    (lambda t: ivon_step(t, t, t, SCALARS, update=True), "running means"),
    (lambda t: ivon_step(t, t, t, SCALARS._replace(debias=None), grad=t, eps_now=t), "needs counters"),
    (lambda t: ivon_step(t, t, t, SCALARS, grad=t, eps_now=t, counters=torch.zeros(2)), "counters must be an int64"),
    (lambda t: ivon_step(t, t, t, SCALARS, grad=t, eps_now=t, counters=torch.zeros(3, dtype=torch.int64)),
     "counters must be an int64"),
    (lambda t: ivon_step(t, t, t, SCALARS, grad=t, eps_now=t, counters=torch.zeros(2, dtype=torch.int64,
                                                                                  device="meta")), "counters is on"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_kernel_on_gpu(dtype):
    """The compiled kernel: every mode against the reference with bf16 too (the interpreter
    cannot check bf16 casts), Philox noise repeatable and standard normal, and the optimizer
    against ivon-opt on CUDA (noise="torch")."""
    import ivon

    from bora_kernels.optim import IVON

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    n = 1_000_003
    for fold, count, update, draw in [(True, 1, True, True), (True, 3, True, True), (True, 1, False, True),
                                      (False, 0, True, False)]:
        st = {k: v.to(dev) for k, v in _state(n, gen).items()}
        grad = torch.randn(n, generator=gen).to(dev, dtype) if fold else None
        eps_now, eps_next = (torch.randn(n, generator=gen).to(dev, dtype) for _ in range(2))
        reads_avg = (fold and count > 1) or (not fold and update)
        ref = ivon_step_reference(st["mean"], st["momentum"], st["hess"], SCALARS, grad=grad, count=count,
                                  avg_grad=st["avg_grad"] if reads_avg else None,
                                  avg_hess_stat=st["avg_hess_stat"] if reads_avg else None, update=update,
                                  eps_now=eps_now, eps_next=eps_next if draw else None)
        sample = torch.full((n,), float("nan"), device=dev, dtype=dtype) if draw else None
        ivon_step(st["mean"], st["momentum"], st["hess"], SCALARS, grad=grad, count=count, avg_grad=st["avg_grad"],
                  avg_hess_stat=st["avg_hess_stat"], update=update, sample=sample, eps_now=eps_now,
                  eps_next=eps_next if draw else None)
        if update:
            for k in ("mean", "momentum", "hess"):
                assert_close(st[k], ref[k], torch.float32, k)
        if draw:
            assert_close(sample, ref["sample"], dtype, "sample")
    z = torch.stack([_philox_draw(1 << 20, d, seed=7, device=dev) for d in range(4)])
    assert torch.equal(z[0], _philox_draw(1 << 20, 0, seed=7, device=dev))
    assert abs(z.mean().item()) < 5 / z.numel() ** 0.5 and abs(z.var().item() - 1) < 5 * (2 / z.numel()) ** 0.5
    # the optimizer on CUDA against ivon-opt on CUDA
    trajectories = []
    for cls in (ivon.IVON, IVON):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).to(dev)
        x, y = torch.randn(256, 64, device=dev), torch.randint(0, 10, (256,), device=dev)
        extra = {"noise": "torch"} if cls is IVON else {}
        opt = cls(model.parameters(), lr=0.05, ess=1000.0, hess_init=0.1, mc_samples=2, **extra)
        for _ in range(30):
            for _ in range(2):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        trajectories.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    err = ((trajectories[0] - trajectories[1]).norm() / trajectories[0].norm()).item()
    assert err < 1e-5, f"CUDA trajectory differs from ivon-opt by {err:.1e}"

