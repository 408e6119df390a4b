"""IVON (Shen et al., "Variational Learning is Effective for Large Deep Networks"; used for LoRA by
Cong et al., "Improving LoRA with Variational Learning") with the step fused into one kernel.

Same constructor, defaults and semantics as ``ivon.IVON`` of ivon-opt 0.1.3. What differs, and why:

- **Flat buffers.** Every parameter becomes a view of one flat buffer (the posterior mean), and the
  optimizer keeps the momentum, ``h``, the next weight sample and the gradients in flat buffers
  beside it. ``step()`` is one kernel launch per parameter group (``ops.ivon_step``): it folds the
  last gradient sample in, updates momentum, ``h`` and the mean, and draws the next weight sample.
  Entering ``sampled_params`` then only swaps the memory of the parameters' buffer and the
  sample's (``UntypedStorage._swap_data_ptr_``; on torch builds without it, every parameter is
  re-pointed at the sample's views). Inside the block, other tensors sharing the parameters'
  memory (``p.detach()``, a model's ``state_dict()``, ``posterior()``'s mean of fp32
  parameters taken before the block) show the sample too; ``posterior()`` called inside gives
  the mean.
- **fp32 state** whatever the parameter dtype (ivon-opt keeps state in the parameter dtype). With
  fp16/bf16 parameters the fp32 mean is the master copy and the parameters hold it rounded.
- **Noise.** ``noise="philox"`` (default) makes the noise inside the kernel from a counter-based
  generator seeded from torch's default generator at construction, so ``torch.manual_seed`` makes
  runs repeatable (and ranks seeded alike draw alike under ``sync``); the price estimator
  recomputes the noise instead of storing it. On CPU without
  Triton's interpreter the noise is drawn with ``torch.randn`` instead (same seeding rule, another
  stream). ``noise="torch"`` draws it with ``torch.randn`` at each ``sampled_params`` entry, in
  the order ivon-opt does (one ``[numel]`` draw per parameter group), for step-for-step comparison.
- **Gradients.** After a training sample each ``p.grad`` is a view of the optimizer's flat gradient
  buffer, and ``zero_grad()`` zeroes that buffer in place (``set_to_none`` is ignored), so backward
  accumulates straight into what the kernel reads. A gradient that is not such a view (say after
  ``model.zero_grad()``) is copied in when the sample ends. Changing ``p.grad`` in place between the
  end of a sample and ``step()`` changes the step (ivon-opt copies gradients when the sample ends).
- **Mixed precision with ``torch.amp.GradScaler``** (fp16): ``scaler.step(optimizer)`` hands the
  step its scale and inf check (``_step_supports_amp_scaling``), and the step unscales every
  gradient sample since the last step, ``mc_samples > 1`` included: folded samples were scaled
  by the same factor, which GradScaler changes only in ``update()``. A step where any sample
  held inf or NaN is skipped and its samples dropped, as GradScaler skips one; from the second
  GradScaler step on, an earlier sample's inf is also put into the last sample's ``p.grad`` (one
  extra pass over the running means per sample), which is all GradScaler checks, so its scale
  backs off. Calling ``scaler.unscale_(optimizer)`` first (to clip) unscales only the last
  sample, so it is refused with ``mc_samples > 1``. One host sync per step (GradScaler's own
  ``.item()`` costs one too); not with ``capturable=True``.
- **CUDA graphs.** ``capturable=True`` keeps the step count and the Philox draw count in a
  device tensor that the kernel reads, so that a training step (``sampled_params`` block and
  ``step()``) captured in a CUDA graph draws new noise and debiases by the right step at every
  replay. Each step then runs one more small launch (the counters' increment). Hyper-parameters
  (``lr`` and the rest) are read when the step is captured: change them, capture again.
  ``capturable=False`` (the default) refuses to run while a graph is being captured, rather than
  replaying one step's noise and step count forever.
- Exceptions inside ``sampled_params`` restore the mean; ``step()`` without a gradient sample, and
  nested ``sampled_params``, raise; ``state_dict()`` also holds the step count, the fp32 mean and
  the noise state, and ``load_state_dict`` also accepts ivon-opt's state dicts.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

from ..ops._dispatch import backend, capturing_cuda_graph, use_backend
from ..ops.ivon_step import StepScalars, ivon_step

HESS_APPROX = ("price", "gradsq")
# torch builds with UntypedStorage._swap_data_ptr_ let sampled_params trade two buffers' memory
# instead of re-pointing every parameter (~0.2 us of Python per parameter, twice per step)
STORAGE_EXCHANGE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")
NOISE = ("philox", "torch")
_HYPER = ("lr", "mc_samples", "beta1", "beta2", "weight_decay", "hess_init", "ess", "clip_radius")


class IVON(torch.optim.Optimizer):
    """Improved Variational Online Newton: a diagonal Gaussian posterior ``N(m, 1/(ess*(h + wd)))``
    over every parameter. Train inside ``with opt.sampled_params(train=True):`` (forward and
    backward at a weight sample), then ``opt.step()``; outside the block parameters hold the mean.
    """

    hessian_approx_methods = HESS_APPROX
    # torch.amp.GradScaler.step then sets ``grad_scale`` and ``found_inf`` on the optimizer and
    # calls step() without unscaling the gradients itself (see _unscale_for_grad_scaler)
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, ess: float, hess_init: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99999, weight_decay: float = 1e-4, mc_samples: int = 1, hess_approx: str = "price",
                 clip_radius: float = float("inf"), sync: bool = False, debias: bool = True, rescale_lr: bool = True,
                 noise: str = "philox", capturable: bool = False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 1 <= mc_samples:
            raise ValueError(f"Invalid number of MC samples: {mc_samples}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight decay: {weight_decay}")
        if not 0.0 < hess_init:
            raise ValueError(f"Invalid Hessian initialization: {hess_init}")
        if not 0.0 < ess:
            raise ValueError(f"Invalid effective sample size: {ess}")
        if not 0.0 < clip_radius:
            raise ValueError(f"Invalid clipping radius: {clip_radius}")
        if not 0.0 <= beta1 <= 1.0:
            raise ValueError(f"Invalid beta1 parameter: {beta1}")
        if not 0.0 <= beta2 <= 1.0:
            raise ValueError(f"Invalid beta2 parameter: {beta2}")
        if hess_approx not in HESS_APPROX:
            raise ValueError(f"Invalid hess_approx parameter: {hess_approx!r} (one of {HESS_APPROX})")
        if noise not in NOISE:
            raise ValueError(f"Invalid noise parameter: {noise!r} (one of {NOISE})")
        if not isinstance(capturable, bool):
            raise ValueError(f"Invalid capturable parameter: {capturable!r} (True or False)")
        defaults = dict(lr=lr, mc_samples=mc_samples, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                        hess_init=hess_init, ess=ess, clip_radius=clip_radius)
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        self.mc_samples, self.hess_approx, self.sync = mc_samples, hess_approx, sync
        self.debias, self.rescale_lr, self.noise, self.capturable = debias, rescale_lr, noise, capturable
        self._build_buffers()
        self._step = 0  # steps taken, counted on the host (on the device too when capturable)
        # Philox noise needs a seed; torch noise must leave torch's generator as ivon-opt would
        self._seed = int(torch.randint(0, 2 ** 31 - 1, ())) if noise == "philox" else 0
        self._draws = 0          # Philox draws made so far (the next draw index)
        self._sample_draw = None  # the draw index (Philox) or buffer (torch noise) of the sample in self._sample
        self._fresh = False      # self._sample holds a sample nobody used yet
        self._count = 0          # gradient samples taken in this step
        self._grad_scaler = False  # a step came through torch.amp.GradScaler (see _take_gradients)
        self._pending = False    # the latest one is still only in the gradient buffer
        self._inside = False

    # ---------------------------------------------------------------- layout
    def add_param_group(self, param_group):
        if not self._building:
            raise ValueError("IVON keeps its state in flat buffers built at construction: pass every "
                             "parameter group to the constructor")
        super().add_param_group(param_group)

    def _build_buffers(self):
        params = [p for g in self.param_groups for p in g["params"] if p is not None]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"Parameters are on different devices: {[str(d) for d in devices]}")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"Parameters are on different dtypes: {[str(d) for d in dtypes]}")
        if any(not d.is_floating_point for d in dtypes):
            raise ValueError(f"IVON needs floating-point parameters, got {dtypes}")
        self._device = next(iter(devices)) if params else torch.device("cpu")
        self._dtype = next(iter(dtypes)) if params else torch.get_default_dtype()
        # the path is chosen once, when the optimizer is built: a sample one path drew, it also folds
        self._backend = backend(self._device)
        self._kernel_noise = self.noise == "philox" and self._backend == "triton"
        self._params = params
        self._numel = sum(p.numel() for p in params)
        n, dev = self._numel, self._device
        with torch.no_grad():
            self._mean = torch.cat([p.detach().reshape(-1).float() for p in params]) if params \
                else torch.zeros(0, device=dev)
        low = self._dtype != torch.float32
        # the parameters' own storage outside sampled_params: the fp32 mean itself, or a rounded copy
        self._mean_param = self._mean.to(self._dtype) if low else self._mean
        self._momentum = torch.zeros(n, device=dev)
        self._hess = torch.empty(n, device=dev)
        self._sample = torch.empty(n, device=dev, dtype=self._dtype)
        self._grad = torch.zeros(n, device=dev, dtype=self._dtype)
        self._avg_grad = self._avg_hess_stat = None  # running means, made when a step has 2+ samples
        self._eps_spare = None  # with torch.randn noise: the buffer the next draw fills
        self._groups = []  # (group, its slice of the flat buffers)
        self._where = {}   # id(parameter) -> (group, its slice)
        offset = 0
        views = {"mean": [], "sample": [], "grad": []}
        for group in self.param_groups:
            start = offset
            for p in group["params"]:
                if p is None:
                    continue
                sl = slice(offset, offset + p.numel())
                self._where[id(p)] = (group, sl)
                views["mean"].append(self._mean_param[sl].view(p.shape))
                views["sample"].append(self._sample[sl].view(p.shape))
                views["grad"].append(self._grad[sl].view(p.shape))
                offset += p.numel()
            group["numel"] = offset - start
            self._groups.append((group, slice(start, offset)))
            self._hess[start:offset] = group["hess_init"]
        self._mean_views, self._sample_views, self._grad_views = views["mean"], views["sample"], views["grad"]
        for p, v in zip(self._params, self._mean_views):
            p.data = v
        # entering and leaving sampled_params exchange what the parameters show: O(1) by swapping
        # the two flat buffers' memory where torch can, else one ``p.data`` per parameter
        self._exchange_storage = STORAGE_EXCHANGE and self._sample.untyped_storage().nbytes() > 0
        self._showing_sample = False
        # capturable: [steps, Philox draws] on the device, and what each kind of call adds to them
        self._counters = torch.zeros(2, dtype=torch.int64, device=dev) if self.capturable else None
        self._increments = {(update, draw): torch.tensor([update, draw], dtype=torch.int64, device=dev)
                            for update in (0, 1) for draw in (0, 1)} if self.capturable else None

    @property
    def current_step(self) -> int:
        """Steps taken (read from the device when ``capturable``: a host sync)."""
        return int(self._counters[0]) if self._counters is not None else self._step

    @current_step.setter
    def current_step(self, value: int):
        self._step = int(value)
        if self._counters is not None:
            self._counters[0] = self._step

    def _draw_count(self) -> int:
        """Philox draws made so far (read from the device when ``capturable``: a host sync)."""
        return int(self._counters[1]) if self._counters is not None else self._draws

    def _show_sample(self, sample: bool):
        """Make the parameters hold the weight sample (True) or the mean (False).

        With storage exchange the parameters stay views of one buffer and that buffer trades its
        memory with the sample buffer's; the attributes ``_mean_param``/``_sample`` (and
        ``_mean`` for fp32 parameters, which is the parameters' buffer) are traded too, so that
        each keeps naming what it holds and the kernels read and write the right memory.
        """
        if sample == self._showing_sample:
            return
        if self._exchange_storage:
            self._sample.untyped_storage()._swap_data_ptr_(self._mean_param.untyped_storage())
            if self._mean is self._mean_param:
                self._mean = self._sample
            self._mean_param, self._sample = self._sample, self._mean_param
            self._mean_views, self._sample_views = self._sample_views, self._mean_views
        else:
            for p, v in zip(self._params, self._sample_views if sample else self._mean_views):
                p.data = v
        self._showing_sample = sample
        self._touched()

    # --------------------------------------------------------------- sampling
    def _scalars(self, group, update: bool) -> StepScalars:
        lr = group["lr"] * (group["hess_init"] + group["weight_decay"]) if self.rescale_lr else group["lr"]
        if not (self.debias and update):
            debias = 1.0
        elif self._counters is not None:
            debias = None  # from the step count on the device
        else:
            debias = 1.0 - math.pow(group["beta1"], float(self._step))
        return StepScalars(lr, group["ess"], group["weight_decay"], group["beta1"], group["beta2"], debias,
                           group["clip_radius"])

    def _next_noise(self):
        """The noise of a new sample: a Philox draw index, or a buffer drawn now with torch.randn
        (one [numel] draw per group, as ivon-opt does)."""
        if self._kernel_noise:
            self._draws += 1
            return self._draws - 1
        # two buffers in turn: the one being replaced is free once the call that folds its
        # sample has run, and that call is the one this noise is drawn for
        if self._eps_spare is None:
            self._eps_spare = torch.empty(self._numel, device=self._device, dtype=self._dtype)
        current = self._sample_draw if isinstance(self._sample_draw, torch.Tensor) else None
        eps, self._eps_spare = self._eps_spare, current
        for _, sl in self._groups:
            eps[sl] = torch.randn(sl.stop - sl.start, device=self._device, dtype=self._dtype)
        return eps

    def _run(self, *, fold: bool, update: bool, draw: bool, draw_scale: float = 1.0):
        """One ``ivon_step`` call per parameter group: fold the pending sample, update, draw."""
        counters = self._counters
        if counters is None and capturing_cuda_graph(self._device):
            raise RuntimeError("IVON is being captured in a CUDA graph, whose replays would repeat this step's "
                               "noise and step count: build the optimizer with capturable=True")
        eps_now = self._sample_draw
        eps_next = self._next_noise() if draw else None
        if counters is not None:
            # counted on the device before the launch, which reads them; Philox draw indices are
            # then relative to the draws made: -1 the one this call makes (or the latest)
            kernel_draw = draw and self._kernel_noise
            if update or kernel_draw:
                counters.add_(self._increments[int(update), int(kernel_draw)])
            if self._kernel_noise:
                eps_now = None if eps_now is None else -2 if draw else -1
                eps_next = -1 if draw else None
        if (fold or update) and not (fold and update and self._count == 1):
            self._ensure_avg()  # running means are read or written, unless one sample goes straight in
        for group, sl in self._groups:
            if sl.start == sl.stop:
                continue
            scalars = self._scalars(group, update)
            with use_backend(self._backend):
                ivon_step(self._mean[sl], self._momentum[sl], self._hess[sl], scalars,
                          grad=self._grad[sl] if fold else None, count=self._count,
                          avg_grad=None if self._avg_grad is None else self._avg_grad[sl],
                          avg_hess_stat=None if self._avg_hess_stat is None else self._avg_hess_stat[sl],
                          update=update, sample=self._sample[sl] if draw else None,
                          mean_copy=self._mean_param[sl] if self._mean_param is not self._mean else None,
                          eps_now=eps_now[sl] if isinstance(eps_now, torch.Tensor) else eps_now,
                          eps_next=eps_next[sl] if isinstance(eps_next, torch.Tensor) else eps_next,
                          draw_ess=scalars.ess * draw_scale, hess_approx=self.hess_approx, seed=self._seed,
                          index_base=sl.start, counters=counters)
        if update:  # (a draw writes the sample buffer, which the parameters show only after _show_sample)
            self._touched()
        if fold:
            self._pending = False
        if draw:
            self._sample_draw, self._fresh = eps_next, True

    def _touched(self):
        """Tell PyTorch the parameters were written in place: the kernels write their memory
        behind autograd's back, and what keeps values derived from a weight (DoRA's norms) or
        checks saved tensors reads the version counters."""
        if self._params:
            increment_version(self._params)

    def _ensure_avg(self):
        if self._avg_grad is None:
            self._avg_grad = torch.zeros(self._numel, device=self._device)
            self._avg_hess_stat = torch.zeros(self._numel, device=self._device)

    @contextlib.contextmanager
    def sampled_params(self, train: bool = False, tau: float = 1.0):
        """Inside the block the parameters hold a weight sample ``theta ~ N(m, 1/(ess*(h + wd)))``.

        ``train=True`` records the gradients left in ``p.grad`` at the end of the block as a sample
        for the next ``step()``. ``tau`` (prediction only) draws at test temperature: the sample's
        spread is ``1/(tau*ess*(h + wd))``; ``tau=inf`` leaves the mean in place.
        """
        if self._inside:
            raise RuntimeError("sampled_params blocks cannot be nested")
        if not tau > 0:
            raise ValueError(f"tau must be > 0 (inf for the mean), got {tau}")
        if train and tau != 1.0:
            raise ValueError("tau changes the spread of prediction samples only; use tau=1.0 with train=True")
        if tau != math.inf:
            if self._pending:
                self._run(fold=True, update=False, draw=True, draw_scale=tau)
            elif not self._fresh or tau != 1.0 or not self._kernel_noise:
                self._run(fold=False, update=False, draw=True, draw_scale=tau)
        self._inside = True
        sampled = tau != math.inf
        if sampled:
            self._fresh = False  # this sample is used; the next block draws another
            self._show_sample(True)
        try:
            yield
        except BaseException:
            train = False
            raise
        finally:
            self._show_sample(False)
            self._inside = False
            if train:
                self._take_gradients()

    def _take_gradients(self):
        """Make every ``p.grad`` a view of the flat gradient buffer (copying those that are not)."""
        stray = [(p, v) for p, v in zip(self._params, self._grad_views) if p.grad is not v]
        if stray:
            with torch.no_grad():
                got = [(p.grad, v) for p, v in stray if p.grad is not None]
                if got:
                    torch._foreach_copy_([v for _, v in got], [g for g, _ in got])
                for p, v in stray:
                    if p.grad is None:
                        v.zero_()
                    p.grad = v
        if self._grad_scaler and self._count:
            # GradScaler checks only p.grad (this sample) for inf; an earlier sample's inf, in the
            # running means, is put into it so the scale backs off (device ops, no sync)
            finite = torch.isfinite(self._avg_grad).all() & torch.isfinite(self._avg_hess_stat).all()
            self._grad[:1].add_(torch.where(finite, 0.0, math.inf))
        self._count += 1
        self._pending = True

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Update the posterior from the gradient samples taken since the last step and draw the
        next weight sample. ``closure`` (optional) runs ``mc_samples`` times and must itself take
        its sample inside ``sampled_params(train=True)``; the mean of its losses is returned."""
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / self.mc_samples
        if self._count == 0:
            raise RuntimeError("IVON.step() needs a gradient sample: run forward and backward inside "
                               "`with optimizer.sampled_params(train=True):` before calling step()")
        if hasattr(self, "found_inf") and not self._unscale_for_grad_scaler(getattr(self, "grad_scale", None),
                                                                            self.found_inf):
            return loss  # skipped, as GradScaler skips a step with inf or NaN gradients
        self._step += 1  # the device's count (capturable) goes up in the update's _run
        fold = self._pending
        if self.sync and dist.is_available() and dist.is_initialized():
            if fold:
                self._run(fold=True, update=False, draw=False)
                fold = False
            world = dist.get_world_size()
            for t in (self._avg_grad, self._avg_hess_stat):
                dist.all_reduce(t)
                t.div_(world)
        self._run(fold=fold, update=True, draw=self._kernel_noise)
        self._count = 0
        self._pending = False
        return loss

    def _unscale_for_grad_scaler(self, grad_scale, found_inf) -> bool:
        """Called by ``step()`` from ``torch.amp.GradScaler.step`` (see the module docstring).
        ``grad_scale`` (None when ``scaler.unscale_(optimizer)`` already unscaled ``p.grad``)
        multiplied every gradient sample since the last step: the pending one in the gradient
        buffer and the folded ones in the running means (the "price" statistic is linear in the
        gradient, "gradsq" quadratic). Returns False, with the samples dropped, when
        ``found_inf`` (GradScaler's check of ``p.grad``, the last sample) or a folded sample
        holds inf or NaN."""
        if self.capturable:
            raise RuntimeError("torch.amp.GradScaler needs a host sync per step, which a captured step cannot "
                               "make: build IVON with capturable=False to use it")
        self._grad_scaler = True
        folded = self._count - int(self._pending)
        if grad_scale is None and folded:
            raise RuntimeError(
                "scaler.unscale_(optimizer) unscales only the last gradient sample of the step, and "
                f"{folded} earlier sample(s) were folded in still scaled: with mc_samples > 1 let "
                "scaler.step(optimizer) unscale them all (clip the gradients of each sample yourself if needed)")
        bad = found_inf.float().sum()
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()
            if self._pending:
                self._grad.mul_(inv)
            if folded:
                self._avg_grad.mul_(inv)
                self._avg_hess_stat.mul_(inv if self.hess_approx == "price" else inv * inv)
        if folded:
            bad = bad + (~torch.isfinite(self._avg_grad).all()) + (~torch.isfinite(self._avg_hess_stat).all())
        if bad.item():
            self._count, self._pending = 0, False
            return False
        return True

    def zero_grad(self, set_to_none: bool = True):
        """Zero the flat gradient buffer in place; ``p.grad`` stays a view of it (see the module
        docstring). A sample not yet folded into the step's statistics is folded first."""
        if self._pending:
            self._run(fold=True, update=False, draw=False)
        self._grad.zero_()
        for p, v in zip(self._params, self._grad_views):
            p.grad = v

    # ------------------------------------------------------------- posterior
    def posterior(self, p: torch.Tensor):
        """``(mean, variance)`` of parameter ``p``'s posterior, fp32, shaped like ``p``. ``mean`` is
        the optimizer's own storage: write it in place, then call ``sync_params()``."""
        where = self._where.get(id(p))
        if where is None:
            raise ValueError("p is not a parameter of this optimizer")
        group, sl = where
        variance = 1.0 / (group["ess"] * (self._hess[sl] + group["weight_decay"]))
        return self._mean[sl].view(p.shape), variance.view(p.shape)

    @torch.no_grad()
    def sync_params(self):
        """Copy the fp32 mean into fp16/bf16 parameters after it was written in place, and start
        the next sample afresh (a no-op copy for fp32 parameters)."""
        if self._mean_param is not self._mean:
            self._mean_param.copy_(self._mean)
        self._fresh = False

    # ------------------------------------------------------------- state dict
    def state_dict(self):
        if self._pending:
            self._run(fold=True, update=False, draw=False)
        groups, first = [], 0
        for group, sl in self._groups:
            count = sum(p is not None for p in group["params"])
            packed = {k: group[k] for k in _HYPER}
            packed.update(params=list(range(first, first + count)), numel=group["numel"],
                          momentum=self._momentum[sl].clone(), hess=self._hess[sl].clone())
            groups.append(packed)
            first += count
        state = {"step": self.current_step, "count": self._count, "mean": self._mean.clone(),
                 "seed": self._seed, "draws": self._draw_count(), "noise": self.noise, "hess_approx": self.hess_approx}
        if self._count > 0:
            state["avg_grad"] = self._avg_grad.clone()
            state["avg_hess_stat"] = self._avg_hess_stat.clone()
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Load a state dict of this class or of ivon-opt's ``IVON`` (whose step count restarts at
        0, as it does there)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self._groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, this optimizer {len(self._groups)}")
        for saved, (group, sl) in zip(groups, self._groups):
            numel = saved.get("numel", saved["momentum"].numel())
            if numel != sl.stop - sl.start:
                raise ValueError(f"state_dict's parameter group has {numel} elements, this one {sl.stop - sl.start}")
            for k in _HYPER:
                if k in saved:
                    group[k] = saved[k]
            self._momentum[sl] = saved["momentum"].reshape(-1).to(self._momentum)
            self._hess[sl] = saved["hess"].reshape(-1).to(self._hess)
        state = state_dict["state"]
        self.current_step = int(state.get("step", 0))
        if "mean" in state:
            self._mean.copy_(state["mean"])
        else:  # ivon-opt keeps the mean only in the parameters
            self._mean.copy_(torch.cat([p.detach().reshape(-1).float() for p in self._params]))
        self.sync_params()
        self._seed = int(state.get("seed", self._seed))
        self._draws = int(state.get("draws", self._draws))
        if self._counters is not None:
            self._counters[1] = self._draws
        self._count = int(state.get("count", 0) or 0)
        self._pending, self._fresh, self._sample_draw = False, False, None
        if self._count > 0:  # ivon-opt names the second running mean after its estimator
            means = state.get("avg_grad"), state.get("avg_hess_stat", state.get(
                "avg_nxg" if self.hess_approx == "price" else "avg_gsq"))
            if any(m is None for m in means):
                raise ValueError("state_dict has gradient samples but no running means")
            self._ensure_avg()
            self._avg_grad.copy_(means[0])
            self._avg_hess_stat.copy_(means[1])
