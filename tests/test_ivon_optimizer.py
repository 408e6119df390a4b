"""``bora_kernels.optim.IVON`` against ivon-opt 0.1.3 step for step, and its own behaviour: Philox
noise repeatable from torch's seed, sampled_params semantics, gradients as views of the flat
buffer, low-precision parameters, state dicts both ways, argument errors, and ``sync=True`` under
``torch.distributed`` (two CPU processes, gloo)."""

import contextlib
import math
import os
import tempfile

import ivon
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers

import bora_kernels as bk
from bora_kernels.ops import use_backend
from bora_kernels.optim import IVON
from conftest import KERNEL_AND_TORCH, capture_cuda_graph


def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    return model, lambda: F.cross_entropy(model(x), y)


def lora_llama():
    """A tiny Llama with LoRA on q/v (one adapter): only the adapters train."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = bk.inject(transformers.LlamaForCausalLM(config), ["q_proj", "v_proj"], num_adapters=1, r=4, alpha=8)
    with torch.no_grad():  # PEFT-style init leaves B = 0; start from a non-trivial point
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 48, (4, 9))

    def loss():
        with use_backend("torch"), bk.use_adapters(model, torch.zeros(4, dtype=torch.long)):
            return model(input_ids=ids, labels=ids).loss
    return model, loss


def trajectory(make, optimizer_cls, backend, steps, config, predict_after=None, final=None):
    """Train ``steps`` steps; return (params, momentum, h) after each step, flattened. Our IVON
    draws torch noise unless ``config`` says otherwise. ``predict_after``: after that step (from
    0) also draw a test-temperature sample (tau 4) and add it to the step's entry. ``final``
    (a dict) receives the optimizer's ``current_step`` at the end."""
    model, loss_fn = make()
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=0.05, ess=100.0, hess_init=0.1, **config)
    if optimizer_cls is IVON:
        kwargs.setdefault("noise", "torch")
    torch.manual_seed(1)
    out = []
    with use_backend(backend):
        opt = optimizer_cls(params, **kwargs)
        for t in range(steps):
            train(opt, loss_fn, 1, samples=opt.mc_samples)
            state = [torch.cat([g[k] for g in opt.param_groups]) for k in ("momentum", "hess")] \
                if optimizer_cls is ivon.IVON else [opt._momentum, opt._hess]
            out.append([torch.cat([p.detach().reshape(-1) for p in params]).clone()] + [s.clone() for s in state])
            if t == predict_after:
                with opt.sampled_params(tau=4.0):
                    out[-1].append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
    if final is not None:
        final["current_step"] = opt.current_step
    return out


CONFIGS = [pytest.param(dict(hess_approx=h, mc_samples=mc), id=f"{h}-mc{mc}")
           for h in ("price", "gradsq") for mc in (1, 3)] + [
    pytest.param(dict(clip_radius=1e-3, weight_decay=0.1), id="clip-wd"),
    pytest.param(dict(debias=False, rescale_lr=False, weight_decay=0.0), id="no_debias-no_rescale-wd0"),
    pytest.param(dict(hess_approx="gradsq", mc_samples=3, clip_radius=1e-2, debias=False), id="gradsq-mc3-clip")]


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("make", [pytest.param(mlp, id="mlp"), pytest.param(lora_llama, id="lora_llama")])
def test_matches_ivon_opt_step_for_step(make, config, backend):
    """noise="torch", 50 steps, fp32: the torch path is bit-identical to ivon-opt; the kernel's
    square roots are correctly rounded where torch's CPU ones are not, so it agrees to float32
    rounding (relative RMS < 1e-6 at every step)."""
    steps = 50 if make is mlp else 20 if backend == "triton" else 50
    want = trajectory(make, ivon.IVON, "torch", steps, config)
    got = trajectory(make, IVON, backend, steps, config)
    for t, (w, g) in enumerate(zip(want, got)):
        for name, a, b in zip(("params", "momentum", "hess"), w, g):
            if backend == "torch":
                assert torch.equal(a, b), f"step {t + 1}: {name} differs from ivon-opt"
            else:
                err = ((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30)).item()
                assert err < 1e-6, f"step {t + 1}: {name} relative RMS {err:.1e}"
    assert not torch.equal(want[0][0], want[-1][0]), "training did not move the parameters"


def test_both_exchanges_match_ivon_opt(exchange):
    """The sample swapped in either way: the torch path stays bit-identical to ivon-opt."""
    config = dict(hess_approx="price", mc_samples=3, clip_radius=1e-2)
    want = trajectory(mlp, ivon.IVON, "torch", 30, config)
    got = trajectory(mlp, IVON, "torch", 30, config)
    for w, g in zip(want, got):
        assert all(torch.equal(a, b) for a, b in zip(w, g))


def train(opt, loss_fn, steps, samples=1):
    """``steps`` steps of ``samples`` gradient samples each."""
    for _ in range(steps):
        for _ in range(samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_fn().backward()
        opt.step()


def train_scaled(opt, loss_fn, steps, samples, scaler, clip=None, poisoned=()):
    """``train`` through ``torch.amp.GradScaler`` (fp16 training's loop); the losses of the
    ``poisoned`` (step, sample) pairs are made infinite; ``clip``: unscale and clip before stepping."""
    for step in range(steps):
        for sample in range(samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss = loss_fn() * (math.inf if (step, sample) in poisoned else 1.0)
                scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        scaler.step(opt)
        scaler.update()


def _state(opt, model):
    return [opt._mean, opt._momentum, opt._hess, *(p.detach() for p in model.parameters())]


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("config", CONFIGS)
def test_grad_scaler_unscales_every_sample(config, backend):
    """Under ``torch.amp.GradScaler`` (a power-of-two scale, no overflow) training is bit for bit
    the unscaled run: with ``mc_samples > 1`` too, whose earlier samples are folded into the
    running means still scaled (they were before: NaN parameters)."""
    runs = []
    for scaled in (False, True):
        model, loss_fn = mlp()
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, **config)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled)
        with use_backend(backend):
            train_scaled(opt, loss_fn, 4, config.get("mc_samples", 1), scaler)
        runs.append(_state(opt, model))
    for got, want in zip(*runs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_grad_scaler_skips_steps_with_inf_gradients(backend):
    """A step whose folded sample (step 1) or last sample (step 2, GradScaler's own check) held
    inf is skipped: the posterior stays as it was, the scale backs off, training goes on finite."""
    model, loss_fn = mlp()
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, mc_samples=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    with use_backend(backend):
        train_scaled(opt, loss_fn, 1, 2, scaler)
        before = [t.clone() for t in _state(opt, model)]
        train_scaled(opt, loss_fn, 2, 2, scaler, poisoned={(0, 0), (1, 1)})
        assert all(torch.equal(a, b) for a, b in zip(_state(opt, model), before)), "a skipped step changed the state"
        assert opt.current_step == 1 and scaler.get_scale() == 2.0 ** 10
        train_scaled(opt, loss_fn, 2, 2, scaler)
    assert opt.current_step == 3 and all(torch.isfinite(t).all() for t in _state(opt, model))


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_grad_scaler_unscale_before_clipping(backend):
    """``scaler.unscale_(optimizer)`` then clipping, then ``scaler.step``: with one sample per step
    the same as clipping without a scaler; with more it would leave earlier samples scaled, so it
    is refused, naming the call. A captured (capturable) optimizer cannot sync: refused too."""
    runs = []
    for scaled in (False, True):
        model, loss_fn = mlp()
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1)
        with use_backend(backend):
            train_scaled(opt, loss_fn, 3, 1, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled),
                         clip=0.5)
        runs.append(_state(opt, model))
    for got, want in zip(*runs):
        assert torch.equal(got, want)
    model, loss_fn = mlp()
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, mc_samples=2)
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) unscales only the last"):
        train_scaled(opt, loss_fn, 1, 2, torch.amp.GradScaler("cpu"), clip=1.0)
    model, loss_fn = mlp()
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, capturable=True)
    with pytest.raises(RuntimeError, match="capturable=False"):
        train_scaled(opt, loss_fn, 1, 1, torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_philox_runs_repeat_from_torch_seed(backend):
    runs = []
    for seed in (5, 5, 6):
        model, loss_fn = mlp()
        with use_backend(backend):
            torch.manual_seed(seed)
            opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1)
            train(opt, loss_fn, 5)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.fixture(params=["storage", "repoint"])
def exchange(request, monkeypatch):
    """Both ways sampled_params swaps the sample in: trading the buffers' memory (torch builds with
    UntypedStorage._swap_data_ptr_) and re-pointing every parameter (the fallback)."""
    from bora_kernels.optim import ivon as ours

    if request.param == "storage" and not ours.STORAGE_EXCHANGE:
        pytest.skip("this torch build has no UntypedStorage._swap_data_ptr_")
    monkeypatch.setattr(ours, "STORAGE_EXCHANGE", request.param == "storage")
    return request.param


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_the_block_swaps_sample_and_mean(exchange, backend, dtype):
    """Inside the block the parameters hold the sample and posterior() still gives the mean (and
    writes to it stay in the mean); after it the parameters hold the mean in their own memory."""
    model, loss_fn = mlp()
    model = model.to(dtype)
    x, y = torch.randn(32, 5).to(dtype), torch.randint(0, 3, (32,))
    with use_backend(backend):
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1)
        assert opt._exchange_storage == (exchange == "storage")
        train(opt, lambda: F.cross_entropy(model(x).float(), y), 2)
        w = model[0].weight
        where, before = w.data_ptr(), w.detach().clone()
        mean_before = opt.posterior(w)[0].clone()
        with opt.sampled_params(train=True):
            inside = w.detach().clone()
            mean, _ = opt.posterior(w)
            assert torch.equal(mean, mean_before), "posterior() inside the block must give the mean"
            mean[0, 0] += 1.0  # written in place inside the block: kept in the mean
            F.cross_entropy(model(x).float(), y).backward()
        assert not torch.equal(inside, before)
        assert w.data_ptr() == where
        assert torch.equal(opt.posterior(w)[0][0, 0], mean_before[0, 0] + 1.0)
        opt.sync_params()
        assert torch.equal(w.detach(), opt.posterior(w)[0].to(dtype))
        opt.step()
        with opt.sampled_params():
            assert not torch.equal(w.detach(), inside), "the next block shows the next sample"


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_sampled_params_semantics(exchange, backend):
    model, loss_fn = mlp()
    with use_backend(backend):
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1)
        train(opt, loss_fn, 3)
        w = model[0].weight
        mean = w.detach().clone()
        mean_t, variance = opt.posterior(w)
        assert torch.equal(mean_t, mean)
        with opt.sampled_params():
            first = w.detach().clone()
        with opt.sampled_params():
            second = w.detach().clone()
        assert torch.equal(w.detach(), mean)
        assert not torch.equal(first, mean) and not torch.equal(first, second), "each block draws a new sample"
        z = (first - mean) / variance.sqrt()
        assert 0.3 < z.std().item() < 3
        with opt.sampled_params(tau=100.0):  # test temperature: 10x narrower
            narrow = (w.detach() - mean) / variance.sqrt()
        assert narrow.std().item() < z.std().item() / 3
        with opt.sampled_params(tau=math.inf):
            assert torch.equal(w.detach(), mean)
        with pytest.raises(ZeroDivisionError), opt.sampled_params(train=True):
            1 / 0
        assert torch.equal(w.detach(), mean), "an exception must restore the mean"
        with pytest.raises(RuntimeError, match="nested"), opt.sampled_params(), opt.sampled_params():
            pass
        with pytest.raises(RuntimeError, match="needs a gradient sample"):
            opt.step()  # the failed block above took no sample
        with pytest.raises(ValueError, match="tau"):
            with opt.sampled_params(train=True, tau=2.0):
                pass


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_gradients_live_in_the_flat_buffer(backend):
    """After a training sample p.grad views the optimizer's buffer; gradients that are not views
    (model.zero_grad() dropped them) are copied in; zero_grad() first folds a pending sample."""
    results = []
    for drop in (False, True):
        model, loss_fn = mlp()
        with use_backend(backend):
            torch.manual_seed(3)
            opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, mc_samples=2)
            for _ in range(3):
                for _ in range(2):
                    with opt.sampled_params(train=True):
                        model.zero_grad(set_to_none=True) if drop else opt.zero_grad()
                        loss_fn().backward()
                    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(opt._params, opt._grad_views))
                opt.zero_grad()  # between the last sample and step: must not lose it
                opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_low_precision_parameters_keep_an_fp32_mean(backend, dtype):
    model, _ = mlp()
    model = model.to(dtype)
    x, y = torch.randn(32, 5).to(dtype), torch.randint(0, 3, (32,))
    with use_backend(backend):
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1)
        train(opt, lambda: F.cross_entropy(model(x).float(), y), 4)
        for p in model.parameters():
            assert p.dtype == dtype
            mean, _ = opt.posterior(p)
            assert mean.dtype == torch.float32
            assert torch.equal(p.detach(), mean.to(dtype)), "parameters must hold the fp32 mean rounded"
        assert opt._momentum.dtype == opt._hess.dtype == torch.float32


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("capturable", [False, True], ids=["default-to-capturable", "capturable-to-default"])
def test_state_dict_round_trip_continues_identically(backend, capturable):
    """Saved mid-step and loaded into a new optimizer (capturable or not: the step and draw
    counts cross between host and device), training continues bit for bit."""
    with use_backend(backend):
        model, loss_fn = mlp()
        torch.manual_seed(2)
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, mc_samples=2, capturable=capturable)
        train(opt, loss_fn, 3)
        with opt.sampled_params(train=True):  # mid-step: one of two samples taken
            opt.zero_grad()
            loss_fn().backward()
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        saved = opt.state_dict()
        rng = torch.get_rng_state()
        train(opt, loss_fn, 3)
        want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        model2, loss_fn2 = mlp()
        model2.load_state_dict(saved_model)
        opt2 = IVON(model2.parameters(), lr=1.0, ess=1.0,  # hyper-parameters come from the state dict
                    capturable=not capturable)
        opt2.load_state_dict(saved)
        torch.set_rng_state(rng)
        train(opt2, loss_fn2, 3)
        got = torch.cat([p.detach().reshape(-1) for p in model2.parameters()])
    assert opt2.current_step == opt.current_step == 6
    assert saved["state"]["step"] == 3 and saved["state"]["draws"] == (4 if backend == "triton" else 0)
    assert torch.equal(want, got)


CAPTURE_CONFIGS = [pytest.param(dict(noise="philox"), id="price-mc1"),
                   pytest.param(dict(noise="philox", hess_approx="gradsq", mc_samples=3, clip_radius=1e-2),
                                id="gradsq-mc3-clip"),
                   pytest.param(dict(noise="torch", mc_samples=2), id="torch_noise-mc2"),
                   pytest.param(dict(noise="philox", beta1=0.99, weight_decay=0.1), id="beta0.99-wd")]


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("config", CAPTURE_CONFIGS)
def test_capturable_trains_bit_for_bit_like_the_default(backend, config):
    """capturable=True moves the step count (debias) and Philox's draw count to the device: the
    same trajectory and prediction samples, bit for bit."""
    runs = []
    for capturable in (False, True):
        final = {}
        runs.append(trajectory(mlp, IVON, backend, 8, {**config, "capturable": capturable}, predict_after=2,
                               final=final))
        assert final["current_step"] == 8
    want, got = runs
    assert len(want[2]) == len(got[2]) == 4, "no prediction sample"
    for t, (w, g) in enumerate(zip(want, got)):
        for name, a, b in zip(("params", "momentum", "hess", "prediction sample"), w, g):
            assert torch.equal(a, b), f"step {t + 1}: {name} differs"
    assert not torch.equal(want[0][0], want[-1][0]), "training did not move the parameters"


def _record_launches(monkeypatch):
    """Replace the optimizer's ``ivon_step`` by one that also records each call as a CUDA graph
    would bake it: every tensor's address, shape and dtype, and every other argument's value."""
    from bora_kernels.optim import ivon as ours

    calls = []
    launch = ours.ivon_step

    def baked(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", value.data_ptr(), tuple(value.shape), value.dtype)
        return value

    def recording(*args, **kwargs):
        calls.append(tuple(baked(a) for a in args) + tuple((k, baked(v)) for k, v in sorted(kwargs.items())))
        return launch(*args, **kwargs)

    monkeypatch.setattr(ours, "ivon_step", recording)
    return calls


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("config", [pytest.param(dict(), id="price-mc1"),
                                    pytest.param(dict(noise="torch", mc_samples=3), id="torch_noise-mc3")])
def test_capturable_steps_launch_what_a_graph_replays(backend, config, monkeypatch):
    """What a CUDA graph captures of one training step (the kernel launches: addresses and
    scalars) is what every later step launches, with capturable=True: nothing that changes
    from step to step is left on the host. The default's launches do change (it refuses
    capture)."""
    calls = _record_launches(monkeypatch)
    for capturable in (True, False):
        model, loss_fn = mlp()
        with use_backend(backend):
            opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, capturable=capturable, **config)
            train(opt, loss_fn, 2)  # warm-up, as before a capture
            steps = []
            for _ in range(4):
                del calls[:]
                train(opt, loss_fn, 1)
                steps.append(list(calls))
        assert all(steps), "no launch recorded"
        # torch noise alternates two buffers from step to step: a step's own launches agree with
        # each other whichever pair it gets, so compare every other step
        same = steps[0] == steps[2] and steps[1] == steps[3]
        assert same == capturable, f"capturable={capturable}: launches {'differ' if capturable else 'repeat'}"


def test_default_refuses_cuda_graph_capture(monkeypatch):
    """capturable=False would replay one step's noise and step count: it refuses to be captured
    (here the capture is simulated: this machine may have no GPU)."""
    from bora_kernels.optim import ivon as ours

    model, loss_fn = mlp()
    opts = {c: IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, capturable=c) for c in (False, True)}
    for opt in opts.values():
        train(opt, loss_fn, 1)
    monkeypatch.setattr(ours, "capturing_cuda_graph", lambda device: True)
    with pytest.raises(RuntimeError, match="capturable=True"):
        train(opts[False], loss_fn, 1)
    train(opts[True], loss_fn, 1)


def test_loads_ivon_opt_state_dict():
    model, loss_fn = mlp()
    ref = ivon.IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1)
    train(ref, loss_fn, 3)
    opt = IVON(model.parameters(), lr=1.0, ess=1.0, noise="torch")
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["ess"] == 100.0
    assert torch.equal(opt._momentum, ref.param_groups[0]["momentum"])
    assert torch.equal(opt._hess, ref.param_groups[0]["hess"])
    assert torch.equal(opt._mean, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(mc_samples=0), dict(weight_decay=-1.0), dict(hess_init=0.0),
                                    dict(ess=0.0), dict(clip_radius=0.0), dict(beta1=1.5), dict(beta2=-0.1),
                                    dict(hess_approx="kfac")], ids=lambda k: next(iter(k)))
def test_bad_arguments_raise_like_ivon_opt(kwargs):
    args = {"lr": 0.1, "ess": 10.0, **kwargs}
    with pytest.raises(ValueError) as theirs:
        ivon.IVON([torch.nn.Parameter(torch.zeros(2))], **args)
    with pytest.raises(ValueError) as ours:
        IVON([torch.nn.Parameter(torch.zeros(2))], **args)
    if "hess_approx" not in kwargs:  # ivon-opt prints beta2 there
        assert str(ours.value) == str(theirs.value)
    else:
        assert "hess_approx" in str(ours.value) and "kfac" in str(ours.value)


@pytest.mark.gpu
@pytest.mark.parametrize("model_kind", ["mlp", "multi_lora"])
@pytest.mark.parametrize("noise", ["philox", "torch"])
def test_training_step_in_a_cuda_graph(noise, model_kind):
    """A whole training step (two samples: forward and backward inside sampled_params, then
    step()) captured in one CUDA graph and replayed 6 times: the trajectory of the same
    optimizer run eagerly, step for step (replays that repeated one step's noise or step count
    would drift by the noise's size). Of an MLP, and of four LoRA adapters on both its layers
    chosen per token (IVON-LoRA over a mixed batch: lora_delta forward and backward inside the
    graph). The default optimizer refuses the capture, and the device works after it."""
    dev = torch.device("cuda")

    def setup(capturable):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).to(dev)
        x, y = torch.randn(256, 64, device=dev), torch.randint(0, 10, (256,), device=dev)
        ids = None
        if model_kind == "multi_lora":
            model = bk.inject(model, ["0", "2"], num_adapters=4, r=8, alpha=16)
            with torch.no_grad():  # B = 0 at init: start where the adapters matter
                for name, p in model.named_parameters():
                    if "lora_b" in name:
                        p.normal_(0, 0.1)
            ids = torch.randint(0, 4, (256,), device=dev)
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = IVON(trained, lr=0.05, ess=1000.0, hess_init=0.1, mc_samples=2, noise=noise, capturable=capturable)

        def step():
            for _ in range(2):
                with opt.sampled_params(train=True), bk.use_adapters(model, ids) if ids is not None \
                        else contextlib.nullcontext():
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
            opt.step()
        return trained, opt, step

    def flat(params):
        return torch.cat([p.detach().reshape(-1) for p in params]).clone()

    trained, opt, step = setup(True)
    eager = []
    for _ in range(7):
        step()
        eager.append(flat(trained))
    trained, opt, step = setup(True)
    graph, _ = capture_cuda_graph(step)  # its warm-up is step 1
    for t in range(1, 7):
        graph.replay()  # (LoRA's weight gradients may add in another order: a looser tolerance)
        torch.testing.assert_close(flat(trained), eager[t], rtol=1e-4, atol=1e-5, msg=f"replay {t}")
    assert opt.current_step == 7
    assert not torch.allclose(eager[1], eager[6])

    _, _, step = setup(False)
    with pytest.raises(RuntimeError, match="capturable=True"):
        capture_cuda_graph(step)
    assert torch.ones(4, device=dev).sum().item() == 4.0


def test_other_bad_input():
    with pytest.raises(ValueError, match="noise"):
        IVON([torch.nn.Parameter(torch.zeros(2))], lr=0.1, ess=1.0, noise="uniform")
    with pytest.raises(ValueError, match="capturable"):
        IVON([torch.nn.Parameter(torch.zeros(2))], lr=0.1, ess=1.0, capturable="yes")
    with pytest.raises(ValueError, match="different dtypes"):
        IVON([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2).double())], lr=0.1, ess=1.0)
    opt = IVON([torch.nn.Parameter(torch.zeros(2))], lr=0.1, ess=1.0)
    with pytest.raises(ValueError, match="constructor"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError, match="not a parameter"):
        opt.posterior(torch.zeros(2))


def _distributed_worker(rank, world, init_file, optimizer_name, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        torch.manual_seed(1)  # the same noise on every rank
        with use_backend(backend):
            if optimizer_name == "ivon-opt":
                opt = ivon.IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, sync=True, mc_samples=2)
            else:
                opt = IVON(model.parameters(), lr=0.05, ess=100.0, hess_init=0.1, sync=True, mc_samples=2,
                           noise="torch")
            train_steps = 10
            for _ in range(train_steps):
                for _ in range(2):
                    with opt.sampled_params(train=True):
                        opt.zero_grad()
                        F.cross_entropy(model(x), y).backward()
                opt.step()
        torch.save(torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                   os.path.join(out_dir, f"{optimizer_name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_sync_all_reduces_like_ivon_opt(backend):
    with tempfile.TemporaryDirectory() as out:
        for name in ("ivon-opt", "ours"):
            init = os.path.join(out, f"init-{name}")
            mp.spawn(_distributed_worker, args=(2, init, name, backend, out), nprocs=2, join=True)
        result = {(n, r): torch.load(os.path.join(out, f"{n}-{r}.pt")) for n in ("ivon-opt", "ours") for r in (0, 1)}
    assert torch.equal(result["ours", 0], result["ours", 1]), "ranks diverged"
    a, b = result["ivon-opt", 0], result["ours", 0]
    if backend == "torch":
        assert torch.equal(a, b)
    else:
        assert ((a - b).norm() / a.norm()).item() < 1e-6
    assert torch.equal(result["ivon-opt", 0], result["ivon-opt", 1])
