"""BoRA (``bora_kernels.bora``): the penalty in both forms against float64 sums, the two exact
limits, one mixed-batch pass against the per-task loop of the released code, the likelihood's
weights, the sampler, and DDP (two gloo processes) with AdamW and with IVON's ``sync``."""

import datetime
import math
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import bora_kernels as bk
from bora_kernels.bora import BoRA, TaskSampler, learning_rate_for_tau, sequence_losses

VOCAB, TASKS = 32, 4


def tiny_model(seed=0, biases=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         attention_bias=biases, mlp_bias=biases)
    return LlamaForCausalLM(config)


# the stacked per-adapter tensors the prior ties: A and B, and DoRA's magnitudes or B's biases
TIED = ("lora_A", "lora_B", "lora_magnitude", "lora_bias_vector")
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}


def tied(layer):
    return [getattr(layer, name) for name in TIED if getattr(layer, name) is not None]


def make_bora(tau, seed=0, **kw):
    kw.setdefault("init_noise", 0.05)
    bora = BoRA(tiny_model(seed, biases=kw.get("lora_bias", False)), ["q_proj", "v_proj", "down_proj"],
                [f"t{d}" for d in range(TASKS)], tau, r=4, generator=torch.Generator().manual_seed(seed), **kw)
    for layer in bora.layers():  # B (and a lora_bias) start at zero; give every slot something to say
        with torch.no_grad():
            for w in tied(layer)[1:]:
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return bora


def batch(seed=0, size=6, length=10):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (size, length), generator=gen), torch.tensor([0, 2, 1, 2, 0, 3][:size])


def explicit_penalty(bora, form):
    """float64, one tensor at a time, as eq. 5 (paper) or the released code writes it."""
    total = 0.0
    for layer in bora.layers():
        for w in tied(layer):
            w = w.detach().double()
            for d in range(TASKS):
                diff = w[d] - w[TASKS]
                total += bora.tau / 2 * diff.square().sum().item() if form == "paper" else \
                    bora.tau * diff.norm().item()
    return total


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("form", ["paper", "released"])
def test_penalty_and_its_gradient(form, variant):
    """Every per-adapter tensor is tied: with DoRA the magnitudes, with lora_bias B's biases too."""
    bora = make_bora(7.5, penalty=form, **VARIANTS[variant])
    assert len(tied(bora.layers()[0])) == (2 if variant == "lora" else 3)
    value = bora.penalty()
    assert math.isclose(value.item(), explicit_penalty(bora, form), rel_tol=1e-5)
    value.backward()
    for layer in bora.layers():
        for w in tied(layer):
            diff = (w[:TASKS] - w[TASKS:]).detach().double()
            if form == "paper":
                want = bora.tau * diff
            else:
                want = bora.tau * diff / diff.flatten(1).norm(dim=1).view(-1, *[1] * (diff.dim() - 1))
            torch.testing.assert_close(w.grad[:TASKS].double(), want, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(w.grad[TASKS].double(), -want.sum(0), rtol=1e-5, atol=1e-6)


def test_released_penalty_has_a_zero_subgradient_on_theta():
    bora = make_bora(3.0, penalty="released", init_noise=0.0)
    for layer in bora.layers():
        with torch.no_grad():
            layer.lora_B[:TASKS] = layer.lora_B[TASKS]  # every task exactly on Θ
    bora.penalty().backward()
    for layer in bora.layers():
        assert torch.isfinite(layer.lora_A.grad).all() and (layer.lora_B.grad == 0).all()


def test_one_mixed_pass_equals_the_per_task_loop():
    """The released code runs one task at a time; one mixed batch gives the same loss and grads."""
    bora = make_bora(5.0)
    tokens, tasks = batch()
    out = bora(tokens, tasks)
    out.loss.backward()
    got = [p.grad.clone() for p in bk.trainable_parameters(bora.model)]
    bora.zero_grad()
    total_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    loss = bora.penalty()
    for d in tasks.unique().tolist():
        rows = tasks == d
        with bk.use_adapters(bora.model, d):
            logits = bora.model(input_ids=tokens[rows]).logits
        nll, count = sequence_losses(logits, tokens[rows])
        loss = loss + (nll * count).sum() / total_tokens
    loss.backward()
    assert math.isclose(out.loss.item(), loss.item(), rel_tol=1e-5)
    for g, p in zip(got, bk.trainable_parameters(bora.model)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_tau_zero_is_independent_tasks():
    bora = make_bora(0.0)
    tokens, tasks = batch()
    out = bora(tokens, tasks)
    assert out.penalty.item() == 0.0
    out.loss.backward()
    for layer in bora.layers():
        for w in (layer.lora_A, layer.lora_B):
            assert (w.grad[TASKS] == 0).all(), "Θ must not move at tau = 0"
    # a task's gradient depends only on its own sequences
    bora.zero_grad()
    keep = tasks == 2
    bora(tokens[keep], tasks[keep]).loss.backward()
    alone = [layer.lora_B.grad[2].clone() for layer in bora.layers()]
    bora.zero_grad()
    out = bora(tokens, tasks)
    (out.loss * (tokens.shape[0] / keep.sum())).backward()  # undo the batch mean's other tokens
    for layer, want in zip(bora.layers(), alone):
        torch.testing.assert_close(layer.lora_B.grad[2], want, rtol=1e-4, atol=1e-7)


def test_tau_inf_is_one_pooled_adapter():
    bora = make_bora(float("inf"))
    tokens, tasks = batch()
    out = bora(tokens, tasks)
    assert out.penalty.item() == 0.0
    single = tiny_model()
    bk.inject(single, ["q_proj", "v_proj", "down_proj"], num_adapters=1, r=4)
    for theirs, ours in zip(bk.model.adapter_layers(single).values(), bora.layers()):
        theirs.set_adapter(0, *ours.adapter_weights(TASKS), alpha=16)
    with bk.use_adapters(single, 0):
        want = single(input_ids=tokens).logits
    torch.testing.assert_close(out.logits, want)
    out.loss.backward()
    for layer in bora.layers():
        assert (layer.lora_A.grad[:TASKS] == 0).all() and (layer.lora_B.grad[:TASKS] == 0).all()
        assert layer.lora_B.grad[TASKS].abs().sum() > 0


def test_documents_likelihood_weights():
    sizes = [10, 30, 5, 55]
    for rule, want in (("proportional", lambda d, b: sum(sizes) / b), ("uniform", lambda d, b: 4 * sizes[d] / b)):
        sampler = TaskSampler(sizes, rule)
        ids = torch.tensor([0, 3, 3, 1, 2])
        torch.testing.assert_close(sampler.weights(ids), torch.tensor([want(d, 5) for d in ids.tolist()]))
    bora = make_bora(2.0, likelihood="documents", task_sizes=sizes, sampling="uniform")
    tokens, tasks = batch()
    out = bora(tokens, tasks)
    want = (TaskSampler(sizes, "uniform").weights(tasks) * out.sequence_nll).sum() + out.penalty
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-6)


def test_sampler_frequencies():
    gen = torch.Generator().manual_seed(0)
    draws = TaskSampler([10, 30, 60], "proportional").sample(20000, gen)
    freq = torch.bincount(draws, minlength=3) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.3, 0.6]), atol=0.02, rtol=0)
    freq = torch.bincount(TaskSampler([10, 30, 60], "uniform").sample(20000, gen), minlength=3) / 20000
    torch.testing.assert_close(freq, torch.full((3,), 1 / 3), atol=0.02, rtol=0)


def test_distances_and_initial_state():
    bora = make_bora(1.0, init_noise=0.01)
    want = torch.zeros(TASKS, dtype=torch.float64)
    for layer in bora.layers():
        for w in tied(layer):
            for d in range(TASKS):
                want[d] += (w[d] - w[TASKS]).detach().double().square().sum()
    torch.testing.assert_close(bora.distances(), want.sqrt())
    fresh = BoRA(tiny_model(), ["q_proj"], 3, 1.0, r=4, init_noise=0.0)
    layer = fresh.layers()[0]
    assert (layer.lora_A[:3] == layer.lora_A[3]).all() and (layer.lora_B == 0).all()
    assert layer.lora_A[3].abs().sum() > 0  # PEFT's Kaiming-uniform A
    assert fresh.layers()[0].adapter_names == ("0", "1", "2", "global")


def test_learning_rate_rule():
    assert learning_rate_for_tau(100) == pytest.approx(1e-3) and learning_rate_for_tau(1) == pytest.approx(1e-5)
    assert learning_rate_for_tau(0) == 1e-4 and learning_rate_for_tau(float("inf")) == 1e-4
    with pytest.raises(ValueError, match="tau"):
        learning_rate_for_tau(-1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau=-1.0), "tau must be >= 0"),
    (dict(tau=1.0, penalty="l1"), "penalty must be one of"),
    (dict(tau=1.0, likelihood="documents"), "needs task_sizes"),
    (dict(tau=1.0, task_sizes=[3, 4]), "one count per task"),
    (dict(tau=1.0, num_adapters=3), "num_adapters is set by BoRA"),
    (dict(tau=1.0, r=[2, 4, 4, 4, 4]), "r must be one int"),
    (dict(tau=1.0, use_dora=[True, False, False, False, False]), "use_dora must be one bool"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BoRA(tiny_model(), ["q_proj"], TASKS, **kwargs)


def test_bad_task_ids_are_named():
    bora = make_bora(1.0)
    tokens, _ = batch(size=2)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        bora(tokens, ["t0", "nope"])
    with pytest.raises(ValueError, match="one task per sequence"):
        bora(tokens, [0, 1, 2])
    with pytest.raises(ValueError, match="task indices in 0..3"):
        bora(tokens, [0, 9])
    with pytest.raises(ValueError, match="may not train 'global'"):
        bora(tokens, ["t0", "global"])
    out = bora(tokens, ["t0", "t3"])  # names work
    assert out.sequence_nll.shape == (2,)
    with torch.no_grad():  # Θ serves unseen tasks
        out = bora(tokens, ["global", "t3"])
    with torch.no_grad(), bk.use_adapters(bora.model, "global"):
        want = bora.model(input_ids=tokens[:1]).logits
    torch.testing.assert_close(out.logits[:1], want)


def _ddp_worker(rank, world, init_file, optimizer, out_dir):
    # a bounded wait: a rank that dies must fail the test, not hang it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        bora = make_bora(4.0)
        ddp = torch.nn.parallel.DistributedDataParallel(bora)  # no find_unused_parameters
        tokens, tasks = batch(seed=0)
        # rank 0 trains tasks 0 and 2 only, rank 1 tasks 1, 2 and 3: neither touches every task
        rows = slice(0, 3) if rank == 0 else slice(3, 6)
        params = bk.trainable_parameters(bora.model)
        torch.manual_seed(1)  # IVON: the same weight noise on every rank
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)
            for _ in range(2):
                opt.zero_grad()
                ddp(tokens[rows], tasks[rows]).loss.backward()
                opt.step()
        else:
            opt = bk.optim.IVON(params, lr=0.01, ess=100.0, hess_init=0.1, sync=True, noise="torch")
            for _ in range(2):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    ddp(tokens[rows], tasks[rows]).loss.backward()
                opt.step()
        torch.save([p.detach().clone() for p in params], os.path.join(out_dir, f"{optimizer}-{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done: leave without running the teardown. Destroying DDP's reducer can deadlock in torch
    # (the gloo group's destructor joins its worker thread while holding the GIL, and the worker
    # needs the GIL to free a finished work item); it hung CI twice.
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.parametrize("optimizer", ["adamw", "ivon"])
def test_ddp_with_tasks_missing_from_a_rank(optimizer):
    """Two gloo ranks, each batch missing some tasks: DDP runs without find_unused_parameters,
    the ranks stay equal, and (AdamW) equal one process training on both halves (equal halves, so
    DDP's mean of the two batch means is the mean over all tokens; the penalty is on both ranks)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, os.path.join(out, "init"), optimizer, out), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out, f"{optimizer}-{r}.pt")) for r in (0, 1)]
    for a, b in zip(*ranks):
        assert torch.equal(a, b), "ranks diverged"
    if optimizer == "adamw":
        bora = make_bora(4.0)
        tokens, tasks = batch(seed=0)
        params = bk.trainable_parameters(bora.model)
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)
        for _ in range(2):
            opt.zero_grad()
            bora(tokens, tasks).loss.backward()
            opt.step()
        for a, p in zip(ranks[0], params):
            torch.testing.assert_close(a, p.detach(), rtol=1e-4, atol=1e-6)
