"""ABMLL: amortized Bayesian meta-learning for LoRA (Zhang, Snell & Griffiths).

Each adapted layer's weight is Gaussian, elementwise. The task's posterior is
``q(φ) = N(W0 + μ_φ, σ_φ²)``, the global prior over it is ``p(φ | θ) = N(W0 + μ_θ, σ_θ²)``, and
every mean and standard deviation is a LoRA pair: ``μ = B_μ A_μ`` and ``σ = B_σ A_σ + c``.
``p(θ) = N(μ_θ; 0, c) · Gamma(1/σ_θ²; a0, b0)``. The objective for one task is

    -E_q[log p(D | φ)] + β KL(q(φ) || p(φ | θ)) + γ (-log p(θ))

(the paper's eq. 2; ``KL(q(θ) || p(θ))`` reduces to ``-log p(θ)`` as in ABML). Training
alternates, per task: ``adapt`` runs a few SGD steps on the likelihood + β KL from ``φ = θ``,
as tensors that are functions of θ, then ``task_loss`` evaluates the objective at that ``φ`` on
a fresh batch of the task and its ``backward()`` gives θ's outer gradient. With
``create_graph=True`` the gradient goes through the inner steps (second order, as ABML does);
with ``False`` it takes ``dφ/dθ = I`` (first-order MAML). Neither copies the model per task:
``φ`` lives only as the inner loop's tensors, and ``load_task`` writes it into the layers' φ
parameters for evaluation or serving; ``predict`` then gives class probabilities at the posterior
mean or averaged over sampled outputs.

``ABMLLLinear`` never builds a dense weight in its forward. It samples the layer's *output* with
the local reparameterisation trick: with ``W ~ N(M, S²)`` elementwise, ``x W^T`` is Gaussian with
mean ``x M^T`` and variance ``x² (S²)^T``. ``S² = (BA)∘(BA) + 2c BA + c²``, and the elementwise
square of a rank-r product is a rank-r² product of row-wise Khatri-Rao factors, so the variance is
three thin matmuls of ``x²``. The KL and the prior are sums over weight elements, which needs
the dense ``μ`` and ``σ`` of one layer at a time, built in row chunks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from .bayes import average_softmax
from .model import _inject_targets, find_targets
from .nn.multi_lora import ReadsThroughToBase, linear_shape

KL_ROWS = 1024  # output rows per chunk when the KL and prior sum over dense weight elements


class GaussianLoRA(nn.Module):
    """One Gaussian over a ``[N, K]`` weight: mean ``B_μ A_μ``, std ``B_σ A_σ + c``."""

    def __init__(self, k: int, n: int, r: int, c: float, init_std: float | None = None, **kw):
        super().__init__()
        self.c = float(c)
        self.mu_A = nn.Parameter(torch.empty(r, k, **kw))
        self.mu_B = nn.Parameter(torch.zeros(n, r, **kw))
        self.sigma_A = nn.Parameter(torch.empty(r, k, **kw))
        self.sigma_B = nn.Parameter(torch.zeros(n, r, **kw))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.mu_A, a=math.sqrt(5))  # PEFT's LoRA initialisation: mean 0
            nn.init.kaiming_uniform_(self.sigma_A, a=math.sqrt(5))
            if init_std is not None:  # std c + init_std everywhere: one constant rank of B_σ A_σ
                self.sigma_A[0].fill_(1.0)
                self.sigma_B[:, 0].fill_(init_std)

    def dense(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, σ)`` of weight rows ``rows`` (fp32)."""
        mu = self.mu_B[rows].float() @ self.mu_A.float()
        sigma = self.sigma_B[rows].float() @ self.sigma_A.float() + self.c
        return mu, sigma

    def kl_variance(self, sigma: torch.Tensor) -> torch.Tensor:
        """``max(σ², c²)``, the variance the KL and the prior use. ``σ = BA + c`` is signed and
        crosses zero as training moves B and A; there ``log σ²`` and ``1/σ²`` overflow and their
        gradients turn into NaN, so both read ``σ`` as at least ``c`` in size (the paper adds c
        to keep σ positive). Sampling uses ``σ²`` itself, a valid variance either way."""
        return sigma.square().clamp(min=self.c ** 2)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """``x μ^T``, the mean of ``x W^T`` (two thin matmuls)."""
        return (x.float() @ self.mu_A.float().T) @ self.mu_B.float().T

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``x μ^T`` and variance ``x² (σ²)^T`` of ``x W^T``, from thin matmuls only."""
        x2 = x.float().square()
        mean = self.mean(x)
        a, b = self.sigma_A.float(), self.sigma_B.float()
        r = a.shape[0]
        a_kr = (a[:, None, :] * a[None, :, :]).reshape(r * r, -1)  # [r², K]: A_k ∘ A_l
        b_kr = (b[:, :, None] * b[:, None, :]).reshape(b.shape[0], r * r)  # [N, r²]: B_:k ∘ B_:l
        var = (x2 @ a_kr.T) @ b_kr.T
        if self.c:
            var = var + (2 * self.c) * ((x2 @ a.T) @ b.T) + self.c ** 2 * x2.sum(-1, keepdim=True)
        return mean, var.clamp(min=0)


class ABMLLLinear(ReadsThroughToBase, nn.Module):
    """A frozen linear layer with ABMLL's global (``theta``) and task (``phi``) Gaussians.

    ``forward`` draws ``base(x) + x μ_φ^T + sqrt(x² (σ_φ²)^T) ε`` (one ``ε`` per output element)
    in training mode, and returns the mean (no variance computed) in eval mode.
    """

    def __init__(self, base_layer: nn.Module, r: int = 4, c: float = math.exp(-20), fan_in_fan_out: bool = False,
                 init_std: float | None = None):
        super().__init__()
        k, n, weight = linear_shape(base_layer, fan_in_fan_out)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not c > 0:
            raise ValueError(f"c must be > 0 (it keeps the standard deviations positive), got {c}")
        kw = dict(device=weight.device, dtype=torch.float32)
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = k, n
        self.theta = GaussianLoRA(k, n, r, c, init_std, **kw)
        self.phi = GaussianLoRA(k, n, r, c, init_std, **kw)
        self.phi.load_state_dict(self.theta.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.base_layer(x) + self.phi.mean(x).to(x.dtype)
        mean, var = self.phi.moments(x)
        return self.base_layer(x) + (mean + var.sqrt() * torch.randn_like(var)).to(x.dtype)

    def kl(self) -> torch.Tensor:
        """``KL(q(φ) || p(φ | θ))`` summed over the weight's elements."""
        total = torch.zeros((), device=self.phi.mu_A.device)
        for rows in _row_chunks(self.out_features):
            mu_q, s_q = self.phi.dense(rows)
            mu_p, s_p = self.theta.dense(rows)
            var_q, var_p = self.phi.kl_variance(s_q), self.theta.kl_variance(s_p)
            total = total + (0.5 * (var_q.log() - var_p.log()).neg() + (var_q + (mu_q - mu_p).square()) / (2 * var_p)
                             - 0.5).sum()
        return total

    def neg_log_prior(self, a0: float, b0: float) -> torch.Tensor:
        """``-log p(θ)``: ``N(μ_θ; 0, c)`` (c the variance) times ``Gamma(1/σ_θ²; a0, b0)`` (rate b0)."""
        c = self.theta.c
        total = torch.zeros((), device=self.theta.mu_A.device)
        for rows in _row_chunks(self.out_features):
            mu, sigma = self.theta.dense(rows)
            precision = self.theta.kl_variance(sigma).reciprocal()
            log_normal = -0.5 * (math.log(2 * math.pi * c) + mu.square() / c)
            log_gamma = a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1) * precision.log() - b0 * precision
            total = total - (log_normal + log_gamma).sum()
        return total

    @torch.no_grad()
    def start_task(self):
        """``φ = θ``: a new task's inner loop starts at the global Gaussian."""
        self.phi.load_state_dict(self.theta.state_dict())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.theta.mu_A.shape[0]}, c={self.theta.c:.3g}"


def _row_chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, KL_ROWS):
        yield slice(start, min(n, start + KL_ROWS))


def inject(model: nn.Module, target_modules, r: int = 4, c: float = math.exp(-20), init_std: float | None = None,
           exclude_modules=None) -> nn.Module:
    """Replace matching linear layers by ``ABMLLLinear`` (the base model frozen). Returns ``model``."""
    targets = find_targets(model, target_modules, exclude_modules)
    _inject_targets(model, targets, lambda name, module, fan: ABMLLLinear(module, r, c, fan, init_std))
    return model


def layers(model: nn.Module) -> list[ABMLLLinear]:
    found = [m for m in model.modules() if isinstance(m, ABMLLLinear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no ABMLL layers; call bora_kernels.abmll.inject first")
    return found


def task_parameters(model: nn.Module) -> list[nn.Parameter]:
    """φ of every layer: what the inner loop trains."""
    return [p for m in layers(model) for p in m.phi.parameters()]


def global_parameters(model: nn.Module) -> list[nn.Parameter]:
    """θ of every layer: what the outer step trains."""
    return [p for m in layers(model) for p in m.theta.parameters()]


def start_task(model: nn.Module) -> None:
    for m in layers(model):
        m.start_task()


class _Objective(nn.Module):
    """``loss_fn(model, batch) + β KL + γ (-log p(θ))`` as a module, so that ``functional_call``
    can evaluate it with φ swapped for the inner loop's tensors."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, beta: float, gamma: float, a0: float, b0: float) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if beta:
            loss = loss + beta * kl(self.model)
        if gamma:
            loss = loss + gamma * neg_log_prior(self.model, a0, b0)
        return loss


def _twins(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name of a φ parameter in model: its θ twin}`` over every layer."""
    layers(model)  # a clear error if there are none
    return {name: theta for prefix, m in model.named_modules() if isinstance(m, ABMLLLinear)
            for name, theta in m.theta.named_parameters(prefix=f"{prefix}.phi" if prefix else "phi")}


def task_loss(model: nn.Module, loss_fn, phi: dict[str, torch.Tensor], batch, beta: float = 0.0,
              gamma: float = 0.0, a0: float = 1.0, b0: float = 0.01) -> torch.Tensor:
    """The objective ``loss_fn(model, batch) + β KL(q(φ) || p(φ | θ)) + γ (-log p(θ))`` with the
    layers' φ replaced by ``phi`` (from ``adapt``); θ is the layers' own parameters."""
    swapped = {f"model.{name}": value for name, value in phi.items()}  # names inside _Objective
    return torch.func.functional_call(_Objective(model, loss_fn), swapped, (batch, beta, gamma, a0, b0))


def adapt(model: nn.Module, loss_fn, batches, steps: int, lr: float, beta: float = 0.0,
          create_graph: bool = False) -> dict[str, torch.Tensor]:
    """ABMLL's inner loop on one task: ``steps`` SGD steps of ``φ ← φ - lr ∇_φ (loss + β KL)``
    from ``φ = θ``, ``batches()`` giving each step's batch. Returns φ, keyed by the names of the
    layers' φ parameters in ``model``, as tensors that depend on θ:
    ``task_loss(...).backward()`` then reaches θ through every step when ``create_graph``
    (second order), or as ``dφ/dθ = I`` otherwise (first order). The layers' parameters are
    not changed (``load_task`` does that)."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    # φ = θ as views: the graph starts at θ, and a gradient w.r.t. φ counts only φ's uses
    phi = {name: theta.view_as(theta) for name, theta in _twins(model).items()}
    for _ in range(steps):
        loss = task_loss(model, loss_fn, phi, batches(), beta)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph, allow_unused=True)
        phi = {name: p if g is None else p - lr * g for (name, p), g in zip(phi.items(), grads)}
    return phi


@torch.no_grad()
def load_task(model: nn.Module, phi: dict[str, torch.Tensor]) -> None:
    """Write an adapted φ (from ``adapt``) into the layers' φ parameters."""
    named = dict(model.named_parameters())
    for name, value in phi.items():
        named[name].copy_(value)


def predict(model: nn.Module, logits_fn, samples: int = 0) -> torch.Tensor:
    """Predictive class probabilities under the task posterior ``q(φ)``. ``samples=0`` (the
    default) predicts once at the posterior mean; ``samples=S`` averages the softmax over ``S``
    sampled forward passes (each layer's output drawn by the local reparameterisation, so every
    example gets its own draw). The model's train/eval mode is restored afterwards."""
    was_training = model.training
    try:
        model.train(isinstance(samples, int) and samples > 0)  # training mode samples the outputs
        return average_softmax(logits_fn, samples, contextlib.nullcontext)
    finally:
        model.train(was_training)


def kl(model: nn.Module) -> torch.Tensor:
    """``KL(q(φ) || p(φ | θ))`` over every ABMLL layer."""
    return sum(m.kl() for m in layers(model))


def neg_log_prior(model: nn.Module, a0: float = 1.0, b0: float = 0.01) -> torch.Tensor:
    """``-log p(θ)`` over every ABMLL layer (the paper's a0 = 1, b0 = 0.01 by default)."""
    return sum(m.neg_log_prior(a0, b0) for m in layers(model))


__all__ = ["ABMLLLinear", "GaussianLoRA", "inject", "layers", "task_parameters", "global_parameters",
           "start_task", "adapt", "task_loss", "load_task", "predict", "kl", "neg_log_prior"]
