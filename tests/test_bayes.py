"""IVON-LoRA's posterior tools: prediction at the mean and averaged over samples, uncertainty-guided
and random pruning, and the calibration metrics, against direct computations."""

import pytest
import torch
import torch.nn.functional as F

from bora_kernels import bayes
from bora_kernels.ops import use_backend
from bora_kernels.optim import IVON


def trained(noise="philox"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = IVON(model.parameters(), lr=0.05, ess=200.0, hess_init=0.1, noise=noise)
    with use_backend("torch"):
        for _ in range(20):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, opt, x, y


def test_predict_at_mean_and_averaged():
    model, opt, x, y = trained(noise="torch")  # so that torch.manual_seed replays the samples
    with use_backend("torch"):
        at_mean = bayes.predict(lambda: model(x))
        assert torch.allclose(at_mean, torch.softmax(model(x), -1))
        torch.manual_seed(4)
        averaged = bayes.predict(lambda: model(x), opt, samples=5)
        torch.manual_seed(4)
        by_hand = []
        for _ in range(5):
            with opt.sampled_params():
                by_hand.append(torch.softmax(model(x), -1))
        assert torch.allclose(averaged, torch.stack(by_hand).mean(0), atol=1e-6)
        assert not torch.allclose(averaged, at_mean)
        assert torch.allclose(averaged.sum(-1), torch.ones(64))
        cold = bayes.predict(lambda: model(x), opt, samples=2, tau=float("inf"))
        assert torch.allclose(cold, at_mean)
    with pytest.raises(ValueError, match="needs the IVON optimizer"):
        bayes.predict(lambda: model(x), samples=3)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_prune_uncertain_zeroes_the_largest_variances_per_matrix(fraction):
    model, opt, _, _ = trained()
    weights = [model[0].weight, model[2].weight]
    variances = {p: opt.posterior(p)[1].clone() for p in weights}
    biases = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    masks = bayes.prune_uncertain(opt, fraction)
    assert set(masks) == set(weights), "only weight matrices are pruned by default"
    for p in weights:
        mask, v = masks[p], variances[p]
        k = round(fraction * p.numel())
        assert mask.sum().item() == k
        assert (p.detach()[mask] == 0).all() and (opt.posterior(p)[0][mask] == 0).all()
        if 0 < k < p.numel():
            assert v[mask].min() >= v[~mask].max()
    assert torch.equal(model[0].bias.detach(), biases[0]) and torch.equal(model[2].bias.detach(), biases[1])


def test_prune_random_and_stacked_adapters():
    model, opt, _, _ = trained()
    masks = bayes.prune_random(opt, 0.25, generator=torch.Generator().manual_seed(0))
    assert all(m.sum().item() == round(0.25 * m.numel()) for m in masks.values())
    stacked = torch.nn.Parameter(torch.randn(3, 4, 5))  # D=3 adapters of [R=4, K=5]
    opt3 = IVON([stacked], lr=0.1, ess=10.0)
    mask = bayes.prune_uncertain(opt3, 0.5)[stacked]
    assert mask.reshape(3, -1).sum(1).tolist() == [10, 10, 10], "one matrix per adapter"
    with pytest.raises(ValueError, match="fraction"):
        bayes.prune_uncertain(opt3, 1.5)
    with pytest.raises(ValueError, match="IVON"):
        bayes.prune_uncertain(torch.optim.SGD([stacked], lr=0.1))


def test_pruning_leaves_dora_magnitudes_and_lora_biases_alone():
    """The stacked per-adapter vectors of DoRA (magnitudes) and lora_bias are 2-D but not weight
    matrices: pruning by default takes the adapters' A and B only (a zeroed magnitude would zero
    its output feature), while they train under IVON like the rest."""
    from bora_kernels.nn import AdapterVectors, MultiLoRALinear

    torch.manual_seed(1)
    layer = MultiLoRALinear(torch.nn.Linear(8, 6), 3, r=4, use_dora=[True, False, False], lora_bias=[False, True, False])
    vectors = [layer.lora_magnitude, layer.lora_bias_vector]
    assert all(isinstance(p, AdapterVectors) for p in vectors)
    opt = IVON([p for p in layer.parameters() if p.requires_grad], lr=0.05, ess=200.0, hess_init=0.1)
    x, ids = torch.randn(12, 8), torch.tensor([0, 1, 2, -1] * 3)
    with use_backend("torch"):
        for _ in range(3):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                layer(x, ids).square().mean().backward()
            opt.step()
    before = [p.detach().clone() for p in vectors]
    masks = bayes.prune_uncertain(opt, 0.5)
    assert set(masks) == {layer.lora_A, layer.lora_B}
    assert all(torch.equal(p.detach(), b) for p, b in zip(vectors, before))
    assert all(m.reshape(3, -1).sum(1).tolist() == [m[0].numel() // 2] * 3 for m in masks.values())


def test_calibration_metrics():
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
    labels = torch.tensor([0, 1, 1, 0])
    # by hand: confidences .95 .85 .75 .65, correct 1 0 1 1; 10 bins -> each its own bin
    want = (abs(1 - .95) + abs(0 - .85) + abs(1 - .75) + abs(1 - .65)) / 4
    assert bayes.expected_calibration_error(probs, labels, bins=10) == pytest.approx(want)
    # one bin: |accuracy - mean confidence|
    assert bayes.expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.75 - 0.8), abs=1e-6)
    want_nll = -(torch.tensor([0.95, 0.15, 0.75, 0.65]).double().log().mean().item())
    assert bayes.negative_log_likelihood(probs, labels) == pytest.approx(want_nll)
    assert bayes.accuracy(probs, labels) == 0.75
    with pytest.raises(ValueError, match="labels must"):
        bayes.negative_log_likelihood(probs, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="probs must"):
        bayes.expected_calibration_error(probs[0], labels)
