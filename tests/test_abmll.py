"""ABMLL (``bora_kernels.abmll``): the local reparameterisation's output moments and samples
against the weight-space definition, the KL and the prior against torch.distributions, and the
split between task (φ) and global (θ) parameters."""

import math

import pytest
import torch
from torch import nn

from bora_kernels import abmll


def layer_with_spread(seed=0, k=6, n=5, r=3, c=0.05):
    torch.manual_seed(seed)
    layer = abmll.ABMLLLinear(nn.Linear(k, n), r=r, c=c)
    with torch.no_grad():
        for g in (layer.theta, layer.phi):
            for p in g.parameters():
                p.normal_(0, 0.5)
    return layer


def test_moments_match_the_dense_weight():
    layer = layer_with_spread()
    x = torch.randn(4, 7, 6)
    mean, var = layer.phi.moments(x)
    mu, sigma = (t.double() for t in layer.phi.dense())
    torch.testing.assert_close(mean.double(), x.double() @ mu.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), x.double().square() @ sigma.square().T, rtol=1e-5, atol=1e-6)


def test_sampled_outputs_have_the_weight_space_mean_and_variance():
    """Outputs drawn by the layer (local reparameterisation) and outputs of weights drawn from
    N(W0 + μ, σ²) agree in mean and variance, within Monte Carlo error."""
    layer = layer_with_spread(c=0.2).train()
    x = torch.randn(1, 6)
    samples = 40000
    with torch.no_grad():
        ours = layer(x.expand(samples, 6))                       # one output draw per row
        mu, sigma = layer.phi.dense()
        w = layer.base_layer.weight + mu + sigma * torch.randn(samples, *mu.shape)
        theirs = torch.einsum("k,snk->sn", x[0], w) + layer.base_layer.bias
    want_var = (x.square() @ sigma.square().T)[0]
    for got in (ours, theirs):
        se = (want_var / samples).sqrt()
        assert ((got.mean(0) - layer.base_layer(x)[0] - (x @ mu.T)[0]).abs() < 5 * se).all()
        assert ((got.var(0) / want_var - 1).abs() < 5 * math.sqrt(2 / samples)).all()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ mu.T)  # eval: the mean


def test_kl_and_prior_against_torch_distributions():
    layer = layer_with_spread(k=40, n=9)
    abmll.KL_ROWS, saved = 4, abmll.KL_ROWS  # several row chunks
    try:
        kl, prior = layer.kl(), layer.neg_log_prior(a0=2.0, b0=0.5)
    finally:
        abmll.KL_ROWS = saved
    c = layer.theta.c
    mu_q, s_q = (t.double() for t in layer.phi.dense())
    mu_p, s_p = (t.double() for t in layer.theta.dense())
    s_q, s_p = s_q.abs().clamp(min=c), s_p.abs().clamp(min=c)  # σ read as at least c in size
    assert (s_p == c).any() and (s_p > c).any()  # the spread reaches both sides of the floor
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, s_q),
                                             torch.distributions.Normal(mu_p, s_p)).sum()
    assert math.isclose(kl.item(), want.item(), rel_tol=1e-4)
    log_p = (torch.distributions.Normal(0.0, math.sqrt(c)).log_prob(mu_p)
             + torch.distributions.Gamma(2.0, 0.5).log_prob(s_p.square().reciprocal())).sum()
    assert math.isclose(prior.item(), -log_p.item(), rel_tol=1e-4)


def test_task_and_global_parameters():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    abmll.inject(model, ["0", "2"], r=2, c=0.01, init_std=0.1)
    layers = abmll.layers(model)
    assert len(layers) == 2 and not any(p.requires_grad for m in layers for p in m.base_layer.parameters())
    _, sigma = layers[0].phi.dense()
    torch.testing.assert_close(sigma, torch.full_like(sigma, 0.11))
    model(torch.randn(5, 8)).square().sum().backward()
    assert all(p.grad is not None for p in abmll.task_parameters(model)[1::4])  # mu_B of φ
    assert all(p.grad is None for p in abmll.global_parameters(model))
    (abmll.kl(model) + abmll.neg_log_prior(model)).backward()
    assert all(p.grad is not None for p in abmll.global_parameters(model))
    with torch.no_grad():
        layers[0].phi.mu_B.add_(1.0)
    assert abmll.kl(model).item() > 0
    abmll.start_task(model)
    assert abmll.kl(model).item() == pytest.approx(0.0, abs=1e-6)


def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    abmll.inject(model, ["0", "2"], r=2, c=0.01, init_std=0.1)
    with torch.no_grad():  # μ's B ≠ 0, so every factor gets a gradient; σ stays near 0.11,
        for m in abmll.layers(model):  # away from the KL's floor at c (a kink for differences)
            for p in (m.theta.mu_A, m.theta.mu_B, m.theta.sigma_A):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()  # the mean: deterministic losses


def square_loss(model, x):
    return model(x).square().mean()


def test_inner_loop_is_sgd_from_theta_and_leaves_the_layers():
    model = small_model()
    batches = [torch.randn(5, 8) for _ in range(2)]
    it = iter(batches)
    phi = abmll.adapt(model, square_loss, lambda: next(it), steps=2, lr=0.3, beta=0.5)
    # the same two steps by hand, on the layers' own φ parameters
    theta = [p.detach().clone() for p in abmll.global_parameters(model)]
    abmll.start_task(model)
    params = abmll.task_parameters(model)
    for x in batches:
        grads = torch.autograd.grad(square_loss(model, x) + 0.5 * abmll.kl(model), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.3 * g)
    for got, want in zip(phi.values(), params):
        torch.testing.assert_close(got, want)
    abmll.start_task(model)
    abmll.load_task(model, phi)
    for got, want in zip(abmll.task_parameters(model), params):
        torch.testing.assert_close(got, want)
    for got, want in zip(abmll.global_parameters(model), theta):  # θ untouched
        assert torch.equal(got, want)


@pytest.mark.parametrize("second_order", [False, True])
def test_outer_gradient(second_order):
    """θ's gradient of the objective after an inner step: first order is the loss's gradient at
    the adapted φ plus the KL's and prior's own; second order matches central differences of the
    whole inner-then-outer computation, and differs from first order (so the test can fail)."""
    model = small_model()
    x_in, x_out = torch.randn(5, 8), torch.randn(5, 8)
    theta = abmll.global_parameters(model)

    def objective(create_graph):
        phi = abmll.adapt(model, square_loss, lambda: x_in, steps=1, lr=0.5, beta=0.01, create_graph=create_graph)
        return abmll.task_loss(model, square_loss, phi, x_out, beta=0.01, gamma=1e-4), phi

    loss, phi = objective(second_order)
    grads = torch.autograd.grad(loss, theta)
    if not second_order:
        abmll.load_task(model, phi)
        want_phi = torch.autograd.grad(square_loss(model, x_out) + 0.01 * abmll.kl(model), abmll.task_parameters(model))
        want_theta = torch.autograd.grad(0.01 * abmll.kl(model) + 1e-4 * abmll.neg_log_prior(model), theta)
        for got, a, b in zip(grads, want_phi, want_theta):
            torch.testing.assert_close(got, a + b)
        return
    first = torch.autograd.grad(objective(False)[0], theta)
    assert max((a - b).abs().max() for a, b in zip(grads, first)) > 1e-3
    gen = torch.Generator().manual_seed(1)
    for p, g in zip(theta, grads):
        direction = torch.randn(p.shape, generator=gen)
        eps = 1e-3  # the prior's 1/σ² bends too fast for 1e-2
        with torch.no_grad():
            p.add_(eps * direction)
        up = objective(False)[0].item()
        with torch.no_grad():
            p.sub_(2 * eps * direction)
        down = objective(False)[0].item()
        with torch.no_grad():
            p.add_(eps * direction)
        assert (up - down) / (2 * eps) == pytest.approx((g * direction).sum().item(), rel=1e-2, abs=3e-4)


@pytest.mark.parametrize("sigma_b", [-0.01, -0.015])
def test_kl_reads_sigma_as_at_least_c(sigma_b):
    """σ_θ = BA + c at zero (-0.01) or below c in size (-0.015) is read as c by the KL and the
    prior: φ (σ = c) then matches θ exactly, and the values and gradients stay finite."""
    layer = abmll.ABMLLLinear(nn.Linear(4, 3), r=1, c=0.01)
    with torch.no_grad():
        layer.theta.sigma_A.fill_(1.0)
        layer.theta.sigma_B.fill_(sigma_b)
    kl = layer.kl()
    (kl + layer.neg_log_prior(1.0, 0.01)).backward()
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("training", [False, True])
def test_predict_at_the_mean_and_averaged_over_samples(training):
    """``samples=0`` is the eval-mode softmax; ``samples=S`` is the mean of S sampled softmaxes
    (the same draws as by hand from one seed), which differ from the mean's; the mode is kept."""
    model = small_model().train(training)
    x = torch.randn(6, 8)
    probs = abmll.predict(model, lambda: model(x))
    assert model.training == training
    with torch.no_grad():
        torch.testing.assert_close(probs, model.eval()(x).softmax(-1))
        model.train(training)
        torch.manual_seed(3)
        got = abmll.predict(model, lambda: model(x), samples=4)
        assert model.training == training
        torch.manual_seed(3)
        model.train()
        draws = torch.stack([model(x).softmax(-1) for _ in range(4)])
    torch.testing.assert_close(got, draws.mean(0))
    assert (draws[0] - draws[1]).abs().max() > 1e-3 and (got - probs).abs().max() > 1e-4
    torch.testing.assert_close(got.sum(-1), torch.ones(6))


def test_bad_arguments():
    with pytest.raises(ValueError, match="c must be > 0"):
        abmll.ABMLLLinear(nn.Linear(4, 4), c=0.0)
    with pytest.raises(ValueError, match="r must be a positive int"):
        abmll.ABMLLLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="no ABMLL layers"):
        abmll.kl(nn.Linear(3, 3))
    model = small_model()
    with pytest.raises(ValueError, match="steps must be"):
        abmll.adapt(model, square_loss, lambda: torch.randn(2, 8), steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        abmll.adapt(model, square_loss, lambda: torch.randn(2, 8), steps=1, lr=0.0)
    for samples in (-1, 2.0):
        with pytest.raises(ValueError, match="samples must be an int >= 0"):
            abmll.predict(model, lambda: model(torch.randn(2, 8)), samples=samples)
