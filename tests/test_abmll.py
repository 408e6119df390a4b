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
    mu_q, s_q = (t.double() for t in layer.phi.dense())
    mu_p, s_p = (t.double() for t in layer.theta.dense())
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, s_q.abs()),
                                             torch.distributions.Normal(mu_p, s_p.abs())).sum()
    assert math.isclose(kl.item(), want.item(), rel_tol=1e-4)
    c = layer.theta.c
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


def test_first_order_outer_gradient():
    """After ``start_task`` (φ = θ), the first-order outer gradient of a loss of φ plus the prior
    is the loss's gradient at φ plus the prior's at θ; a twin without a gradient is skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    abmll.inject(model, ["0", "2"], r=2, c=0.01, init_std=0.1)
    model.eval()  # the mean: a deterministic loss
    x = torch.randn(5, 8)
    phi, theta = abmll.task_parameters(model), abmll.global_parameters(model)
    want_phi = torch.autograd.grad(model(x).square().sum(), phi, allow_unused=True)
    want_theta = torch.autograd.grad(abmll.neg_log_prior(model), theta)
    (model(x).square().sum() + abmll.neg_log_prior(model)).backward()
    abmll.add_task_gradients(model)
    for p, g_phi, g_theta in zip(theta, want_phi, want_theta):
        torch.testing.assert_close(p.grad, g_theta + (0 if g_phi is None else g_phi))
    for p in theta:
        p.grad = None
    abmll.add_task_gradients(model)
    for p, g_phi in zip(theta, want_phi):
        assert (p.grad is None) == (g_phi is None)


def test_bad_arguments():
    with pytest.raises(ValueError, match="c must be > 0"):
        abmll.ABMLLLinear(nn.Linear(4, 4), c=0.0)
    with pytest.raises(ValueError, match="r must be a positive int"):
        abmll.ABMLLLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="no ABMLL layers"):
        abmll.kl(nn.Linear(3, 3))
