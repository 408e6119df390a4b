"""The HTTP API over the engine: OpenAI's completions and chat completions (tool calls as guided
JSON: ``serve.tools``), model list, health,
Prometheus metrics, and vLLM's adapter hot load/unload and tokenizer endpoints.

``model`` in a request is an adapter name, or the base model's name for no adapter. Every error
is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}`` with the status that
says what happened: 400 bad input, 403 a path outside ``--adapter-root``, 404 an unknown adapter
(the message lists the loaded ones), 413 a body over the limit, 429 a full queue (with
``Retry-After``), 504 past the request timeout. A client that disconnects cancels its request: the
sequence leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..peft_io import read_peft_adapter
from .engine import (Engine, InvalidParams, QueueFull, Request, SamplingParams, SlotsBusy, TokenLogprobs,
                     UnknownAdapter, _is_int, _is_number)
from .guided import ChoiceGuide, ChoiceSet, RegexGuide, RegexSet, TokenTexts, check_choices
from .json_schema import json_object_regex, schema_regex
from .metrics import Metrics
from .pattern import SCHEMA_LIMITS, USER_LIMITS
from .tools import TOOL_PARSERS, ParsedCalls, check_tools, history_fields, tool_choice


logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often a waiting request checks for its timeout and its client
MAX_PATTERNS = 32  # guided patterns kept ready for later requests (each with its automaton and allowed tokens)
MAX_KEPT_STATES = 400_000  # and at most this many automaton states among them (a JSON schema's may be large)


@dataclasses.dataclass
class Limits:
    """What one request may ask for. ``max_prompt_tokens`` defaults to the model's context;
    ``max_choices`` bounds a request's prompts times ``n``."""
    max_prompt_tokens: int | None = None
    max_choices: int = 64
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    retry_after: int = 1


class APIError(Exception):
    TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
             504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@contextlib.contextmanager
def _checked():
    """``InvalidParams`` raised inside as a 400 naming its field."""
    try:
        yield
    except InvalidParams as err:
        raise APIError(400, str(err), param=err.param) from None


class _Detokenizer:
    """Text of the generated tokens so far, handed out in pieces: text that may still become a
    stop string, or an incomplete character (U+FFFD), is held back until it is settled.

    Only a window of the newest tokens is decoded per token, after the few tokens before it (so a
    leading space a tokenizer folds into a token is kept): once the window holds ``WINDOW``
    tokens and ends on a whole character, its text is settled and a new window starts. Decoding
    the whole output per token would cost O(n^2) in the output's length."""

    WINDOW = 32
    CONTEXT = 4

    def __init__(self, tokenizer, prompt: list[int], stops: list[str], special: bool = False):
        self.tokenizer, self.stops, self.special = tokenizer, stops, special  # special: keep special tokens' text
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.settled = ""                 # text of the tokens before the window
        self._start_window(prompt[-self.CONTEXT:])
        self.sent = 0
        self.unchecked = 0  # characters of text a stop string must end after (min_tokens)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=not self.special)

    def _start_window(self, context: list[int]) -> None:
        self.context, self.context_text, self.window = context, self._decode(context), []

    def text(self) -> str:
        full = self._decode(self.context + self.window)
        if full.startswith(self.context_text):
            return self.settled + full[len(self.context_text):]
        return self.settled + self._decode(self.window)

    def add(self, token: int, check: bool = True) -> tuple[str, bool]:
        """The next piece of text and whether a stop string ended the output. ``check`` false
        (the output is shorter than ``min_tokens``): no stop string may end in the text so far."""
        self.window.append(token)
        text = self.text()
        if len(self.window) >= self.WINDOW and not text.endswith("\ufffd"):
            self.settled = text
            self._start_window((self.context + self.window)[-self.CONTEXT:])
        if not check:
            self.unchecked = len(text)
        hits = [i for i in (text.find(s, max(0, self.unchecked - len(s) + 1)) for s in self.stops) if i >= 0] if check else []
        if hits:
            return self._take(text, min(hits)), True
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(text, safe), False

    def flush(self) -> str:
        text = self.text()
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


@dataclasses.dataclass
class _Job:
    """One choice's way through the engine: tokens arrive on ``queue`` from the engine thread.
    ``echo``: the prompt's text, put before the output; ``special``: special tokens' text is kept
    in the output (a tool-call parser may need it)."""
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    stops: list[str]
    index: int = 0
    echo: str | None = None
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    guide: ChoiceGuide | RegexGuide | None = None
    special: bool = False
    request: Request | None = None
    tokens: int = 0
    finish: str | None = None


def stop_tokens(tokenizer, model) -> tuple[int, ...]:
    """The ids that end a completion: the tokenizer's end-of-sequence token and every one the
    model's generation config names (``generation_config.json``: chat models such as Llama 3
    Instruct end a turn with a token the tokenizer does not call its eos), as ``generate`` stops."""
    generation = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [getattr(tokenizer, "eos_token_id", None),
           *(generation if isinstance(generation, (list, tuple)) else [generation])]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


# what a request may leave to the model's generation config, with the values taken as "not set"
# there (GenerationConfig's own defaults, as vLLM reads the config) and the API's ranges
SAMPLING_DEFAULTS = {"temperature": (1.0, lambda v: _is_number(v) and 0 <= v <= 2),
                     "top_p": (1.0, lambda v: _is_number(v) and 0 < v <= 1),
                     "top_k": (50, lambda v: _is_int(v) and v >= 1),
                     "min_p": (None, lambda v: _is_number(v) and 0 < v <= 1),
                     "repetition_penalty": (1.0, lambda v: _is_number(v) and v > 0)}


def sampling_defaults(model) -> dict[str, float]:
    """The ``temperature``, ``top_p``, ``top_k``, ``min_p`` and ``repetition_penalty`` the model's
    generation config sets (``generation_config.json``: Llama 3 Instruct says temperature 0.6,
    top_p 0.9), for requests that leave them out, as vLLM takes them; values outside the API's
    ranges are left out."""
    generation = getattr(model, "generation_config", None)
    found = {name: getattr(generation, name, None) for name in SAMPLING_DEFAULTS}
    return {name: value for name, value in found.items()
            if value is not None and value != SAMPLING_DEFAULTS[name][0] and SAMPLING_DEFAULTS[name][1](value)}


async def _all(coroutines) -> list:
    """Their results, in order; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


class Server:
    """The state behind the routes; ``create_app`` builds the FastAPI app around one.

    ``registry`` (``{name: (folder or Hub id, revision)}``): the adapters that may be loaded into
    a slot when a request names them, giving it the slot of the least recently used one of them
    that has no request in flight (so a server holds more adapters than it has slots, as vLLM's
    ``--max-loras`` does); run-time loads join it. ``tool_parser`` (one of ``tools.TOOL_PARSERS``):
    how the model writes tool calls, for ``tool_choice: "auto"``."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, adapter_root=None, limits: Limits | None = None,
                 adapter_paths: dict | None = None, registry: dict | None = None, tool_parser: str | None = None):
        if tool_parser not in (None, *TOOL_PARSERS):
            raise ValueError(f"tool_parser: {tool_parser!r} is not one of {', '.join(TOOL_PARSERS)}")
        self.engine, self.tokenizer, self.model_name, self.tool_parser = engine, tokenizer, model_name, tool_parser
        self.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
        self.limits = limits or Limits()
        config = engine.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        if self.limits.max_prompt_tokens is None:
            self.limits.max_prompt_tokens = self.context or 4096
        self.vocab = engine.vocab_size  # the engine's own bound (the embedding's rows), checked again at submit
        self.adapter_paths = dict(adapter_paths or {})
        self.metrics = Metrics()
        self.eos, self.defaults = stop_tokens(tokenizer, engine.model), sampling_defaults(engine.model)
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}  # each token's own text, for log-probabilities
        self._guide_texts: TokenTexts | None = None  # every token's text after others, for guided output
        self._patterns: collections.OrderedDict = collections.OrderedDict()  # recent RegexSets, by (pattern, stops)
        self.registry: dict[str, tuple] = dict(registry or {})
        self._loading: dict[str, asyncio.Lock] = {}  # one load at a time per adapter
        self._pending = collections.Counter()  # adapter -> requests between their load and their submit (> 0)
        self._reclaimed: dict[str, str] = {}  # adapter that gives up its slot -> the adapter waiting for it

    # ------------------------------------------------------------------ requests in
    async def read_json(self, http: HTTPRequest) -> dict:
        """The body as a JSON object, read no further than ``max_body_bytes`` (413 past it)."""
        limit = self.limits.max_body_bytes
        declared = http.headers.get("content-length")
        too_large = APIError(413, f"request body exceeds the server's limit of {limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise APIError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def adapter_for(self, body: dict) -> str | None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("model", f"must be the base model's name or an adapter's, got {json.dumps(model)}")
        if model == self.model_name:
            return None
        available = self.adapter_names()
        if model not in available:
            raise APIError(404, f"The model {model!r} does not exist; available: {[self.model_name] + available}",
                           param="model", code="model_not_found")
        return model

    def adapter_root_of(self, name: str) -> str:
        """Where an adapter came from, for its model card: its folder, or its Hub id (at its
        revision); ``adapter_paths`` for one loaded otherwise (Ray's)."""
        if name not in self.registry:
            return str(self.adapter_paths.get(name, name))
        folder, revision = self.registry[name]
        if Path(folder).exists():
            return str(Path(folder).resolve())
        return f"{folder}@{revision}" if revision else str(folder)

    def adapter_names(self) -> list[str]:
        """The adapters requests may name: those in slots and those loaded on demand."""
        return list(dict.fromkeys([*self.engine.adapter_names(), *self.registry]))

    def _no_slot(self, name: str, why: str) -> APIError:
        return APIError(503, f"adapter {name!r} found no free slot within the request timeout ({why}); retry later",
                        headers={"Retry-After": str(self.limits.retry_after)})

    async def wait_reclaimed(self, name: str | None) -> None:
        """A request for an adapter that gives up its slot to a waiting one is not queued on it:
        it waits for the adapter to leave its slot (then loads it again), so that steady traffic
        on the loaded adapters cannot keep another waiting for ever."""
        deadline = time.monotonic() + self.limits.request_timeout
        while name in self._reclaimed and name in self.engine.adapters:
            if time.monotonic() > deadline:
                raise self._no_slot(name, f"it gives up its slot to {self._reclaimed[name]!r}")
            await asyncio.sleep(0.02)

    async def ensure_loaded(self, name: str | None) -> None:
        """Give a registered adapter that holds no slot the slot of the least recently used
        registered one with no request in flight. While every one has requests, it waits, and
        claims the least recently used one: that one takes no new requests until its last one
        ends and its slot is free (``wait_reclaimed``). 503 after the request timeout."""
        if name is None or name in self.engine.adapters or name not in self.registry:
            return
        async with self._loading.setdefault(name, asyncio.Lock()):
            if name in self.engine.adapters or name not in self.registry:
                return
            folder, revision = self.registry[name]
            try:
                adapter = await asyncio.to_thread(read_peft_adapter, self.engine.model, name, folder, revision)
            except Exception as err:  # noqa: BLE001 (a file that changed since it was registered: the server's fault)
                raise APIError(500, f"adapter {name!r} could not be loaded from {folder}: {err}", param="model") from None
            deadline = time.monotonic() + self.limits.request_timeout
            claimed = None
            try:
                while True:
                    try:
                        await asyncio.to_thread(self.engine.install_adapter, name, adapter, self.registry, self._pending)
                        if name not in self.registry:  # unloaded while it loaded
                            await asyncio.to_thread(self.engine.unload_adapter, name)
                        return
                    except SlotsBusy as err:
                        if time.monotonic() > deadline:
                            raise self._no_slot(name, str(err)) from None
                    if claimed is None or claimed not in self.engine.adapters:  # (claim one; again once it went)
                        self._reclaimed.pop(claimed, None)
                        claimed = self.engine.least_recently_used(
                            [n for n in self.registry if n not in self._reclaimed])
                        if claimed is not None:
                            self._reclaimed[claimed] = name
                    await asyncio.sleep(0.02)
            finally:
                if claimed is not None and self._reclaimed.get(claimed) == name:
                    del self._reclaimed[claimed]

    def choices(self, body: dict, prompts: int) -> int:
        """``n``, the choices per prompt, checked against ``best_of`` and ``max_choices``."""
        n = 1 if body.get("n") is None else body["n"]
        if not (_is_int(n) and n >= 1):
            raise _bad("n", f"must be an integer >= 1, got {json.dumps(n)}")
        if body.get("best_of") not in (None, n):  # ranking more samples than are returned: not done here
            raise _bad("best_of", f"{json.dumps(body['best_of'])} is not supported by this server (only best_of = n)")
        if n * prompts > self.limits.max_choices:
            raise _bad("n", f"{prompts} prompt(s) times n = {n} exceeds the server's limit of "
                            f"{self.limits.max_choices} choices per request")
        return n

    def logprobs(self, body: dict, chat: bool) -> int | None:
        """How many alternatives per token the response lists (None: no log-probabilities): the
        completions API's ``logprobs`` count, or chat's ``logprobs`` flag and ``top_logprobs``."""
        top = body.get("top_logprobs")
        if chat:
            wanted = body.get("logprobs")
            if wanted not in (None, True, False):
                raise _bad("logprobs", f"must be true or false, got {json.dumps(wanted)}")
            if top is not None and not wanted:
                raise _bad("top_logprobs", "needs logprobs: true")
            return (0 if top is None else top) if wanted else None
        if top is not None:
            raise _bad("top_logprobs", "is chat's; the completions API takes logprobs: <count>")
        return body.get("logprobs")  # (its range is SamplingParams' to check)

    def sampling(self, body: dict, prompt_tokens: int, default_max: int | None,
                 chat: bool = False) -> tuple[SamplingParams, list[str]]:
        for name, allowed in (("suffix", (None,)), ("echo", (None, False) if chat else (None, False, True)),
                              ("use_beam_search", (None, False)),
                              # constrained output: a client asking for it must not get free text
                              ("functions", (None, [])), ("guided_grammar", (None,)),
                              *(() if chat else (("tools", (None, [])), ("tool_choice", (None, "none"))))):
            if name in body and body[name] not in allowed:
                raise _bad(name, f"{json.dumps(body[name])} is not supported by this server")
        room = self.limits.max_tokens
        why = f"the server's limit of {room} tokens (--max-tokens-limit)"
        if self.context is not None and self.context - prompt_tokens < room:
            room = self.context - prompt_tokens
            why = f"the {room} tokens left in the model's context of {self.context} after {prompt_tokens} prompt tokens"
        stops = body.get("stop")
        stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop", "must be a non-empty string or a list of at most 4 of them")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad("ignore_eos", "must be true or false")
        extra = [] if body.get("stop_token_ids") is None else body["stop_token_ids"]  # (vLLM's; kept with ignore_eos)
        if not isinstance(extra, list) or not all(_is_int(t) and 0 <= t < self.vocab for t in extra):
            raise _bad("stop_token_ids", f"must be a list of token ids in [0, {self.vocab})")
        given = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        echo, logprobs = body.get("echo") is True, self.logprobs(body, chat)
        if body.get(given) == 0 and not echo:
            raise _bad(given, "must be >= 1 (0 only with echo), got 0")
        bias = body.get("logit_bias")
        if bias is not None:  # JSON keys are strings: token ids written as such
            if not (isinstance(bias, dict) and all(isinstance(k, str) and k.isdigit() for k in bias)):
                raise _bad("logit_bias", "must map token ids (as strings) to numbers in [-100, 100]")
            bias = {int(k): v for k, v in bias.items()}
            if any(t >= self.vocab for t in bias):
                raise _bad("logit_bias", f"token ids must lie in [0, {self.vocab})")
        values = {"max_tokens": body.get(given), "seed": body.get("seed"), "logprobs": logprobs,
                  "min_tokens": body.get("min_tokens"), "logit_bias": bias,
                  # echo scores the prompt when log-probabilities are asked for, or when nothing is generated
                  "prompt_logprobs": logprobs if echo and logprobs is not None else
                  0 if echo and body.get(given) == 0 else None,
                  "presence_penalty": body.get("presence_penalty"), "frequency_penalty": body.get("frequency_penalty"),
                  **{k: body[k] if body.get(k) is not None else self.defaults.get(k) for k in SAMPLING_DEFAULTS}}
        if values["max_tokens"] is None:  # the default is within the room
            values["max_tokens"] = min(default_max or room, room)
        try:  # the fields' own domains are SamplingParams' to check
            params = SamplingParams(**{k: v for k, v in values.items() if v is not None},
                                    stop_token_ids=tuple(dict.fromkeys([*(() if ignore_eos else self.eos), *extra])))
        except InvalidParams as err:
            param = {"max_tokens": given, "logprobs": "top_logprobs" if chat else "logprobs"}.get(err.param, err.param)
            raise APIError(400, f"{param}{str(err)[len(err.param):]}", param=param) from None
        if params.max_tokens > room:
            raise _bad(given, f"{params.max_tokens} exceeds {why}")
        if params.temperature > 2:  # OpenAI's range
            raise _bad("temperature", f"must lie in [0, 2], got {params.temperature:g}")
        return params, stops

    @staticmethod
    def guided_output(body: dict) -> tuple[str, str, list[str] | str] | None:
        """What a request's output must be, and the field that said so: ``(param, "choice",
        strings)`` from vLLM's ``guided_choice`` or ``structured_outputs: {"choice": [...]}``;
        ``(param, "regex", pattern)`` from ``guided_regex`` or ``structured_outputs: {"regex":
        ...}``; ``(param, "json", the schema's pattern)`` from ``guided_json``,
        ``structured_outputs: {"json": schema}`` or OpenAI's ``response_format: {"type":
        "json_schema", "json_schema": {"schema": ...}}`` (``{"type": "json_object"}``: any
        object, ``json_object_regex``); None: free text. Other kinds of structured output are refused, never
        ignored."""
        fields = {"guided_choice": "choice", "guided_regex": "regex", "guided_json": "json",
                  "structured_outputs": None, "response_format": None}
        given = [name for name in fields if body.get(name) is not None
                 and not (name == "response_format" and body[name] == {"type": "text"})]
        if not given:
            return None
        if len(given) > 1:
            raise _bad(given[1], f"give one of {', '.join(given)}, not several")
        param = given[0]
        kind, value = fields[param], body[param]
        if param == "structured_outputs":
            if not (isinstance(value, dict) and len(value) == 1 and set(value) <= {"choice", "regex", "json"}):
                raise _bad(param, f"{json.dumps(value)} is not supported by this server "
                                  "(only {\"choice\": [strings]}, {\"regex\": pattern} or {\"json\": schema})")
            (kind, value), = value.items()
        if param == "response_format":
            spec = value.get("json_schema") if isinstance(value, dict) and value.get("type") == "json_schema" else None
            if value == {"type": "json_object"}:
                return param, "json", json_object_regex()
            if not (isinstance(spec, dict) and "schema" in spec):
                raise _bad(param, f"{json.dumps(value)} is not supported by this server (only {{\"type\": \"text\"}}, "
                                  "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                                  "{\"schema\": ...}})")
            kind, value = "json", spec["schema"]
        if kind == "json":
            try:
                return param, kind, schema_regex(value)
            except ValueError as err:
                raise _bad(param, str(err)) from None
        if kind == "regex":
            if not isinstance(value, str):
                raise _bad(param, f"must be a pattern (a string), got {json.dumps(value)}")
            return param, kind, value
        try:
            return param, kind, check_choices(value, param)
        except ValueError as err:
            raise APIError(400, str(err), param=param) from None

    async def guide_set(self, guided: tuple[str, str, list[str] | str], params: SamplingParams) -> ChoiceSet | RegexSet:
        """``guided``'s choices or pattern made ready once per request, off the event loop (as
        every token's text, decoded at the first guided request: both take a moment when large).
        A pattern's set is kept for later requests with it (the last ``MAX_PATTERNS``, of at most
        ``MAX_KEPT_STATES`` automaton states in all)."""
        param, kind, value = guided
        if params.min_tokens:
            raise _bad("min_tokens", f"cannot be combined with a guided {kind} (it sets where the output ends)")
        if self._guide_texts is None:
            self._guide_texts = await asyncio.to_thread(TokenTexts, self.tokenizer, self.vocab)
        try:
            if kind == "choice":
                return await asyncio.to_thread(ChoiceSet, self._guide_texts, value, params.stop_token_ids)
            key = (kind, value, params.stop_token_ids)
            if key not in self._patterns:  # a schema's pattern is ours: bounded by its size alone
                limits = SCHEMA_LIMITS if kind == "json" else USER_LIMITS
                self._patterns[key] = await asyncio.to_thread(RegexSet, self._guide_texts, value,
                                                              params.stop_token_ids, limits)
                while len(self._patterns) > 1 and (len(self._patterns) > MAX_PATTERNS or sum(
                        regexes.pattern.size for regexes in self._patterns.values()) > MAX_KEPT_STATES):
                    self._patterns.popitem(last=False)
            self._patterns.move_to_end(key)
            return self._patterns[key]
        except ValueError as err:
            raise _bad(param, str(err)) from None

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise _bad(param, "must not be empty")
        limit = self.limits.max_prompt_tokens
        if len(ids) > limit:
            raise _bad(param, f"has {len(ids)} tokens, more than the limit of {limit}")
        if self.context is not None and len(ids) >= self.context:
            raise _bad(param, f"has {len(ids)} tokens, which leaves no room in the model's context of {self.context}")
        return ids

    def completion_prompts(self, body: dict) -> list[tuple[list[int], str]]:
        """Each prompt's token ids and text: ``prompt`` is a string, a list of token ids, or a list
        of either (a batch; ``prompt[i]`` names the bad one)."""
        prompt = body.get("prompt")
        special = body.get("add_special_tokens", True)  # the tokenizer's BOS, as vLLM adds it to completions
        if not isinstance(special, bool):
            raise _bad("add_special_tokens", f"must be true or false, got {json.dumps(special)}")

        def one(prompt, param: str) -> tuple[list[int], str]:
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt, add_special_tokens=special).input_ids if prompt else []
                return self.check_prompt(ids, param), prompt
            if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
                if any(not 0 <= t < self.vocab for t in prompt):
                    raise _bad(param, f"token ids must lie in [0, {self.vocab})")
                return self.check_prompt(list(prompt), param), self.tokenizer.decode(prompt, skip_special_tokens=True)
            raise _bad(param, f"must be a string or a list of token ids, got {json.dumps(prompt):.80}")

        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return [one(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        if isinstance(prompt, list) and not all(_is_int(t) for t in prompt):
            raise _bad("prompt", "must be a string, a list of token ids, or a list of either")
        return [one(prompt, "prompt")]

    def chat_prompt(self, body: dict) -> list[int]:
        return self.check_prompt(self.chat_tokens(body), "messages")

    def chat_tokens(self, body: dict, generation_prompt: bool = True) -> list[int]:
        """The token ids of ``messages`` in the chat template (with the assistant's turn opened),
        given the request's ``tools`` (``serve.tools``: earlier calls and their results too)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"{self.model_name}'s tokenizer has no chat template; use /v1/completions")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "must be a non-empty list of {role, content} objects")
        with _checked():
            tools = body["tools"] if check_tools(body) else None
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _bad(f"messages[{i}]", "must be an object with a string role")
            with _checked():
                extra = history_fields(message, f"messages[{i}]")
            content = message.get("content")
            if content is None and "tool_calls" in extra:  # (templates read it as text)
                content = ""
            if isinstance(content, list):  # content parts: only text
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise _bad(f"messages[{i}].content", "only text parts are supported")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content", "must be a string")
            clean.append({"role": message["role"], "content": content, **extra})
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            text = self.tokenizer.apply_chat_template(clean, tools=tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateSyntaxError:  # the server's template is broken: not the request's fault
            raise
        except TemplateError as err:  # (a template's raise_exception: "roles must alternate", ...)
            raise _bad("messages", f"the model's chat template refused them: {err}") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ generation
    def submit(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()

        def on_token(token, finish):  # engine thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(job.queue.put_nowait, (token, finish))

        request = Request(job.prompt, job.adapter, job.params, on_token, guide=job.guide)
        try:
            job.request = self.engine.submit(request)  # (set once queued: only queued requests are cancelled)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later",
                           headers={"Retry-After": str(self.limits.retry_after)}) from None
        except UnknownAdapter as err:  # unloaded since the check
            raise APIError(404, str(err), param="model", code="model_not_found") from None

    async def pieces(self, job: _Job, http: HTTPRequest | None):
        """Yield ``(text, logprobs)`` pieces until the request finishes (``job.finish`` says how):
        ``logprobs``, the ``TokenLogprobs`` of the tokens since the last piece (none unless the
        request asks for them). ``http`` given: poll it and cancel when the client has gone (a
        streamed response is cancelled by its server instead). Raises 504 past the request timeout."""
        loop = asyncio.get_running_loop()
        arrival = job.request.arrival
        deadline = loop.time() + self.limits.request_timeout
        detok = _Detokenizer(self.tokenizer, job.prompt, job.stops, job.special)
        label = job.adapter or self.model_name
        engine_done = False
        given = 0  # tokens whose log-probabilities went out with a piece
        next_poll = loop.time() + POLL_SECONDS
        try:
            while job.finish is None:
                now = loop.time()
                if now >= deadline:
                    job.finish = "timeout"
                    raise APIError(504, f"request timed out after {self.limits.request_timeout:g} s")
                if http is not None and now >= next_poll:
                    next_poll = now + POLL_SECONDS
                    if await http.is_disconnected():
                        job.finish = "cancelled"
                        break
                try:
                    token, finish = await asyncio.wait_for(job.queue.get(), min(POLL_SECONDS, deadline - now))
                except asyncio.TimeoutError:
                    continue
                if token is None:
                    engine_done, job.finish = True, finish
                    if finish == "error":
                        raise APIError(500, "the model failed on this request; the server log has the error")
                    piece = detok.flush()
                else:
                    if job.tokens == 0:
                        self.metrics.observe("bora_time_to_first_token_seconds", time.perf_counter() - arrival)
                    job.tokens += 1
                    piece, stopped = detok.add(token, check=job.tokens >= job.params.min_tokens)
                    if stopped:
                        job.finish = "stop"
                if piece or (job.finish is not None and job.tokens > given):
                    entries, given = job.request.logprobs[given:job.tokens], job.tokens  # (the engine's appends come first)
                    yield piece, entries
        finally:
            if not engine_done:  # a stop string, the timeout, or the client gone: leave the batch
                self.engine.cancel(job.request)
            job.finish = job.finish or "cancelled"
            self.metrics.inc("bora_requests_total", adapter=label, finish=job.finish)
            self.metrics.inc("bora_prompt_tokens_total", len(job.prompt), adapter=label)
            self.metrics.inc("bora_generation_tokens_total", job.tokens, adapter=label)
            self.metrics.observe("bora_request_latency_seconds", time.perf_counter() - arrival)

    # ------------------------------------------------------------------ adapters
    def inside_root(self, lora_path, param: str = "lora_path", missing: int = 400) -> Path:
        """The adapter folder ``lora_path`` names (relative paths are taken from the root), which
        must resolve inside the adapter root, through any ``..`` and symlinks, and so must every
        file in it. A path inside the root that is no folder gets status ``missing``."""
        if self.adapter_root is None:
            raise APIError(403, "loading adapters at run time is disabled: start the server with --adapter-root DIR")
        if not isinstance(lora_path, str) or not lora_path:
            raise _bad(param, "must be a non-empty string")
        try:
            folder = (self.adapter_root / lora_path).resolve()
        except (OSError, ValueError, RuntimeError):
            raise _bad(param, f"{lora_path!r} is not a usable path") from None
        outside = APIError(403, f"{param} {lora_path!r} is outside the adapter root", param=param)
        if not folder.is_relative_to(self.adapter_root):
            raise outside
        if not folder.is_dir():
            raise APIError(missing, f"{param}: {lora_path!r} is not a folder under the adapter root", param=param)
        if any(not entry.resolve().is_relative_to(self.adapter_root) for entry in folder.iterdir()):
            raise outside
        return folder

    # ------------------------------------------------------------------ the routes
    def error_response(self, err: APIError) -> JSONResponse:
        self.metrics.inc("bora_http_errors_total", status=err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def health(self) -> JSONResponse:
        alive = self.engine.is_running()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    def models(self) -> JSONResponse:
        card = {"object": "model", "created": self.created, "owned_by": "bora_kernels"}
        data = [{"id": self.model_name, **card, "root": self.model_name, "parent": None}]
        data += [{"id": name, **card, "root": self.adapter_root_of(name), "parent": self.model_name}
                 for name in self.adapter_names()]
        return JSONResponse({"object": "list", "data": data})

    def prometheus(self) -> PlainTextResponse:
        engine = self.engine
        counters = {"bora_engine_steps_total": engine.stats["steps"],
                    "bora_adapter_loads_total": engine.stats["adapter_loads"],
                    "bora_adapter_evictions_total": engine.stats["adapter_evictions"],
                    "bora_engine_step_sequences_total": engine.stats["step_sequences"],
                    "bora_engine_prefilled_tokens_total": engine.stats["prompt_tokens"],
                    "bora_engine_prefix_cache_hit_tokens_total": engine.stats["cached_prompt_tokens"]}
        gauges = {"bora_queue_depth": engine.queue_depth(), "bora_batch_size": engine.batch_size(),
                  "bora_adapters_loaded": len(engine.adapters),
                  "bora_prefix_cache_tokens": engine.prefix_cache.tokens if engine.prefix_cache else 0}
        return PlainTextResponse(self.metrics.render(counters, gauges), media_type="text/plain; version=0.0.4")

    def token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def completion_logprobs(self, entries: list[tuple[int, TokenLogprobs | None]], offset: int) -> dict:
        """The completions API's ``logprobs`` of these tokens (each with its entry; None for a
        prompt's first token), the text before them ``offset`` characters long. Each token's
        ``top_logprobs`` lists the most likely tokens and the token itself, as OpenAI's does."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in entries:
            text = self.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            top = None
            if entry is not None:
                top = {self.token_text(t): lp for t, lp in entry.top}
                top.setdefault(text, entry.logprob)
            out["top_logprobs"].append(top)
        return out

    def chat_logprobs(self, entries: list[TokenLogprobs]) -> dict:
        """Chat's ``logprobs``: each token's text, log-probability and UTF-8 bytes, and its
        ``top_logprobs`` (the most likely tokens, as many as asked for)."""
        def item(token, logprob):
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    async def generate(self, http: HTTPRequest, chat: bool, body: dict | None = None):
        """``/v1/completions`` (or ``/v1/chat/completions``): the whole response, or its events.
        Every prompt gets ``n`` choices (index ``prompt * n + j``; with a ``seed``, choice ``j``
        samples with ``seed + j``), each its own sequence in the engine's batch."""
        body = body if body is not None else await self.read_json(http)
        adapter = self.adapter_for(body)
        prompts = [(self.chat_prompt(body), None)] if chat else self.completion_prompts(body)
        n = self.choices(body, len(prompts))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream", "must be true or false")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise _bad("stream_options", "must be an object")
        guided, choices = self.guided_output(body), None
        with _checked():
            tools = tool_choice(body, check_tools(body), self.tool_parser) if chat else None
        if tools is not None:
            if guided is not None:
                raise _bad("tool_choice", f"cannot be combined with {guided[0]} (the tool calls are the output)")
            if tools.regex is not None:  # the calls are guided JSON
                guided = ("tool_choice", "json", tools.regex)
        jobs = []
        for i, (prompt, text) in enumerate(prompts):
            params, stops = self.sampling(body, len(prompt), None if chat else 16, chat)
            if guided and choices is None:  # (the stop tokens it depends on are the same for every prompt)
                choices = await self.guide_set(guided, params)
            for j in range(n):
                seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                jobs.append(_Job(prompt, adapter, seeded, stops, index=i * n + j, echo=text if body.get("echo") else None,
                                 guide=choices.guide() if choices else None, special=isinstance(tools, ParsedCalls)))
        await self.wait_reclaimed(adapter)
        self._pending[adapter] += 1  # its slot is not given away until these are queued (then they hold it)
        try:
            for attempt in (0, 1):
                try:
                    await self.ensure_loaded(adapter)
                    for job in jobs:
                        self.submit(job)
                    break
                except APIError as err:
                    for job in jobs:
                        if job.request is not None:
                            self.engine.cancel(job.request)
                    # (a load that chose its slot just before this request was counted: load it again)
                    if attempt or err.code != "model_not_found" or adapter not in self.registry or \
                            any(job.request is not None for job in jobs):
                        raise
        finally:
            self._pending[adapter] -= 1
            if not self._pending[adapter]:  # (so that ``in`` means some)
                del self._pending[adapter]
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body["model"]}
        scored = jobs[0].params.logprobs is not None

        def usage():
            prompt_tokens = sum(len(prompt) for prompt, _ in prompts)
            completion_tokens = sum(job.tokens for job in jobs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        def reason(job):
            return None if job.finish is None else "stop" if job.finish == "stop" else "length"

        def echoed(job) -> tuple[str, dict | None]:
            """The prompt's text and log-probabilities, before a completion's output."""
            if job.echo is None:
                return "", None
            entries = list(zip(job.prompt, job.request.prompt_logprobs or [None] * len(job.prompt)))
            return job.echo, self.completion_logprobs(entries, 0) if scored else None

        def completion_choice(job, text, entries, offset, finish):
            logprobs = self.completion_logprobs([(e.token, e) for e in entries], offset) if scored else None
            return {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

        def chat_choice(job, text, entries, finish):
            message, finish = ({"role": "assistant", "content": text}, finish) if tools is None else \
                tools.reply(text, finish)
            return {"index": job.index, "logprobs": self.chat_logprobs(entries) if scored else None,
                    "finish_reason": finish, "message": message}

        def chat_chunk(job, entries, finish, delta: dict):
            return {"index": job.index, "logprobs": self.chat_logprobs(entries) if scored else None,
                    "finish_reason": finish, "delta": delta}

        # a streamed tool choice's reader, and the log-probabilities it has not sent yet
        streams = {job.index: (tools.stream(), []) for job in jobs} if tools is not None else {}

        def tool_chunks(job, piece: str, entries: list, finish: str | None) -> list[dict]:
            """A streamed tool choice's chunks for a piece of its output (and, with ``finish``, its
            end); each carries the log-probabilities of the tokens since the last one."""
            stream, kept = streams[job.index]
            kept.extend(entries)
            deltas = stream.feed(piece) if piece else []
            if finish is not None:
                last, finish = stream.end(finish)
                deltas += last
            chunks = []
            for delta in deltas:
                chunks.append(chat_chunk(job, list(kept), None, delta))
                kept.clear()
            if finish is not None:
                chunks.append(chat_chunk(job, kept, finish, {}))
            return chunks

        if not stream:
            async def run(job):
                pieces = [(piece, entries) async for piece, entries in self.pieces(job, http)]
                text, entries = "".join(p for p, _ in pieces), [e for _, es in pieces for e in es]
                if chat:
                    return chat_choice(job, text, entries, reason(job))
                prefix, prompt_logprobs = echoed(job)
                choice = completion_choice(job, prefix + text, entries, len(prefix), reason(job))
                if prompt_logprobs is not None:
                    choice["logprobs"] = {k: prompt_logprobs[k] + choice["logprobs"][k] for k in prompt_logprobs}
                return choice

            choices = await _all([run(job) for job in jobs])
            if any(job.finish == "cancelled" for job in jobs):  # the client has gone; nobody reads this
                return JSONResponse({}, status_code=499)
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": choices, "usage": usage()})

        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra) -> str:
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

        async def events():
            out: asyncio.Queue = asyncio.Queue()

            async def run(job):
                try:
                    async for piece, entries in self.pieces(job, None):
                        out.put_nowait((job, piece, entries))
                    out.put_nowait((job, None, None))
                except APIError as err:  # the timeout, after the status line was sent
                    out.put_nowait((job, err, None))
                except Exception:  # never leave the stream waiting
                    logger.exception("streaming a choice failed")
                    out.put_nowait((job, APIError(500, "the server failed on this request"), None))

            tasks = [asyncio.ensure_future(run(job)) for job in jobs]
            sent = {}  # characters of each choice's text sent, from its first event
            try:
                if chat:
                    for job in jobs:
                        yield event([{"index": job.index, "logprobs": None, "finish_reason": None,
                                      "delta": {"role": "assistant", "content": ""} if tools is None else
                                      streams[job.index][0].first}])
                ended = 0
                while ended < len(jobs):
                    job, piece, entries = await out.get()
                    if isinstance(piece, APIError):
                        yield f"data: {json.dumps(piece.body())}\n\n"
                        break
                    if job.index not in sent:  # a completion's echo first: the engine has scored the prompt by now
                        prefix, prompt_logprobs = echoed(job)
                        sent[job.index] = len(prefix)
                        if job.echo is not None:
                            yield event([{"index": job.index, "text": prefix, "logprobs": prompt_logprobs,
                                          "finish_reason": None}])
                    finish = None if piece is not None else reason(job)
                    ended += finish is not None
                    piece = piece or ""
                    if chat and tools is not None:
                        for chunk in tool_chunks(job, piece, entries or [], finish):
                            yield event([chunk])
                    elif piece or finish is not None:
                        yield event([chat_chunk(job, entries or [], finish, {"content": piece} if finish is None else {})
                                     if chat else
                                     completion_choice(job, piece, entries or [], sent[job.index], finish)])
                    sent[job.index] += len(piece)
                else:
                    if options.get("include_usage"):
                        yield event([], usage=usage())
                yield "data: [DONE]\n\n"
            finally:  # the client gone, or done: every choice leaves the batch
                for task in tasks:
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def completions(self, http: HTTPRequest):
        return await self.generate(http, chat=False)

    async def chat_completions(self, http: HTTPRequest):
        return await self.generate(http, chat=True)

    async def tokenize(self, http: HTTPRequest) -> JSONResponse:
        """vLLM's ``/tokenize``: a ``prompt`` (with the tokenizer's special tokens unless
        ``add_special_tokens`` is false) or chat ``messages`` (``add_generation_prompt``, default
        true) to token ids; no length limit applies."""
        body = await self.read_json(http)
        flags = {}
        for name in ("add_special_tokens", "add_generation_prompt"):
            flags[name] = body.get(name, True)
            if not isinstance(flags[name], bool):
                raise _bad(name, f"must be true or false, got {json.dumps(flags[name])}")
        if "messages" in body:
            ids = self.chat_tokens(body, flags["add_generation_prompt"])
        elif isinstance(body.get("prompt"), str):
            ids = self.tokenizer(body["prompt"], add_special_tokens=flags["add_special_tokens"]).input_ids
        else:
            raise _bad("prompt", f"must be a string (or give chat messages), got {json.dumps(body.get('prompt')):.80}")
        return JSONResponse({"count": len(ids), "max_model_len": self.context, "tokens": ids})

    async def detokenize(self, http: HTTPRequest) -> JSONResponse:
        """vLLM's ``/detokenize``: ``tokens`` to their text (special tokens included)."""
        tokens = (await self.read_json(http)).get("tokens")
        if not (isinstance(tokens, list) and all(_is_int(t) and 0 <= t < self.vocab for t in tokens)):
            raise _bad("tokens", f"must be a list of token ids in [0, {self.vocab})")
        return JSONResponse({"prompt": self.tokenizer.decode(tokens)})

    def tokenizer_info(self) -> JSONResponse:
        """The tokenizer's special tokens, chat template and context (what a client needs to
        tokenize through ``/tokenize`` alone, as lm-eval's remote tokenizer does)."""
        tok = self.tokenizer
        return JSONResponse({"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                             "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                             "chat_template": getattr(tok, "chat_template", None), "model_max_length": self.context})

    async def load(self, http: HTTPRequest) -> JSONResponse:
        body = await self.read_json(http)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name or name == self.model_name:
            raise _bad("lora_name", f"must be a non-empty string other than the base model's name, got {json.dumps(name)}")
        folder = self.inside_root(body.get("lora_path"))
        if name in self.adapter_names():
            raise _bad("lora_name", f"adapter {name!r} is already loaded; unload it first")
        try:
            await asyncio.to_thread(self.engine.load_adapter, name, folder, None, self.registry, self._pending)
        except SlotsBusy:  # every slot's adapter is busy: it takes a slot at its first request
            pass
        except ValueError as err:
            raise APIError(400, str(err), param="lora_path") from None
        self.registry[name] = (folder, None)
        return JSONResponse({"status": "ok", "lora_name": name})

    async def unload(self, http: HTTPRequest) -> JSONResponse:
        body = await self.read_json(http)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise _bad("lora_name", f"must be a non-empty string, got {json.dumps(name)}")
        registered = self.registry.pop(name, None)  # no request loads it from now on
        try:
            await asyncio.to_thread(self.engine.unload_adapter, name, self.limits.request_timeout)
        except UnknownAdapter as err:
            if registered is None:
                raise APIError(404, str(err), param="lora_name", code="model_not_found") from None
        except TimeoutError as err:
            if registered is not None:
                self.registry[name] = registered
            raise APIError(504, str(err)) from None
        self.adapter_paths.pop(name, None)
        return JSONResponse({"status": "ok", "lora_name": name})


def create_app(server: Server) -> FastAPI:
    """The FastAPI app around ``server``: starts the engine with the app, finishes its work on
    shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.shutdown)

    app = FastAPI(title="bora-serve", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, lambda _, err: server.error_response(err))
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", server.tokenizer_info, methods=["GET"])
    app.add_api_route("/v1/load_lora_adapter", server.load, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", server.unload, methods=["POST"])
    return app
