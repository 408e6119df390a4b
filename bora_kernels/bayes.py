"""IVON-LoRA's posterior tools: predictions from posterior samples, uncertainty-guided pruning,
and the calibration metrics used to judge them (Cong et al., "Improving LoRA with Variational
Learning", sections 3-5).

    probs = bayes.predict(lambda: model(x).logits[:, -1, choices], opt, samples=10)   # averaged
    bayes.prune_uncertain(opt, fraction=0.1)                                         # UGP
    bayes.expected_calibration_error(probs, labels), bayes.negative_log_likelihood(probs, labels)
"""

from __future__ import annotations


import torch

from .nn.multi_lora import AdapterVectors
from .optim import IVON


def predict(logits_fn, optimizer: IVON | None = None, samples: int = 0, tau: float = 1.0) -> torch.Tensor:
    """Predictive class probabilities. ``samples=0`` (the default) predicts once at the posterior
    mean ("@mean"); ``samples=S`` averages the softmax over ``S`` weight samples drawn at test
    temperature ``tau`` (their spread is ``1/(tau*ess*(h + wd))``, so ``tau=inf`` is the mean)."""
    if samples > 0 and optimizer is None:
        raise ValueError("samples > 0 needs the IVON optimizer that holds the posterior")
    return average_softmax(logits_fn, samples, lambda: optimizer.sampled_params(train=False, tau=tau))


def average_softmax(logits_fn, samples: int, sampled) -> torch.Tensor:
    """The softmax of ``logits_fn()`` (last dimension, fp32): once as it is (``samples=0``), or
    averaged over ``samples`` calls, each inside the context ``sampled()`` that puts one posterior
    draw in place. IVON's ``predict`` and ABMLL's ``abmll.predict`` share it."""
    if not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an int >= 0, got {samples!r}")
    with torch.no_grad():
        if samples == 0:
            return torch.softmax(logits_fn().float(), dim=-1)
        total = None
        for _ in range(samples):
            with sampled():
                probs = torch.softmax(logits_fn().float(), dim=-1)
            total = probs if total is None else total + probs
        return total / samples


def _check_fraction(fraction: float):
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def _prune(optimizer: IVON, params, fraction: float, scores) -> dict:
    """Zero the ``round(fraction * size)`` entries with the largest score in every weight matrix:
    a 2-D parameter is one matrix, a stacked ``[D, R, K]`` adapter tensor is D of them."""
    masks = {}
    with torch.no_grad():
        for p in params:
            mean, variance = optimizer.posterior(p)
            rows = variance.reshape(-1, variance.shape[-2] * variance.shape[-1]) if p.dim() >= 2 \
                else variance.reshape(1, -1)
            k = int(round(fraction * rows.shape[1]))
            mask = torch.zeros(rows.shape, dtype=torch.bool, device=p.device)
            if k > 0:
                mask.scatter_(1, torch.topk(scores(rows), k, dim=1).indices, True)
            mask = mask.view(p.shape)
            mean[mask] = 0.0
            masks[p] = mask
        optimizer.sync_params()
    return masks


def _pruned_params(optimizer: IVON, params):
    if not isinstance(optimizer, IVON):
        raise ValueError(f"optimizer must be bora_kernels.optim.IVON, got {type(optimizer).__name__}")
    if params is None:  # (a stack of per-adapter vectors is 2-D but no matrix: DoRA's magnitudes, lora_bias)
        return [p for g in optimizer.param_groups for p in g["params"]
                if p is not None and p.dim() >= 2 and not isinstance(p, AdapterVectors)]
    return list(params)


def prune_uncertain(optimizer: IVON, fraction: float = 0.1, params=None) -> dict:
    """Uncertainty-guided pruning: in every weight matrix (``params``, default every parameter of
    2+ dims but the per-adapter vectors of DoRA and ``lora_bias``, ``nn.multi_lora.AdapterVectors``)
    zero the ``fraction`` of entries with the largest posterior variance, in the mean the model
    uses. Returns ``{param: bool mask of the zeroed entries}``."""
    _check_fraction(fraction)
    return _prune(optimizer, _pruned_params(optimizer, params), fraction, lambda variance: variance)


def prune_random(optimizer: IVON, fraction: float = 0.1, params=None, generator=None) -> dict:
    """The baseline for ``prune_uncertain``: the same number of entries per matrix, chosen at random."""
    _check_fraction(fraction)

    def scores(variance):
        return torch.rand(variance.shape, generator=generator, device="cpu").to(variance.device)

    return _prune(optimizer, _pruned_params(optimizer, params), fraction, scores)


def _check_probs(probs, labels):
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(f"probs must be a [N, classes] tensor, got "
                         f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (probs.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be integer class ids of shape ({probs.shape[0]},), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]})")


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log p(label)`` (probabilities clamped at 1e-12)."""
    _check_probs(probs, labels)
    picked = probs.double().gather(1, labels.view(-1, 1)).clamp_min(1e-12)
    return -picked.log().mean().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins: ``sum_b |B|/N * |accuracy(B) - confidence(B)|``."""
    _check_probs(probs, labels)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1  # bin b holds (b/bins, (b+1)/bins]
    n = max(labels.numel(), 1)
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which.cpu(), (correct - confidence).cpu())
    return (gap.abs().sum() / n).item()


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check_probs(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


__all__ = ["accuracy", "average_softmax", "expected_calibration_error", "negative_log_likelihood", "predict", "prune_random",
           "prune_uncertain"]
