"""The serving engine: many adapters over one model, continuous batching at the iteration level.

One thread owns the model. Each iteration it runs queued commands (adapter loads and unloads),
admits waiting requests up to ``max_batch`` (each prompt prefilled alone, so a prompt never waits
for another's padding; requests queued together with one prompt and adapter, as an HTTP
request's ``n`` choices are, share its prefill and each get a copy of its cache), then runs one
decode forward over every running sequence with per-sequence adapter ids, whichever adapters
they use. Finished and cancelled sequences leave the batch after
the step that finished them; new ones join before the next.

The KV cache is our own, not transformers' continuous-batching manager: that manager packs the
tokens of all requests into one ragged row and schedules them itself, and it has no public hook
to give each request's tokens their own adapter id. Ours is one left-padded cache for the running
batch (a ``DynamicCache`` built from per-layer ``[B, H, T, D]`` tensors each step): a joining
sequence is padded to the batch's length (or the batch to its), a leaving one is dropped and
all-padding columns are trimmed, and every sequence gets its true positions through
``position_ids`` (its count of real cache columns). The batch's adapter route is rebuilt only
when its membership changes, so the decode steps in between reuse one token grouping. Works for
decoder-only models whose attention takes a 2-D padding mask and ``position_ids`` (Llama, Mistral,
Qwen, Gemma, Phi, OPT, GPT-2, GPT-J, ...). Sliding-window layers keep every key in the cache
(their attention mask applies the window), as the batch's cache pads all layers alike.

Adapters live in ``max_adapters`` slots of ``MultiLoRALinear`` layers of rank ``max_lora_rank``
(as vLLM's ``max_loras`` and ``max_lora_rank``); a free slot has rank 0 everywhere.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import inspect
import itertools
import logging
import math
import threading
import time
from concurrent.futures import Future
from typing import Callable

import torch
from torch import nn

from ..model import adapter_layers, find_targets, inject, module_name, use_adapters
from ..nn import AdapterRoute, NF4Linear
from ..peft_io import read_peft_adapter, set_peft_adapter
from .prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

# every linear layer but the output head, whatever the model names them (PEFT's shorthand): the
# slots then take any PEFT LoRA adapter of linear layers
DEFAULT_TARGETS = "all-linear"


# "mixed": any request joins the running batch. "per-adapter": only requests for the running
# batch's adapter join it; the next adapter (the oldest waiting request's) starts when the batch
# has drained. That is how a server without multi-adapter kernels batches (one adapter per
# forward), kept as the baseline of ``bora-bench serve``.
SCHEDULES = ("mixed", "per-adapter")


class QueueFull(RuntimeError):
    """``max_queue`` requests are waiting already."""


class SlotsBusy(ValueError):
    """No adapter slot is free and every loaded adapter has requests queued or running."""


class UnknownAdapter(KeyError):
    """The request names an adapter that is not loaded (or is being unloaded)."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(name)
        self.name, self.available = name, available

    def __str__(self) -> str:
        return f"adapter {self.name!r} is not loaded; available: {self.available}"


class InvalidParams(ValueError):
    """A sampling parameter or a prompt outside its domain; ``param`` names it (the message starts
    with it)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ids(allowed) -> torch.Tensor:
    """A guide's allowed ids as a tensor (a tensor as it is: int32 indexes as well as int64)."""
    return allowed if isinstance(allowed, torch.Tensor) else torch.as_tensor(allowed, dtype=torch.long)


GUIDE_MASK_BYTES = 64 << 20  # device memory for the masks of guide states kept between steps


class GuideMasks:
    """Guide states' allowed tokens as bool rows of ``vocab`` on ``device``, one per allowed-ids
    object. A guide hands out the same kept list or tensor for a state at every step, so its row
    is built (on the host) and copied to the device once; later steps only stack kept rows. The
    least recently used rows go first once they take more than ``budget`` bytes. Each entry holds
    its ids object, so that object's ``id`` cannot be reused while the row is kept."""

    def __init__(self, vocab: int, device: torch.device, budget: int = GUIDE_MASK_BYTES):
        self.vocab, self.device, self.budget = vocab, device, budget
        self._rows: collections.OrderedDict[int, tuple[object, torch.Tensor]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, allowed) -> torch.Tensor:
        """The mask of ``allowed`` (a list or tensor of ids; ids at or past ``vocab`` ignored)."""
        kept = self._rows.get(id(allowed))
        if kept is not None:
            self._rows.move_to_end(id(allowed))
            return kept[1]
        ids = _ids(allowed)
        row = torch.zeros(self.vocab, dtype=torch.bool)
        row[ids[ids < self.vocab]] = True
        row = row.to(self.device)
        self._rows[id(allowed)] = (allowed, row)
        while len(self._rows) > 1 and len(self._rows) * self.vocab > self.budget:
            self._rows.popitem(last=False)
        return row


PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")  # penalized()'s order

MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (vLLM's default limit)

PROMPT_LOGPROB_ROWS = 1024  # prompt positions turned into log-probabilities at once (bounds the fp32 copy)


class TokenLogprobs(collections.namedtuple("TokenLogprobs", "token logprob top")):
    """A token's log-probability under the model, and ``top``: the ``k`` most likely tokens at its
    position as ``(token, logprob)`` pairs, most likely first."""
    __slots__ = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Each row's token (``tokens`` ``[rows]``) with its log-probability under that row of
    ``logits`` (``[rows, vocab]``, the model's own: before temperature, penalties or cuts, as
    vLLM reports them by default) and the row's ``k`` most likely tokens. A token the model rules
    out (-inf) gets -9999.0, as vLLM reports it, which JSON can carry."""
    logprobs = logits.float().log_softmax(-1).clamp_min(-9999.0)
    top, ids = logprobs.topk(k, -1)
    # one host copy for the ids, one for the values: [token, top ids...] and [its logprob, top values...]
    ids = torch.cat([tokens[:, None], ids], 1).tolist()
    values = torch.cat([logprobs.gather(-1, tokens[:, None]), top], 1).tolist()
    return [TokenLogprobs(i[0], v[0], tuple(zip(i[1:], v[1:]))) for i, v in zip(ids, values)]


def _column(values: list, device: torch.device) -> torch.Tensor:
    """Per-row values as a ``[rows, 1]`` tensor."""
    return torch.tensor(values, device=device)[:, None]


def penalized(logits: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor, presence: torch.Tensor,
              frequency: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` with each row's penalties applied (``SamplingParams``; the
    penalties are ``[rows, 1]``), given ``counts`` ``[rows, 2, vocab]``: which tokens the prompt
    holds (row 0, 0 or 1) and how often each is in the output so far (row 1)."""
    output = counts[:, 1]
    seen = (counts[:, 0] + output) > 0
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency * output - presence * (output > 0)


def truncated(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``probs`` ``[rows, vocab]`` with every token outside each row's cut set to 0 (the rest
    left as they are: ``multinomial`` scales): its ``top_k`` most likely tokens (``[rows, 1]``;
    0 or -1: all), of those the fewest whose share of their mass reaches ``top_p``, of those the
    ones at least ``min_p`` times as likely as the most likely token. The most likely token is
    always kept."""
    ordered, order = probs.sort(-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    keep = (top_k <= 0) | (rank < top_k)
    ordered = ordered.masked_fill(~keep, 0.0)
    keep &= ordered.cumsum(-1) - ordered < top_p * ordered.sum(-1, keepdim=True)
    keep &= ordered >= min_p * ordered[:, :1]
    keep[:, 0] = True
    return probs.scatter(-1, order, ordered.masked_fill(~keep, 0.0))


@dataclasses.dataclass
class SamplingParams:
    """``temperature == 0`` is greedy. Penalties change the logits first, greedy or not, as
    vLLM applies them: ``repetition_penalty`` divides the positive logits (multiplies the
    negative ones) of every token in the prompt or the output so far, then each token's logit
    loses ``frequency_penalty`` times its count in the output and ``presence_penalty`` once if
    it is there. A sampled token is drawn from the temperature-scaled
    distribution cut to its ``top_k`` most likely tokens (0 or -1: all), then to the fewest of
    those whose share of their mass reaches ``top_p``, then to those at least ``min_p`` times as
    likely as the most likely one. ``seed`` makes sampling repeatable per request. Bad values
    raise ``InvalidParams`` naming the field.

    ``logprobs`` (0 to ``MAX_LOGPROBS``; None: off) has the engine record each output token's
    log-probability under the model and that many most likely tokens at its position
    (``Request.logprobs``); ``prompt_logprobs`` the same for each prompt token after the first
    (``Request.prompt_logprobs``). The log-probabilities are the model's own, before temperature,
    penalties and cuts (as vLLM's by default). ``max_tokens=0`` is allowed with ``prompt_logprobs``:
    the prompt is scored and nothing generated.

    ``logit_bias`` (``{token: bias}``, biases in [-100, 100]) is added to those tokens' logits
    after the penalties; ``min_tokens`` keeps the ``stop_token_ids`` from being chosen until that
    many tokens have been generated (both as vLLM applies them)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        if not _is_int(self.max_tokens):
            raise InvalidParams("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidParams("seed", f"must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise InvalidParams(name, f"must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise InvalidParams("max_tokens", f"must be >= 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise InvalidParams("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidParams("top_p", f"must lie in (0, 1], got {self.top_p!r}")
        if not (_is_int(self.top_k) and self.top_k >= -1):
            raise InvalidParams("top_k", f"must be an integer >= 1, or 0 or -1 for no limit, got {self.top_k!r}")
        if not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise InvalidParams("min_p", f"must lie in [0, 1], got {self.min_p!r}")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidParams("repetition_penalty", f"must be a number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (_is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise InvalidParams(name, f"must lie in [-2, 2], got {getattr(self, name)!r}")
        if not (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens):
            raise InvalidParams("min_tokens", f"must be an integer in [0, max_tokens = {self.max_tokens}], "
                                              f"got {self.min_tokens!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_int(t) and t >= 0 and _is_number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()):
                raise InvalidParams("logit_bias", "must map token ids to numbers in [-100, 100]")
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt (token ids) for ``adapter`` (None: the base model). ``on_token(token, finish)``
    is called from the engine thread with each new token (``finish`` None), and once more with
    ``token`` None and ``finish`` one of ``"stop"`` (a stop token), ``"length"`` (``max_tokens``)
    or ``"cancelled"`` (``"error"`` if the model failed); it must not block.

    With ``params.logprobs`` set, the engine appends each output token's ``TokenLogprobs`` to
    ``logprobs`` before handing the token out; with ``params.prompt_logprobs``, it sets
    ``prompt_logprobs`` (None for the first token, which has no context) before the first call.

    ``guide`` (``serve.guided.ChoiceGuide`` or ``RegexGuide``, or any object with their two
    methods) restricts the output: before each token the engine rules out every token but
    ``guide.allowed()`` (a list, or an int32 or int64 tensor, of ids; never changed), after penalties and biases; it hands each
    chosen token that is not a stop token to ``guide.advance(token)``, and a true answer ends the
    output (``"stop"``). An empty ``allowed()`` (the guide cannot go on) ends it as cut short
    (``"length"``)."""
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    on_token: Callable[[int | None, str | None], None]
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    guide: object | None = None
    slot: int = dataclasses.field(default=-1, init=False, repr=False)  # set by Engine.submit
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list, init=False, repr=False)
    prompt_logprobs: list[TokenLogprobs | None] | None = dataclasses.field(default=None, init=False, repr=False)


class _Seq:
    """A running request: ``last`` is the token to feed next."""
    __slots__ = ("request", "last", "generated", "generator", "counts", "bias")

    def __init__(self, request: Request, device: torch.device):
        self.request, self.last, self.generated = request, -1, 0
        self.counts: torch.Tensor | None = None  # for penalties: ``penalized``'s counts, on the device
        self.bias: torch.Tensor | None = None    # for logit_bias: ``[vocab]``, on the device
        self.generator = None
        if request.params.seed is not None and request.params.temperature > 0:
            self.generator = torch.Generator(device).manual_seed(request.params.seed)

    def penalty_counts(self, vocab: int, device: torch.device) -> torch.Tensor:
        """``[2, vocab]``: the prompt's tokens, then the output's counts (made at the first token)."""
        if self.counts is None:
            self.counts = torch.zeros(2, vocab, device=device)
            self.counts[0, torch.tensor(self.request.prompt, device=device)] = 1
        return self.counts

    def bias_row(self, vocab: int, device: torch.device) -> torch.Tensor:
        """``[vocab]``: the request's ``logit_bias``, 0 elsewhere (made at the first token)."""
        if self.bias is None:
            bias = self.request.params.logit_bias
            self.bias = torch.zeros(vocab, device=device)
            self.bias[torch.tensor(list(bias), device=device)] = torch.tensor(list(bias.values()), device=device)
        return self.bias


def _same_prefill(a: Request, b: Request) -> bool:
    """Whether one prefill serves both requests: the same prompt, adapter and prompt scoring."""
    return a.slot == b.slot and a.params.prompt_logprobs == b.params.prompt_logprobs and a.prompt == b.prompt


class Engine:
    """Serve ``model`` (a Hugging Face causal LM) with up to ``max_adapters`` adapters at once.

    A model without adapter layers gets ``MultiLoRALinear`` layers of rank ``max_lora_rank`` on
    ``target_modules`` (default ``"all-linear"``: every linear layer but the output head), all
    slots empty. ``start()`` runs the engine thread; ``submit`` queues a request;
    ``load_adapter`` / ``unload_adapter`` change the adapters while it serves, and a load may
    take the slot of an idle adapter its caller can load again (``install_adapter``'s
    ``evictable``: how ``bora-serve`` holds more adapters than slots). ``schedule``: one of ``SCHEDULES`` (default ``"mixed"``,
    the point of this engine; ``"per-adapter"`` is the baseline it is measured against).
    ``quantize="nf4"`` stores the frozen base weights of ``target_modules`` in NF4 (4-bit, as
    ``inject(..., quantize="nf4")``) under the adapter slots: many adapters served over one
    4-bit base (multi-adapter QLoRA). It applies when the engine injects the adapter layers;
    a model that has them already is served as it is, and with ``quantize="nf4"`` its adapter
    layers must sit on NF4 bases already. A model that bitsandbytes loaded in 4-bit is served
    over its own NF4 bytes either way (``inject`` adopts them).

    ``prefix_cache_tokens`` > 0 keeps that many prompt tokens' keys and values between requests,
    per adapter, in blocks of ``prefix_block`` tokens (``PrefixCache``): a prompt that begins
    with a cached prefix for its adapter (a shared system prompt, few-shot examples) is
    prefilled from the end of it. A prompt scored with ``k`` alternatives reuses the blocks a
    prompt scored with at least ``k`` left (they keep their tokens' log-probabilities).

    ``embedding_adapters=True`` gives the slots LoRA on the token embedding as well
    (``MultiLoRAEmbedding``: adapters whose ``target_modules`` name ``embed_tokens``), at
    ``max_adapters * max_lora_rank * (vocabulary + hidden)`` parameters more; like ``quantize``, it
    applies when the engine injects the adapter layers."""

    def __init__(self, model: nn.Module, max_adapters: int = 16, max_lora_rank: int = 16, max_batch: int = 32,
                 max_queue: int = 256, target_modules=DEFAULT_TARGETS, schedule: str = "mixed", quantize=None,
                 prefix_cache_tokens: int = 0, prefix_block: int = 16, embedding_adapters: bool = False):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
        if not isinstance(embedding_adapters, bool):
            raise ValueError(f"embedding_adapters must be a bool, got {embedding_adapters!r}")
        for name, value in (("max_adapters", max_adapters), ("max_lora_rank", max_lora_rank),
                            ("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.prefix_cache = PrefixCache(prefix_cache_tokens, prefix_block) if prefix_cache_tokens else None
        if not adapter_layers(model):
            if embedding_adapters:  # the targets by their full names, and the input embedding's
                embedding = model.get_input_embeddings()
                target_modules = [name for name, _, _ in find_targets(model, target_modules)] + [
                    module_name(model, embedding)]
            inject(model, target_modules, max_adapters, r=max_lora_rank, alpha=max_lora_rank, quantize=quantize)
            for layer in adapter_layers(model).values():
                for d in range(max_adapters):
                    layer.set_adapter(d, None, None)
        elif quantize is not None and not all(isinstance(getattr(layer, "base_layer", None), (NF4Linear, nn.Embedding))
                                              for layer in adapter_layers(model).values()):  # (embeddings stay)
            raise ValueError("quantize='nf4' applies when the engine injects the adapter layers, and this model "
                             "has them over unquantized bases: inject(model, ..., quantize='nf4') instead")
        self.model = model.eval()
        self.layers = adapter_layers(model)
        self.num_slots = next(iter(self.layers.values())).num_adapters
        self.device = next(model.parameters()).device
        # transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
        # ``cache`` (the old name warns, and goes in 5.40); older versions know only the old one
        arguments = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in arguments else "past_key_values"
        # a prefill needs the last position's logits only (a [prompt, vocab] product less), unless
        # its request scores the prompt; transformers before 4.50 called the argument num_logits_to_keep
        self._keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in arguments), None)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_batch, self.max_queue, self.schedule = max_batch, max_queue, schedule
        self.adapters: dict[str, int] = {}          # name -> slot
        self._in_use = collections.Counter()        # slot -> requests waiting or running
        self._used: dict[str, float] = {}           # adapter -> when a request last named it (eviction order)
        self._draining: set[str] = set()
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._running: list[_Seq] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask: torch.Tensor | None = None     # [B, T] 1 for a real cache column, 0 for padding
        self._route: AdapterRoute | None = None    # the running batch's adapter ids, per membership
        self._guide_masks: GuideMasks | None = None  # guided rows' masks, kept on the device
        self._thread: threading.Thread | None = None
        self._stop = False
        # requests, tokens, steps, step_sequences, prompt_tokens, cached_prompt_tokens, adapter_loads, adapter_evictions
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, folder, revision: str | None = None, evictable=(), held=()) -> None:
        """Read and check a PEFT folder (or Hub id, at ``revision``) here, then write it into a free
        slot between steps (``install_adapter``, which says what ``evictable`` and ``held`` do).
        Raises ``ValueError`` (bad folder, name taken, no free slot) and changes nothing then."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        self.install_adapter(name, read_peft_adapter(self.model, name, folder, revision), evictable, held)

    def install_adapter(self, name: str, adapter, evictable=(), held=()) -> None:
        """Write an adapter ``read_peft_adapter`` read into a free slot between steps. When no
        slot is free, the least recently used of the loaded adapters named in ``evictable`` (those
        its caller can load again) that has no request queued or running and is not in ``held``
        (requests on their way) gives up its slot: it is unloaded (``stats["adapter_evictions"]``);
        ``SlotsBusy`` when each of them has requests. Both containers are asked on the engine
        thread as it chooses. Raises ``ValueError`` (name taken, no free slot, none evictable) and
        changes nothing then."""

        def write():
            with self._lock:
                if name in self.adapters:
                    raise ValueError(f"adapter {name!r} is already loaded; unload it first")
                used = set(self.adapters.values())
                free = [d for d in range(self.num_slots) if d not in used]
                victim = None
                candidates = [n for n in self.adapters if n in evictable and n not in self._draining]
                if not free and candidates:
                    idle = [n for n in candidates if self._in_use[self.adapters[n]] == 0 and n not in held]
                    if not idle:
                        raise SlotsBusy(f"all {self.num_slots} adapter slots hold adapters with requests in flight")
                    victim = self._oldest(idle)
                    free = [self.adapters.pop(victim)]  # (under the lock: no request can name it now)
                    self._used.pop(victim, None)
                if not free:
                    raise ValueError(f"all {self.num_slots} adapter slots are in use; unload one first")
            set_peft_adapter(self.model, free[0], adapter, name)
            if self.prefix_cache is not None:
                self.prefix_cache.drop(free[0])
            with self._lock:
                self.adapters[name] = free[0]
                self._used[name] = time.monotonic()
                self.stats["adapter_loads"] += 1
                self.stats["adapter_evictions"] += victim is not None

        self._call(write)

    def _oldest(self, names: list[str]) -> str | None:
        """Of ``names``, the adapter a request named longest ago (eviction order)."""
        return min(names, key=lambda n: self._used.get(n, 0.0), default=None)

    def least_recently_used(self, names) -> str | None:
        """Of the loaded adapters in ``names``, the one a request named longest ago (None: none)."""
        with self._lock:
            return self._oldest([n for n in self.adapters if n in names and n not in self._draining])

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        """Refuse new requests for ``name``, wait for those in flight to finish, free its slot."""
        with self._lock:
            if name not in self.adapters or name in self._draining:
                raise UnknownAdapter(name, self.adapter_names())
            self._draining.add(name)
            slot = self.adapters[name]
            try:
                if not self._lock.wait_for(lambda: self._in_use[slot] == 0, timeout):
                    raise TimeoutError(f"adapter {name!r} still has requests in flight after {timeout} s")
            except BaseException:
                self._draining.discard(name)
                raise

        def clear():
            for layer in self.layers.values():
                layer.set_adapter(slot, None, None)
            if self.prefix_cache is not None:
                self.prefix_cache.drop(slot)
            with self._lock:
                del self.adapters[name]
                self._used.pop(name, None)
                self._draining.discard(name)

        self._call(clear)

    def adapter_names(self) -> list[str]:
        with self._lock:
            return [n for n in self.adapters if n not in self._draining]

    def _call(self, fn):
        """Run ``fn`` on the engine thread between steps (or here when it is not running)."""
        if not self.is_running():
            return fn()
        future: Future = Future()
        with self._lock:
            self._commands.append((fn, future))
            self._lock.notify_all()
        return future.result()

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises ``InvalidParams`` (the prompt: empty, or a token id outside
        the vocabulary, which on a GPU would fail the whole batch's device), ``UnknownAdapter`` or
        ``QueueFull``."""
        prompt = request.prompt
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidParams("prompt", f"must be a non-empty list of token ids, got {prompt!r:.80}")
        if not all(_is_int(t) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidParams("prompt", f"token ids must be ints in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in request.params.logit_bias or ()):
            raise InvalidParams("logit_bias", f"token ids must be in [0, {self.vocab_size})")
        with self._lock:
            slot = -1
            if request.adapter is not None:
                if request.adapter not in self.adapters or request.adapter in self._draining:
                    raise UnknownAdapter(request.adapter, self.adapter_names())
                slot = self.adapters[request.adapter]
                self._used[request.adapter] = time.monotonic()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            if self._stop:
                raise QueueFull("the engine is shutting down")
            self._in_use[slot] += 1
            request.slot = slot
            self._waiting.append(request)
            self.stats["requests"] += 1
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """The request leaves the batch after the current step (``on_token(None, "cancelled")``)."""
        request.cancelled = True
        with self._lock:
            self._lock.notify_all()

    def is_running(self) -> bool:
        """Whether the engine thread is alive (``start`` called, not shut down)."""
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def batch_size(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ the loop
    def start(self) -> "Engine":
        """Run the engine thread, in a copy of the caller's context (so ``ops.use_backend`` set
        around ``start`` holds for its forwards)."""
        if not self.is_running():
            self._stop = False
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._loop,), name="bora-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish those queued and running, stop the thread."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._commands or self._waiting or self._running or self._stop)
                if self._stop and not (self._commands or self._waiting or self._running):
                    return
            try:
                self.step()
            except Exception:  # a failed forward ends the requests it held, never the engine
                logger.exception("engine step failed; ending the running requests")
                failed, self._running, self._kv, self._mask, self._route = self._running, [], [], None, None
                for seq in failed:
                    self._finish(seq.request, "error")

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: commands, admissions (prefills), one decode step over the batch."""
        while self._commands:
            fn, future = self._commands.popleft()
            try:
                future.set_result(fn())
            except BaseException as err:  # handed to the caller's thread
                future.set_exception(err)
        self._leave([(s, "cancelled") for s in self._running if s.request.cancelled])
        while len(self._running) < self.max_batch:
            with self._lock:
                group = self._next_group()
            if not group:
                break
            for request in group:
                if request.cancelled:
                    self._finish(request, "cancelled")
            if any(not request.cancelled for request in group):
                self._prefill([request for request in group if not request.cancelled])
        if self._running:
            self._decode()

    def _next_waiting(self) -> int | None:
        """Where in the queue the next request to admit waits (None: none may join now)."""
        if not self._waiting:
            return None
        if self.schedule == "mixed" or not self._running:
            return 0
        slot = self._running[0].request.slot
        return next((i for i, request in enumerate(self._waiting) if request.slot == slot or request.cancelled), None)

    def _next_group(self) -> list[Request]:
        """The next request to admit, with the requests queued right behind it that have its
        prompt, adapter and prompt scoring (an HTTP request's ``n`` choices): one prefill serves
        them all, as far as the batch has room."""
        i = self._next_waiting()
        if i is None:
            return []
        first = self._waiting[i]
        end = i + 1
        room = self.max_batch - len(self._running)
        while end < len(self._waiting) and end - i < room and _same_prefill(self._waiting[end], first):
            end += 1
        group = [self._waiting[j] for j in range(i, end)]
        for _ in group:
            del self._waiting[i]
        return group

    def _prefill(self, requests: list[Request]) -> None:
        """One forward over the prompt ``requests`` share; each joins the batch with its own
        copy of the cache (those with ``max_tokens=0`` end once their prompt is scored)."""
        from transformers import DynamicCache

        first = requests[0]
        ids = torch.tensor([first.prompt], device=self.device)
        seqs = [_Seq(request, self.device) for request in requests if request.params.max_tokens > 0]
        try:
            # a cache without the model's config keeps every layer's keys whole: a sliding-window
            # layer's cache would keep only its window, which the batch's cache cannot pad to
            # the others (the attention masks still apply the window)
            k = first.params.prompt_logprobs
            scored = k is not None
            keep = {self._keep_arg: 1} if self._keep_arg and not scored else {}
            cached, prefix, known = 0, None, None
            if self.prefix_cache is not None:  # a scored prompt reuses only blocks that kept their scores
                cached, prefix, known = self.prefix_cache.match(first.slot, first.prompt, k)
            if scored and cached:  # the first new token's score needs the last cached token's logits
                cached -= 1
                prefix = [(keys[:, :, :cached], values[:, :, :cached]) for keys, values in prefix] if cached else None
            cache = DynamicCache(ddp_cache_data=prefix) if prefix else DynamicCache()
            with use_adapters(self.model, torch.tensor([first.slot], device=self.device)):
                out = self.model(input_ids=ids[:, cached:], **{self._cache_arg: cache}, use_cache=True, **keep)
            kv = [(layer.keys, layer.values) for layer in out[self._cache_arg].layers]
            if scored:
                # logits row i predicts token cached + i + 1; tokens 0..cached have their entries
                logits, targets = out.logits[0, :-1], ids[0, cached + 1:]
                entries = (known or [None]) + [entry for i in range(0, len(targets), PROMPT_LOGPROB_ROWS)
                                               for entry in token_logprobs(logits[i:i + PROMPT_LOGPROB_ROWS],
                                                                          targets[i:i + PROMPT_LOGPROB_ROWS], k)]
                for request in requests:
                    request.prompt_logprobs = list(entries)
            if self.prefix_cache is not None:
                self.prefix_cache.add(first.slot, first.prompt, kv, entries if scored else None, k)
            self.stats["prompt_tokens"] += len(first.prompt)
            self.stats["cached_prompt_tokens"] += cached
            if seqs:
                self._join(seqs, kv, len(first.prompt))
        except Exception:  # these requests fail alone; the running batch is untouched and goes on
            logger.exception("prefill failed; ending its request(s)")
            for request in requests:
                self._finish(request, "error")
            return
        for request in requests:
            if request.params.max_tokens == 0:  # the prompt scored, nothing to generate
                self._finish(request, "length")
        if seqs:
            self._emit(seqs, out.logits[:, -1].expand(len(seqs), -1))

    def _decode(self) -> None:
        seqs = self._running
        batch = len(seqs)
        tokens = torch.tensor([[s.last] for s in seqs], device=self.device)
        positions = self._mask.sum(1, keepdim=True)  # each sequence's tokens in the cache
        mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], 1)
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=self._kv)
        with use_adapters(self.model, self._route):
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                             **{self._cache_arg: cache}, use_cache=True)
        self._kv = [(layer.keys, layer.values) for layer in out[self._cache_arg].layers]
        self._mask = mask
        self.stats["steps"] += 1
        self.stats["step_sequences"] += batch
        self._emit(list(seqs), out.logits[:, -1])

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Choose each sequence's next token, hand it out, and retire finished sequences."""
        # (row, the tokens its guide allows); a row whose guide allows none ends here (its row
        # chooses unmasked, and the token is dropped)
        guided = [(i, s.request.guide.allowed()) for i, s in enumerate(seqs) if s.request.guide is not None]
        stuck = {i for i, allowed in guided if not len(allowed)}
        chosen = self._choose(seqs, logits, [(i, allowed) for i, allowed in guided if i not in stuck])
        scored = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
        if scored:
            where = torch.tensor(scored, device=logits.device)
            entries = dict(zip(scored, token_logprobs(logits[where], chosen[where],
                                                      max(seqs[i].request.params.logprobs for i in scored))))
        done = []
        for i, (seq, token) in enumerate(zip(seqs, chosen.tolist())):
            params = seq.request.params
            if i in stuck:
                done.append((seq, "length"))
                continue
            if token in params.stop_token_ids:
                done.append((seq, "stop"))
                continue
            if params.logprobs is not None:  # each row's own k of the batch's most likely
                entry = entries[i]
                seq.request.logprobs.append(entry._replace(top=entry.top[:params.logprobs]))
            seq.request.on_token(token, None)
            seq.generated += 1
            seq.last = token
            self.stats["tokens"] += 1
            if seq.request.guide is not None and seq.request.guide.advance(token):
                done.append((seq, "stop"))
            elif seq.generated >= params.max_tokens:
                done.append((seq, "length"))
        self._leave(done)

    def _choose(self, seqs: list[_Seq], logits: torch.Tensor, guided: list[tuple[int, object]]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.request.params.penalized]
        bias = [i for i, s in enumerate(seqs) if s.request.params.logit_bias]
        # (row, token) to rule out: min_tokens' stop tokens
        held = [(i, t) for i, s in enumerate(seqs) if s.generated < s.request.params.min_tokens
                for t in s.request.params.stop_token_ids if t < logits.shape[-1]]
        if rows or bias or held or guided:
            logits = logits.float().clone()
        if rows:
            params = [seqs[i].request.params for i in rows]
            counts = torch.stack([seqs[i].penalty_counts(logits.shape[-1], logits.device) for i in rows])
            logits[rows] = penalized(logits[rows], counts, *(_column([getattr(p, name) for p in params], logits.device)
                                                             for name in PENALTIES))
        if bias:
            logits[bias] += torch.stack([seqs[i].bias_row(logits.shape[-1], logits.device) for i in bias])
        if held:
            logits[tuple(torch.tensor(column, device=logits.device) for column in zip(*held))] = -math.inf
        if guided:  # (row, the tokens its guide allows): the row's other tokens are ruled out
            masks = self._guide_masks
            if masks is None or masks.vocab != logits.shape[-1] or masks.device != logits.device:
                masks = self._guide_masks = GuideMasks(logits.shape[-1], logits.device)
            keep = torch.stack([masks.row(allowed) for _, allowed in guided])
            where = [i for i, _ in guided]
            logits[where] = logits[where].masked_fill(~keep, -math.inf)
        tokens = self._draw(seqs, logits)
        if rows:  # each row's token counted in its output, one launch; the rows keep views of ``counts``
            counts[:, 1].scatter_add_(1, tokens[rows][:, None], torch.ones(len(rows), 1, device=logits.device))
            for row, i in enumerate(rows):
                seqs[i].counts = counts[row]
        return tokens

    def _draw(self, seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row, or one drawn from its cut distribution where it samples."""
        tokens = logits.argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if s.request.params.temperature > 0]
        if not sampled:
            return tokens
        params = [seqs[i].request.params for i in sampled]
        temperature, *cut = (_column([getattr(p, name) for p in params], logits.device)
                             for name in ("temperature", "top_k", "top_p", "min_p"))
        probs = truncated((logits[sampled].float() / temperature).softmax(-1), *cut)
        shared = [row for row, i in enumerate(sampled) if seqs[i].generator is None]
        if shared:  # one draw for every request without a seed
            where = torch.tensor([sampled[row] for row in shared], device=logits.device)
            tokens[where] = torch.multinomial(probs[shared], 1).squeeze(1)
        for row, i in enumerate(sampled):  # a seeded request draws from its own generator
            if seqs[i].generator is not None:
                tokens[i] = torch.multinomial(probs[row], 1, generator=seqs[i].generator).squeeze()
        return tokens

    # ------------------------------------------------------------------ the batch's KV cache
    def _join(self, seqs: list[_Seq], kv: list, length: int) -> None:
        """``seqs`` join the batch, each with ``kv`` (one prompt's cache, ``[1, H, length, D]`` per layer)."""
        mask = torch.ones(len(seqs), length, dtype=torch.long, device=self.device)
        if len(seqs) > 1:
            kv = [(k.expand(len(seqs), -1, -1, -1), v.expand(len(seqs), -1, -1, -1)) for k, v in kv]
        if not self._running:
            self._kv, self._mask = [(k.contiguous(), v.contiguous()) for k, v in kv], mask
        else:
            width = max(self._mask.shape[1], length)
            pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t  # noqa: E731  left, dim -2
            grow, new = width - self._mask.shape[1], width - length
            self._kv = [(torch.cat([pad(k0, grow), pad(k1, new)]), torch.cat([pad(v0, grow), pad(v1, new)]))
                        for (k0, v0), (k1, v1) in zip(self._kv, kv)]
            self._mask = torch.cat([torch.nn.functional.pad(self._mask, (grow, 0)),
                                    torch.nn.functional.pad(mask, (new, 0))])
        self._running.extend(seqs)
        self._reroute()

    def _reroute(self) -> None:
        """A new route for a new membership (the decode steps until the next change share it)."""
        self._route = None
        if self._running:
            slots = torch.tensor([s.request.slot for s in self._running], device=self.device)
            self._route = AdapterRoute(slots, self.num_slots)

    def _leave(self, finished: list[tuple[_Seq, str]]) -> None:
        """Finish these sequences (each with its reason) and compact the batch once."""
        if not finished:
            return
        for seq, reason in finished:
            self._finish(seq.request, reason)
        gone = {id(s) for s, _ in finished}
        keep = [i for i, s in enumerate(self._running) if id(s) not in gone]
        self._running = [self._running[i] for i in keep]
        self._reroute()
        if not keep:
            self._kv, self._mask = [], None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding for every sequence left go
        self._mask = mask[:, first:]
        self._kv = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                    for k, v in self._kv]

    def _finish(self, request: Request, reason: str) -> None:
        try:
            request.on_token(None, reason)
        finally:
            with self._lock:
                self._in_use[request.slot] -= 1
                self._lock.notify_all()
