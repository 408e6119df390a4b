"""BoRA: task adapters tied to a global adapter by a hierarchical Gaussian prior (Eide & Frigessi).

Every task ``d`` has its own LoRA adapter ``θ_d`` (the A and B of every injected layer), and
``θ_d ~ N(Θ, I / tau)`` around global parameters ``Θ`` that have a flat hyperprior. Training finds
the MAP estimate of all ``θ_d`` and ``Θ`` together: a negative log likelihood plus a penalty that
pulls each task towards ``Θ`` (and ``Θ`` towards the tasks' mean).

Layout: ``BoRA`` injects ``D + 1`` adapters into each target layer. Slots ``0 .. D-1`` are the tasks
and slot ``D`` (named ``"global"``) is ``Θ``, all in the layer's stacked ``lora_A`` / ``lora_B`` (and,
with ``use_dora`` or ``lora_bias``, its stacked magnitudes or B's biases, which the prior ties too). So
a mixed batch runs every task in one forward and backward pass through the multi-adapter kernels,
and a rank whose batch misses a task still uses every parameter tensor (DDP needs no
``find_unused_parameters``). ``Θ`` is an ordinary adapter: serve it for unseen tasks, or export
it with ``save_peft_adapter``.

The two limits are exact, not approximated by extreme values:

- ``tau = 0``: independent tasks. The penalty is zero and ``Θ`` never moves.
- ``tau = inf``: one shared adapter (pooled). Every sequence is routed to ``Θ``, the task slots are
  not used, and there is no penalty.

The penalty (``penalty=``):

- ``"paper"``: ``tau / 2 * sum_d ||θ_d - Θ||²``, the negative log of eq. 5, over all tied tensors.
- ``"released"``: ``tau * sum_d sum_tensors ||θ_d,t - Θ_t||``, the un-squared Frobenius norm per
  tensor, as the authors' released code computes it. Its pull does not fade near ``Θ`` (a constant
  force ``tau`` per tensor, like an L1 penalty on each tensor's distance). Tasks can sit exactly on
  ``Θ`` (the norm's subgradient at zero is taken as zero), and the useful range of ``tau`` is
  different.

The likelihood (``likelihood=``):

- ``"mean"``: the mean token negative log likelihood of the batch. The prior then weighs against
  one batch's average, whatever the size of the data, so ``tau`` has a per-token meaning.
- ``"documents"``: an unbiased batch estimate of the whole dataset's negative log likelihood, with
  each document counted as its mean token NLL (the released code scales each task's likelihood by
  its number of documents ``N_d``). A sequence of task d sampled with probability ``p_d`` weighs
  ``N_d / (B p_d)``: ``N / B`` for proportional sampling, ``D N_d / B`` for uniform. This is
  eq. 6's posterior, where the likelihood grows with the data and the prior does not, so large
  tasks move further from ``Θ`` than small ones. That is the paper's Figure 4 and the source of
  the small tasks' gain; with ``"mean"`` it happens only through how often a task is sampled.

Adam's steps do not depend on the loss's overall scale, only on the balance between its terms.
The paper's learning rate grows with ``tau`` (``learning_rate_for_tau``) because the penalty's
gradient does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import adapter_layers, inject, use_adapters

PENALTIES = ("paper", "released")
LIKELIHOODS = ("mean", "documents")
SAMPLING = ("proportional", "uniform")
GLOBAL = "global"


def learning_rate_for_tau(tau: float, per_unit_tau: float = 1e-5, at_zero: float = 1e-4) -> float:
    """The paper's rule (Table 1): the learning rate proportional to ``tau`` (``1e-5 * tau``); the
    independent (``tau = 0``) and pooled (``tau = inf``) limits take ``at_zero``."""
    if tau < 0 or math.isnan(tau):
        raise ValueError(f"tau must be >= 0, got {tau}")
    return at_zero if tau == 0 or math.isinf(tau) else per_unit_tau * tau


class TaskSampler:
    """Draws the task of each sequence of a batch: ``"proportional"`` to the tasks' sizes (every
    document equally likely) or ``"uniform"`` over tasks (small tasks seen as often as large)."""

    def __init__(self, task_sizes: Sequence[int], rule: str = "proportional"):
        if rule not in SAMPLING:
            raise ValueError(f"rule must be one of {SAMPLING}, got {rule!r}")
        sizes = torch.as_tensor(list(task_sizes), dtype=torch.float64)
        if sizes.dim() != 1 or len(sizes) == 0 or (sizes <= 0).any():
            raise ValueError(f"task_sizes must be positive counts, one per task, got {list(task_sizes)}")
        self.rule = rule
        self.sizes = sizes
        self.probabilities = sizes / sizes.sum() if rule == "proportional" else torch.full_like(sizes, 1 / len(sizes))
        self._per_task: dict[torch.device, torch.Tensor] = {}  # N_d / p_d, one copy per device

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[batch_size]`` task indices (int64)."""
        return torch.multinomial(self.probabilities, batch_size, replacement=True, generator=generator)

    def weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Per sequence ``N_d / (B p_d)``: weights whose weighted sum of per-document losses is an
        unbiased estimate of the sum over the whole dataset (on ``task_ids``' device, no sync)."""
        per_task = self._per_task.get(task_ids.device)
        if per_task is None:
            per_task = self._per_task[task_ids.device] = (self.sizes / self.probabilities).float().to(task_ids.device)
        return per_task[task_ids.long()] / len(task_ids)


@dataclasses.dataclass
class BoRAOutput:
    loss: torch.Tensor            # likelihood term + penalty: what to backpropagate
    nll: torch.Tensor             # mean token negative log likelihood of the batch (for logging)
    penalty: torch.Tensor         # the prior's term (0 in both limits)
    sequence_nll: torch.Tensor    # [B] mean token NLL of each sequence
    logits: torch.Tensor


class BoRA(nn.Module):
    """BoRA over ``model``: ``D`` task adapters and the global ``Θ`` on every layer of
    ``target_modules`` (see the module's docstring).

    ``tasks``: the task names (or their number). ``tau``: the prior's precision, ``0`` to
    ``float("inf")``. ``task_sizes`` (documents per task) and ``sampling`` are needed for
    ``likelihood="documents"``. ``Θ`` is initialised as PEFT initialises LoRA (A Kaiming-uniform,
    B zero) and each task starts at ``Θ`` plus Gaussian noise of std ``init_noise``. Other keyword
    arguments go to ``bora_kernels.inject`` (``r``, ``alpha``, ``quantize``, ``dtype``, ...).

    ``forward(input_ids, task_ids, attention_mask=None, labels=None)`` computes the whole loss,
    the prior included, so that wrapping this module in DDP covers every parameter.
    """

    def __init__(self, model: nn.Module, target_modules, tasks: Sequence[str] | int, tau: float,
                 penalty: str = "paper", likelihood: str = "mean", task_sizes: Sequence[int] | None = None,
                 sampling: str = "proportional", init_noise: float = 1e-3, generator: torch.Generator | None = None,
                 **inject_kwargs):
        super().__init__()
        names = [str(d) for d in range(tasks)] if isinstance(tasks, int) else [str(t) for t in tasks]
        if not names or len(set(names)) != len(names) or GLOBAL in names:
            raise ValueError(f"tasks must be distinct names (not {GLOBAL!r}) or a positive count, got {tasks!r}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if init_noise < 0:
            raise ValueError(f"init_noise must be >= 0, got {init_noise}")
        self.sampler = None
        if task_sizes is not None:
            if len(task_sizes) != len(names):
                raise ValueError(f"task_sizes must have one count per task ({len(names)}), got {len(task_sizes)}")
            self.sampler = TaskSampler(task_sizes, sampling)
        elif likelihood == "documents":
            raise ValueError("likelihood='documents' needs task_sizes (documents per task)")
        for banned in ("num_adapters", "adapter_names", "method"):
            if banned in inject_kwargs:
                raise ValueError(f"{banned} is set by BoRA (one adapter per task plus the global one)")
        if not isinstance(inject_kwargs.get("r", 8), int):
            raise ValueError(f"r must be one int (every task and Θ share the rank), got {inject_kwargs['r']!r}")
        for flag in ("use_dora", "lora_bias"):
            if not isinstance(inject_kwargs.get(flag, False), bool):
                raise ValueError(f"{flag} must be one bool (every task and Θ share it), got {inject_kwargs[flag]!r}")
        self.task_names = tuple(names)
        self.penalty_form, self.likelihood = penalty, likelihood
        self.tau = tau  # validated by the setter
        self.model = inject(model, target_modules, num_adapters=len(names) + 1, adapter_names=[*names, GLOBAL],
                            **inject_kwargs)
        self._initialise(init_noise, generator)

    # ------------------------------------------------------------------ set-up
    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float):
        value = float(value)
        if not value >= 0:
            raise ValueError(f"tau must be >= 0 (float('inf') for one pooled adapter), got {value}")
        self._tau = value

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def pooled(self) -> bool:
        return math.isinf(self._tau)

    def layers(self):
        return list(adapter_layers(self.model).values())

    def tied(self) -> list[torch.Tensor]:
        """Every stacked per-adapter tensor the prior ties (slot ``D`` is ``Θ``): each layer's A and
        B, and its DoRA magnitudes and B's biases where the adapters have them."""
        return [w for layer in self.layers()
                for w in (layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.lora_bias_vector) if w is not None]

    @torch.no_grad()
    def _initialise(self, init_noise: float, generator):
        d = self.num_tasks
        for w in self.tied():  # inject already gave every slot PEFT's initialisation
            noise = torch.randn(w[:d].shape, generator=generator, dtype=torch.float32) * init_noise
            w[:d] = w[d:] + noise.to(w.device, w.dtype)

    # ------------------------------------------------------------------ the objective
    def penalty(self) -> torch.Tensor:
        """The prior's negative log density (up to a constant) at the current parameters."""
        tied = self.tied()
        device = tied[0].device
        if self._tau == 0 or self.pooled:  # the stacked tensors are used by the forward anyway (DDP)
            return torch.zeros((), device=device)
        d = self.num_tasks
        total = torch.zeros((), device=device, dtype=torch.float32)
        for w in tied:
            diff = (w[:d] - w[d:]).float().flatten(1)
            if self.penalty_form == "paper":
                total = total + diff.square().sum() * (self._tau / 2)
            else:  # vector_norm's gradient at a zero row is zero
                total = total + torch.linalg.vector_norm(diff, dim=1).sum() * self._tau
        return total

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Adapter slot of each sequence: its task (``D``: ``Θ`` itself), or ``Θ`` for all when pooled."""
        return torch.full_like(ids, self.num_tasks) if self.pooled else ids

    def forward(self, input_ids: torch.Tensor, task_ids, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> BoRAOutput:
        """The loss of a mixed batch: ``input_ids`` ``[B, L]``, one task per sequence. ``labels``
        default to ``input_ids`` (with ``attention_mask`` zeros ignored); -100 is ignored. Under
        ``torch.no_grad()`` a sequence may use ``"global"`` (``Θ``, e.g. for an unseen task)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        ids = _task_indices(task_ids, self.task_names)
        if ids.shape != input_ids.shape[:1]:
            raise ValueError(f"task_ids must hold one task per sequence ({input_ids.shape[0]}), got "
                             f"shape {tuple(ids.shape)}")
        if not self.pooled and torch.is_grad_enabled() and ids.device.type == "cpu" and (ids == self.num_tasks).any():
            raise ValueError(f"task_ids may not train {GLOBAL!r} directly (it learns through the prior); "
                             f"evaluate it under torch.no_grad()")
        ids = ids.to(input_ids.device)
        with use_adapters(self.model, self._slots(ids)):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        sequence_nll, tokens = sequence_losses(logits, input_ids, attention_mask, labels)
        nll = (sequence_nll * tokens).sum() / tokens.sum().clamp(min=1)
        if self.likelihood == "mean":
            data = nll
        else:
            data = (self.sampler.weights(ids) * sequence_nll).sum()
        penalty = self.penalty()
        return BoRAOutput(data + penalty, nll.detach(), penalty.detach(), sequence_nll.detach(), logits)

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def distances(self) -> torch.Tensor:
        """``[D]``: each task's L2 distance to ``Θ`` over all its tied tensors (Figure 4)."""
        d = self.num_tasks
        total = torch.zeros(d, dtype=torch.float64)
        for w in self.tied():
            total += (w[:d] - w[d:]).double().flatten(1).square().sum(1).cpu()
        return total.sqrt()


def _task_indices(task_ids, names: Sequence[str]) -> torch.Tensor:
    """Task ids (a tensor of indices, or a list of indices and names; ``"global"`` is index D) as
    an int64 ``[B]`` tensor. Like adapter ids, a tensor's values are checked only on the CPU (a
    check on a GPU would sync)."""
    if isinstance(task_ids, torch.Tensor):
        ids = task_ids.long()
    else:
        lookup = {n: i for i, n in enumerate(names)} | {GLOBAL: len(names)}
        try:
            ids = torch.tensor([lookup[t] if isinstance(t, str) else int(t) for t in task_ids], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"unknown task {err.args[0]!r}; tasks are {list(names)}") from None
    if ids.dim() != 1 or (ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() > len(names))):
        raise ValueError(f"task_ids must be a [B] list of task indices in 0..{len(names) - 1} (or names), got "
                         f"{ids.tolist() if ids.numel() < 20 else tuple(ids.shape)}")
    return ids


def sequence_losses(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask=None, labels=None):
    """``(mean token NLL of each sequence [B], its number of scored tokens [B])`` for next-token
    prediction: position ``t`` predicts ``labels[t + 1]``; -100 and masked positions are skipped."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    target = labels[:, 1:]
    token_nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none", ignore_index=-100)
    tokens = (target != -100).sum(1)
    return token_nll.sum(1) / tokens.clamp(min=1), tokens


__all__ = ["BoRA", "BoRAOutput", "TaskSampler", "learning_rate_for_tau", "sequence_losses", "GLOBAL"]
