"""``bora-serve`` on loopback with the demo model: greedy outputs over HTTP equal offline
``generate`` with each adapter alone (streamed or not, 8 adapters and the base mixed); the
OpenAI client works; bad input gets its status and the server keeps serving; hot loads only from
inside the adapter root; limits, timeouts, disconnects, metrics; SIGTERM finishes the work and
exits 0.

The server runs in this process (uvicorn in a thread) on the ops' torch path, except the SIGTERM
test, which starts ``python -m bora_kernels.serve`` as users do."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import bora_kernels as bk  # noqa: E402
from bora_kernels.bench.serve import free_port, wait_healthy  # noqa: E402
from bora_kernels.nn import NF4Linear, nf4_storage  # noqa: E402
from bora_kernels.ops import use_backend  # noqa: E402
from bora_kernels.serve import Engine, QueueFull, demo  # noqa: E402
from bora_kernels.serve.app import APIError, Limits, Server, create_app  # noqa: E402

ADAPTERS = demo.ADAPTERS
BASE = demo.MODEL_NAME


@pytest.fixture(scope="module")
def reference(serve_demo):
    model = transformers.AutoModelForCausalLM.from_pretrained(serve_demo / "base")
    return bk.load_peft_adapters(model, {n: serve_demo / "adapters" / n for n in ADAPTERS}).eval()


@pytest.fixture(scope="module")
def tokenizer(serve_demo):
    return transformers.AutoTokenizer.from_pretrained(serve_demo / "base")


@pytest.fixture(scope="module")
def root(serve_demo, tmp_path_factory):
    """The adapter root: two good adapters, a corrupt one, a mismatched one; beside it a folder
    outside the root, a symlink to it, and an adapter whose weights link out of the root."""
    top = tmp_path_factory.mktemp("serving")
    root, outside = top / "root", top / "outside"
    root.mkdir()
    shutil.copytree(serve_demo / "adapters" / "skip3", root / "late3")
    shutil.copytree(serve_demo / "adapters" / "skip5", root / "late5")
    shutil.copytree(serve_demo / "adapters" / "skip3", outside)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (root / "mismatched").mkdir()
    config = json.loads((outside / "adapter_config.json").read_text())
    (root / "mismatched" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    shutil.copy(outside / "adapter_model.safetensors", root / "mismatched")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "leaky").mkdir()
    shutil.copy(outside / "adapter_config.json", root / "leaky")
    (root / "leaky" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    return root


def start_uvicorn(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(serve_demo, root, tokenizer):
    """(base url, Server): the 8 demo adapters loaded, 2 slots free, hot loads from ``root``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(serve_demo / "base")
    engine = Engine(model, max_adapters=10, max_lora_rank=8, max_batch=8)
    for name in ADAPTERS:
        engine.load_adapter(name, serve_demo / "adapters" / name)
    server = Server(engine, tokenizer, BASE, adapter_root=root,
                    limits=Limits(max_prompt_tokens=64, max_tokens=300, max_body_bytes=4096))
    with use_backend("torch"):
        engine.start()
    uv, thread, url = start_uvicorn(create_app(server))
    yield url, server
    uv.should_exit = True
    thread.join(30)
    assert not engine.is_running()  # the lifespan shut the engine down


def offline(reference, tokenizer, prompt: str, adapter: str | None, max_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with bk.use_adapters(reference, [adapter]), use_backend("torch"):
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 min_new_tokens=max_tokens)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def complete(url, model, prompt, max_tokens, stream=False, chat=False, started=None, **extra):
    """(text, finish_reason, usage) of one request, streamed or not; ``started`` (an Event) is
    set when the first event has arrived."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"], r.json()["usage"]
    body["stream_options"] = {"include_usage": True}
    text, finish, usage = [], None, None
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if started is not None:
                    started.set()
    assert events[-1] == "[DONE]"
    for event in map(json.loads, events[:-1]):
        if not event["choices"]:
            usage = event["usage"]
            continue
        choice = event["choices"][0]
        text.append(choice["delta"].get("content") or "" if chat else choice["text"])
        finish = choice["finish_reason"] or finish
    return "".join(text), finish, usage


def test_greedy_equals_offline_generate_over_http(served, reference, tokenizer):
    """24 concurrent requests over 8 adapters and the base, prompts of 1 to 12 letters, streamed
    and not, completions and chat: each text equals ``generate`` with its adapter alone."""
    url, server = served
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(24):
        length = int(torch.randint(1, 13, (1,), generator=gen))
        prompt = "".join(demo.LETTERS[int(c)] for c in torch.randint(0, 26, (length,), generator=gen))
        adapter = BASE if i % 9 == 8 else ADAPTERS[i % 8]
        jobs.append((prompt, adapter, 4 + i % 9, i % 2 == 1, i % 3 == 2))
    steps_before = server.engine.stats["steps"], server.engine.stats["step_sequences"]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda j: complete(url, j[1], j[0], j[2], stream=j[3], chat=j[4]), jobs))
    for (prompt, adapter, max_tokens, stream, chat), (text, finish, usage) in zip(jobs, results):
        want = offline(reference, tokenizer, prompt, None if adapter == BASE else adapter, max_tokens)
        assert text == want, (adapter, prompt, stream, chat)
        assert finish == "length"
        assert usage == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                         "total_tokens": len(prompt) + max_tokens}
    steps = server.engine.stats["steps"] - steps_before[0]
    assert server.engine.stats["step_sequences"] - steps_before[1] > steps  # requests shared decode steps
    assert len({text for text, _, _ in results}) > 12  # the adapters answered differently


def on_demand_server(serve_demo, tokenizer, names: list[str], slots: int, **limits) -> Server:
    """A server of ``slots`` slots over the demo adapters ``names`` (registered; the first ones
    loaded), not started."""
    engine = Engine(transformers.AutoModelForCausalLM.from_pretrained(serve_demo / "base"), max_adapters=slots,
                    max_lora_rank=8, max_batch=8)
    for name in names[:slots]:
        engine.load_adapter(name, serve_demo / "adapters" / name)
    return Server(engine, tokenizer, BASE, adapter_root=serve_demo / "adapters",
                  registry={n: (serve_demo / "adapters" / n, None) for n in names},
                  limits=Limits(max_prompt_tokens=64, max_tokens=64, **limits))


@contextlib.contextmanager
def serving(server: Server):
    """``server``'s engine and HTTP app running (torch path); yields the base URL."""
    with use_backend("torch"):
        server.engine.start()
    uv, thread, url = start_uvicorn(create_app(server))
    try:
        yield url
    finally:
        uv.should_exit = True
        thread.join(30)


def test_more_adapters_than_slots_load_on_demand(serve_demo, reference, tokenizer):
    """3 slots and 6 registered adapters (the demo's skip1 to skip6, the first 3 loaded): 18
    concurrent requests over all 6 each equal ``generate`` with its adapter alone, while the
    slots take the adapters in turn (``/metrics`` counts the loads and evictions; an adapter
    with requests in flight keeps its slot). ``/v1/models`` lists all 6. A run-time load joins
    them; an unload of one that holds no slot forgets it, and its name then gets 404."""
    names = ADAPTERS[:6]
    server = on_demand_server(serve_demo, tokenizer, names, slots=3)
    engine = server.engine
    with serving(server) as url:
        jobs = [(names[(i * 5) % 6], "".join(demo.LETTERS[(i * 7 + j) % 26] for j in range(3 + i % 4)), 6 + i % 5)
                for i in range(18)]
        with concurrent.futures.ThreadPoolExecutor(18) as pool:
            results = list(pool.map(lambda j: complete(url, j[0], j[1], j[2], stream=j[2] % 2 == 0), jobs))
        for (adapter, prompt, max_tokens), (text, finish, _) in zip(jobs, results):
            assert (text, finish) == (offline(reference, tokenizer, prompt, adapter, max_tokens), "length"), adapter
        samples = dict(line.rsplit(" ", 1) for line in httpx.get(url + "/metrics").text.splitlines()
                       if not line.startswith("#"))
        loads, evictions = float(samples["bora_adapter_loads_total"]), float(samples["bora_adapter_evictions_total"])
        assert loads - 3 == evictions >= 3 and float(samples["bora_adapters_loaded"]) == 3
        listed = {card["id"] for card in httpx.get(url + "/v1/models").json()["data"]}
        assert listed == {BASE, *names}
        assert post(url, "/v1/load_lora_adapter", {"lora_name": "seven", "lora_path": "skip7"}).status_code == 200
        assert complete(url, "seven", "abc", 5)[0] == offline(reference, tokenizer, "abc", "skip7", 5)
        idle = next(n for n in names if n not in engine.adapters)
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": idle}).status_code == 200
        r = post(url, "/v1/completions", {"model": idle, "prompt": "abc"})
        assert r.status_code == 404 and idle not in {c["id"] for c in httpx.get(url + "/v1/models").json()["data"]}


def test_steady_traffic_cannot_starve_an_adapter_without_a_slot(serve_demo, reference, tokenizer, monkeypatch):
    """2 slots, both adapters busy without a pause (3 clients each, back to back): a request for
    a third adapter claims the least recently used one, which takes no new requests until its
    last one ends and gives up its slot; the third answers well within the request timeout (it
    would wait for ever otherwise), and every request of the steady traffic still succeeds."""
    names = ADAPTERS[:3]
    server = on_demand_server(serve_demo, tokenizer, names, slots=2, request_timeout=20)
    engine = server.engine
    decode = engine._decode  # slowed down: each request lasts far longer than a client's gap between two
    monkeypatch.setattr(engine, "_decode", lambda: (time.sleep(0.004), decode()))
    stop, statuses = threading.Event(), collections.Counter()

    def traffic(url, adapter, max_tokens):
        while not stop.is_set():
            statuses[post(url, "/v1/completions", {"model": adapter, "prompt": "abc", "max_tokens": max_tokens,
                                                   "temperature": 0}).status_code] += 1
    with serving(server) as url, contextlib.ExitStack() as clients_stop:
        clients = [threading.Thread(target=traffic, args=(url, name, 40 + 7 * k)) for name in names[:2] for k in range(3)]
        clients_stop.callback(lambda: (stop.set(), [client.join(60) for client in clients]))
        for client in clients:
            client.start()
        wait_for(lambda: sum(statuses.values()) >= 6)
        started = time.monotonic()
        text, finish, _ = complete(url, names[2], "abc", 6)
        waited = time.monotonic() - started
        assert (text, finish) == (offline(reference, tokenizer, "abc", names[2], 6), "length")
        assert waited < 10 and engine.stats["adapter_evictions"] >= 1
        served_before = statuses[200]
        wait_for(lambda: statuses[200] >= served_before + 6)  # and the traffic goes on
    assert set(statuses) == {200}, statuses


def test_stop_strings(served, reference, tokenizer):
    url, _ = served
    want = offline(reference, tokenizer, "abc", "skip1", 10)
    stop = want[3:5]
    for stream in (False, True):
        text, finish, usage = complete(url, "skip1", "abc", 10, stream=stream, stop=[stop, "#"])
        assert (text, finish) == (want[:3], "stop")
        assert usage["completion_tokens"] == 5  # the tokens generated, the stop string's included
    # min_tokens: a stop string counts only where it ends after the first min_tokens tokens' text
    # (the demo's tokens are letters: the stop ends with the 5th)
    for min_tokens, (text, finish) in ((4, (want[:3], "stop")), (5, (want[:3], "stop")), (6, (want, "length"))):
        assert complete(url, "skip1", "abc", 10, stop=[stop], min_tokens=min_tokens)[:2] == (text, finish), min_tokens


def test_logit_bias(served, tokenizer):
    """``logit_bias`` (token ids as JSON's string keys): +100 makes a token the only choice;
    bad keys and values get 400 naming the field."""
    url, _ = served
    z = tokenizer("z", add_special_tokens=False).input_ids[0]
    assert complete(url, "skip3", "abc", 6, logit_bias={str(z): 100})[0] == "zzzzzz"
    for bias, message in (({"x": 1}, "token ids (as strings)"), ({str(z): 101}, "numbers in [-100, 100]"),
                          ({"100000": 1}, "token ids must lie in"), ([z], "token ids (as strings)")):
        r = post(url, "/v1/completions", {"model": "skip3", "prompt": "abc", "logit_bias": bias})
        assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text
        assert message in r.json()["error"]["message"], r.text


def guided_generate(reference, tokenizer, adapter, prompt, guides, max_new_tokens) -> str:
    """``generate``'s greedy text when each step allows what a fresh guide of ``guides`` (a
    ``ChoiceSet`` or ``RegexSet``), walked along the output so far, allows."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids

    def allowed(batch, sofar):
        guide = guides.guide()
        for token in sofar[ids.shape[1]:].tolist():
            guide.advance(token)
        return torch.as_tensor(guide.allowed()).tolist()

    with bk.use_adapters(reference, [None if adapter == BASE else adapter]), use_backend("torch"):
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, prefix_allowed_tokens_fn=allowed)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_guided_choice(served, reference, tokenizer):
    """``guided_choice`` (or ``structured_outputs: {"choice": [...]}``): the text is one of the
    strings and ends with ``"stop"``. Greedy, it is what ``generate`` writes when each step allows
    the guide's tokens; sampled (``n`` choices), streamed, or in chat, always one of them. Bad
    lists, unwritable strings, ``min_tokens`` and other structured outputs get 400 naming the
    field."""
    from bora_kernels.serve.guided import ChoiceSet, TokenTexts

    url, server = served
    choices = ["yes", "no", "maybe so", "maybe", "abba"]
    texts = TokenTexts(tokenizer, server.vocab)
    answers, guides = set(), ChoiceSet(texts, choices, server.eos)
    for adapter, prompt in (("skip1", "abc"), ("skip2", "mmm"), ("skip4", "yes or no? "), (BASE, "ab")):
        want = guided_generate(reference, tokenizer, adapter, prompt, guides, 10)
        text, finish, _ = complete(url, adapter, prompt, 10, guided_choice=choices)
        assert text == want and text in choices and finish == "stop", (adapter, text, want)
        assert complete(url, adapter, prompt, 10, stream=True, structured_outputs={"choice": choices})[:2] == (text, "stop")
        answers.add(text)
    assert len(answers) > 1  # the adapters choose differently
    r = post(url, "/v1/completions", {"model": "skip3", "prompt": "abc", "n": 6, "temperature": 1.5, "seed": 5,
                                      "max_tokens": 10, "guided_choice": choices})
    assert r.status_code == 200 and all(c["text"] in choices and c["finish_reason"] == "stop" for c in r.json()["choices"])
    text, finish, _ = complete(url, "skip3", "pick one", 10, chat=True, guided_choice=["left", "right"])
    assert text in ("left", "right") and finish == "stop"
    for extra, param, message in (({"guided_choice": []}, "guided_choice", "non-empty strings"),
                                  ({"guided_choice": ["ok", 3]}, "guided_choice", "non-empty strings"),
                                  ({"guided_choice": ["ok", "\u20ac"]}, "guided_choice", "cannot be written"),
                                  ({"structured_outputs": {"grammar": "x"}}, "structured_outputs", "not supported"),
                                  ({"guided_choice": ["a"], "structured_outputs": {"choice": ["a"]}},
                                   "structured_outputs", "not several"),
                                  ({"guided_choice": ["ok"], "min_tokens": 1}, "min_tokens", "guided choice"),
                                  ({"guided_json": {"type": "object", "required": ["a"]}}, "guided_json",
                                   "must be listed in properties")):
        r = post(url, "/v1/completions", {"model": "skip3", "prompt": "abc", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert message in r.json()["error"]["message"], r.text


def test_guided_regex(served, reference, tokenizer):
    """``guided_regex`` (or ``structured_outputs: {"regex": ...}``): the text is a whole match of
    the pattern. Greedy, it is what ``generate`` writes when each step allows the guide's tokens,
    ending with ``"stop"`` where no longer text matches and at the model's end-of-text where one
    could; sampled (``n`` outputs), streamed, or in chat, always a match. A pattern it cannot
    read, or cannot write, and ``min_tokens`` get 400 naming the field."""
    from bora_kernels.serve.guided import RegexSet, TokenTexts

    url, server = served
    texts = TokenTexts(tokenizer, server.vocab)
    for regex, limit in ((r"(yes|no), [a-c]{2}\.", 12), (r"[a-e]{2,4}( [a-e]{2})?", 12), (r"\d{1,3}", 6)):
        python, answers, guides = re.compile(regex), set(), RegexSet(texts, regex, server.eos)
        for adapter, prompt in (("skip1", "abc"), ("skip2", "mmm"), ("skip4", "yes or no? "), (BASE, "ab")):
            want = guided_generate(reference, tokenizer, adapter, prompt, guides, limit)
            text, finish, _ = complete(url, adapter, prompt, limit, guided_regex=regex)
            assert text == want and python.fullmatch(text) and finish == "stop", (regex, adapter, text, want)
            streamed = complete(url, adapter, prompt, limit, stream=True, structured_outputs={"regex": regex})
            assert streamed[:2] == (text, "stop")
            answers.add(text)
        assert len(answers) > 1, (regex, answers)  # the adapters write different matches
        r = post(url, "/v1/completions", {"model": "skip3", "prompt": "abc", "n": 6, "temperature": 1.5, "seed": 5,
                                          "max_tokens": limit, "guided_regex": regex})
        assert r.status_code == 200 and all(python.fullmatch(c["text"]) and c["finish_reason"] == "stop"
                                            for c in r.json()["choices"]), r.text
    text, finish, _ = complete(url, "skip3", "pick", 10, chat=True, guided_regex="(left|right)!")
    assert text in ("left!", "right!") and finish == "stop"
    for extra, param, message in (({"guided_regex": "(ab"}, "guided_regex", "missing ')'"),
                                  ({"guided_regex": 3}, "guided_regex", "must be a pattern"),
                                  ({"guided_regex": ["a"]}, "guided_regex", "must be a pattern"),
                                  ({"guided_regex": ""}, "guided_regex", "non-empty string"),
                                  ({"structured_outputs": {"regex": {"a": 1}}}, "structured_outputs", "must be a pattern"),
                                  ({"guided_regex": "\u20ac+"}, "guided_regex", "can be written"),
                                  ({"structured_outputs": {"regex": "a(?=b)"}}, "structured_outputs", "look-arounds"),
                                  ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
                                   "not supported"),
                                  ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_regex", "not several"),
                                  ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", "guided regex")):
        r = post(url, "/v1/completions", {"model": "skip3", "prompt": "abc", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert message in r.json()["error"]["message"], r.text


def test_guided_json(served):
    """``guided_json`` (or ``structured_outputs: {"json": ...}``, or OpenAI's ``response_format``
    with a ``json_schema``): the text is JSON that the schema accepts, on every adapter, greedy,
    sampled, streamed and in chat; a schema with a keyword it cannot keep to gets 400 naming the
    keyword. (The demo's tokenizer has no braces or brackets, so the schema is of a scalar, and
    ``response_format: {"type": "json_object"}`` gets 400 for the tokenizer;
    test_serve_json_schema.py checks objects and arrays, test_serve_guided.py free-form ones.)"""
    url, _ = served
    schema = {"anyOf": [{"type": "string", "maxLength": 4}, {"$ref": "#/$defs/digit"}, {"type": "boolean"},
                        {"type": "number", "minimum": 5.5, "exclusiveMaximum": 7.25}],
              "$defs": {"digit": {"enum": [0, 1, 2]}}}

    def check(text):
        value = json.loads(text)
        assert (isinstance(value, str) and len(value) <= 4) or value in (0, 1, 2, True, False) \
            or (type(value) in (int, float) and 5.5 <= value < 7.25), text

    texts = set()
    for adapter in ("skip1", "skip2", "skip4", BASE):
        text, finish, _ = complete(url, adapter, "json: ", 60, guided_json=schema)
        check(text)
        assert finish == "stop" and text == complete(url, adapter, "json: ", 60, stream=True,
                                                     structured_outputs={"json": schema})[0]
        texts.add(text)
    assert len(texts) > 1, texts  # the adapters write different values
    format_ = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    text, finish, _ = complete(url, "skip3", "answer", 60, chat=True, response_format=format_)
    check(text)
    r = post(url, "/v1/completions", {"model": "skip3", "prompt": "abc", "n": 4, "temperature": 1.5, "seed": 5,
                                      "max_tokens": 60, "guided_json": json.dumps(schema)})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        check(choice["text"])
    for extra, param, message in (
            ({"guided_json": {"type": "number", "multipleOf": 0.5}}, "guided_json", "'multipleOf' not supported"),
            ({"guided_json": {"type": "object", "required": ["a"]}}, "guided_json", "must be listed in properties"),
            ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
            ({"structured_outputs": {"json": {"type": "string", "format": "ipv6"}}}, "structured_outputs", "format"),
            ({"guided_json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "guided_json", "oneOf"),
            ({"response_format": {"type": "json_object"}}, "response_format", "can be written with this tokenizer"),
            ({"response_format": {"type": "json_xml"}}, "response_format", "not supported"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
             "not supported"),
            ({"guided_json": {"type": "boolean"}, "response_format": format_}, "response_format", "not several")):
        r = post(url, "/v1/completions", {"model": "skip3", "prompt": "abc", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert message in r.json()["error"]["message"], r.text


# the demo's characters with four rare ones traded for JSON's brackets (the model is the demo's)
BRACED = demo.CHARS.replace("(", "{").replace(")", "}").replace(";", "[").replace("!", "]")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
SCHEMAS = {"weather": WEATHER, "now": {"type": "object", "additionalProperties": False}}
# a template that shows the tools and the calls and results of earlier turns
TOOL_TEMPLATE = ("{% for t in tools or [] %}{{ t.function.name }}: {% endfor %}{% for m in messages %}"
                 "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"
                 "{{ m.content }}{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}. {% endfor %}")


def streamed_tool_calls(url, body) -> tuple[list[dict], str | None, str]:
    """A streamed chat's tool calls put together from their deltas (by index: id and name once,
    arguments in pieces), its finish reason and its content."""
    calls, finish, content = {}, None, ""
    for event in stream_events(url, "/v1/chat/completions", body):
        choice = event["choices"][0]
        finish = choice["finish_reason"] or finish
        content += choice["delta"].get("content") or ""
        for part in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"arguments": ""})
            if "id" in part:
                assert "id" not in call and part["type"] == "function"
                call.update(id=part["id"], name=part["function"]["name"])
            call["arguments"] += part["function"]["arguments"]
    return [calls[i] for i in sorted(calls)], finish, content


def test_tool_calls(serve_demo, reference):
    """OpenAI's ``tools`` with ``tool_choice`` a named function or "required": the calls are
    guided JSON, each tool's arguments valid for its schema; a named call's greedy arguments are
    what ``generate`` writes when each step allows the guide's tokens; streamed, the deltas add up
    to the same calls, a list's arguments as they are written; sampled, ``parallel_tool_calls:
    false`` makes one call. Cut short, the calls begun come back as written (a list cut before
    its first call's name, as content), streamed or not. ``"none"`` writes text;
    the tools and earlier calls and results reach the chat template; the OpenAI client reads the
    calls; ``"auto"`` and bad tools get 400 naming the field. (A tokenizer with brackets: the
    demo's has none.)"""
    from bora_kernels.serve.guided import RegexSet, TokenTexts
    from bora_kernels.serve.tools import _ListReader, check_tools, tool_choice

    jsonschema = pytest.importorskip("jsonschema")
    arguments = r'{"a": "x}\"{", "d": "y\\", "b": [1, {"c": ["]"]}]}'  # (escaped quotes and backslashes)
    text = '[{"name": "w", "parameters": ' + arguments + '}, {"name": "now", "parameters": {}}]'
    for size in (1, 3, len(text)):  # a list read in pieces: brackets inside strings do not count
        reader = _ListReader()
        for i in range(0, len(text), size):
            reader.feed(text[i:i + size])
        assert reader.calls == [["w", arguments, True], ["now", "{}", True]]
    tokenizer = demo.char_tokenizer(BRACED)
    tokenizer.chat_template = TOOL_TEMPLATE
    engine = Engine(transformers.AutoModelForCausalLM.from_pretrained(serve_demo / "base"), max_adapters=3,
                    max_lora_rank=8, max_batch=8)
    for name in ADAPTERS[:3]:
        engine.load_adapter(name, serve_demo / "adapters" / name)
    server = Server(engine, tokenizer, BASE, limits=Limits(max_prompt_tokens=200, max_tokens=150))
    chat = {"messages": [{"role": "user", "content": "weather in paris?"}], "tools": TOOLS, "temperature": 0,
            "max_tokens": 150}
    named = {**chat, "tool_choice": {"type": "function", "function": {"name": "weather"}}}
    with serving(server) as url:
        prompt = tokenizer.decode(server.chat_prompt(chat))
        assert prompt == "weather: now: weather in paris?. "
        guides = RegexSet(TokenTexts(tokenizer, server.vocab), tool_choice(named, check_tools(named)).regex, server.eos)
        written = set()
        for adapter in ("skip1", "skip2", BASE):
            choice = post(url, "/v1/chat/completions", {**named, "model": adapter}).json()["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None, choice
            (call,) = choice["message"]["tool_calls"]
            assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "weather"
            arguments = call["function"]["arguments"]
            jsonschema.validate(json.loads(arguments), WEATHER)
            assert arguments == guided_generate(reference, tokenizer, adapter, prompt, guides, 150)
            (streamed,), finish, content = streamed_tool_calls(url, {**named, "model": adapter})
            assert (streamed["name"], streamed["arguments"], finish, content) == ("weather", arguments, "stop", "")
            written.add(arguments)
        assert len(written) > 1, written  # the adapters write different arguments

        required = {**chat, "model": "skip2", "tool_choice": "required"}
        greedy = post(url, "/v1/chat/completions", required).json()
        length, greedy = greedy["usage"]["completion_tokens"], greedy["choices"][0]
        calls, finish, content = streamed_tool_calls(url, required)
        assert greedy["finish_reason"] == finish == "tool_calls" and content == "", greedy
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in greedy["message"]["tool_calls"]] == \
            [(c["name"], c["arguments"]) for c in calls]
        parts = [e for e in stream_events(url, "/v1/chat/completions", required) if e["choices"][0]["delta"].get("tool_calls")]
        assert len(parts) > 2 * len(calls)  # each call's arguments went out as they were written
        for parallel in (True, False):
            r = post(url, "/v1/chat/completions", {**required, "n": 6, "temperature": 1.5, "seed": 3,
                                                   "parallel_tool_calls": parallel})
            for choice in r.json()["choices"]:
                calls = choice["message"]["tool_calls"]
                assert choice["finish_reason"] == "tool_calls" and (len(calls) >= 1 if parallel else len(calls) == 1)
                for call in calls:
                    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])

        short = post(url, "/v1/chat/completions", {**named, "model": "skip1", "max_tokens": 5}).json()["choices"][0]
        assert short["finish_reason"] == "length" and len(short["message"]["tool_calls"][0]["function"]["arguments"]) == 5
        short = post(url, "/v1/chat/completions", {**required, "max_tokens": 5}).json()["choices"][0]
        assert short["finish_reason"] == "length" and short["message"] == {"role": "assistant", "content": '[{"na'}
        assert streamed_tool_calls(url, {**required, "max_tokens": 5}) == ([], "length", '[{"na')
        cut = {**required, "max_tokens": length - 2}  # (the list's last call begun, not closed)
        short = post(url, "/v1/chat/completions", cut).json()["choices"][0]
        calls, finish, _ = streamed_tool_calls(url, cut)
        assert short["finish_reason"] == finish == "length" and short["message"]["content"] is None
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in short["message"]["tool_calls"]] == \
            [(c["name"], c["arguments"]) for c in calls] and calls
        free = post(url, "/v1/chat/completions", {**chat, "model": "skip1", "tool_choice": "none", "max_tokens": 6})
        assert free.json()["choices"][0]["finish_reason"] == "length"
        assert len(free.json()["choices"][0]["message"]["content"]) == 6

        history = [{"role": "user", "content": "weather in paris?"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call1", "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "paris", "unit": "c"}'}}]},
                   {"role": "tool", "tool_call_id": "call1", "content": "sunny"}]
        ids = post(url, "/tokenize", {"messages": history, "tools": TOOLS, "add_generation_prompt": False}).json()["tokens"]
        assert tokenizer.decode(ids) == 'weather: now: weather in paris?. weather{"city": "paris", "unit": "c"}. sunny call1. '

        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(model="skip1", messages=history, tools=TOOLS, tool_choice="required",
                                               max_tokens=150, temperature=0)
        assert reply.choices[0].finish_reason == "tool_calls"
        for call in reply.choices[0].message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])

        for extra, param, message in (
                ({}, "tool_choice", '"auto" (the default with tools) needs a parser'),
                ({"tool_choice": "auto"}, "tool_choice", "--tool-call-parser hermes"),
                ({"tool_choice": {"type": "function", "function": {"name": "rain"}}}, "tool_choice",
                 "'rain', which is not in tools (they are weather, now)"),
                ({"tool_choice": {"type": "function", "name": "now"}}, "tool_choice", "must be"),
                ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
                ({"tool_choice": "required", "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
                ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0]", "must be"),
                ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools[2].function.name", "listed twice"),
                ({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"},
                 "tools[0].function.name", "letters, digits"),
                ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}],
                  "tool_choice": "required"}, "tools[0].function.parameters", '"type": "object"'),
                ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": {
                    "type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}}}],
                  "tool_choice": "required"}, "tools[1].function.parameters", "multipleOf"),
                ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {
                    "anyOf": [{"type": "object", "properties": {}}, {"type": "string"}]}}}], "tool_choice": "required"},
                 "tools[0].function.parameters", "must describe an object"),
                ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
                 "cannot be combined with response_format"),
                ({"tool_choice": "none", "messages": history[:1] + [{**history[1], "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": "{no"}}]}]},
                 "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
                ({"tool_choice": "none", "messages": [{"role": "tool", "content": "sunny"}]}, "messages[0].tool_call_id",
                 "needs the id"),
                ({"tool_choice": "none", "messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
                 "messages[0].tool_calls", "in an assistant message")):
            r = post(url, "/v1/chat/completions", {**chat, "model": "skip1", **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
            assert message in r.json()["error"]["message"], r.text
        for extra in ({"tools": TOOLS}, {"tool_choice": "required"}):
            r = post(url, "/v1/completions", {"model": "skip1", "prompt": "abc", **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(extra)), r.text


TAGS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<|python_start|>",
        "<|python_end|>"]  # special tokens of the parsers' tokenizer
_WEATHER_CALL = '"name": "weather", "{}": {{"city": "paris", "unit": "c"}}'
# each parser: (outputs that call weather and now, each with the content beside the calls),
# (outputs that are text: no calls, or calls that do not parse), (texts streamed a character at a
# time, and the content that goes out before the output ends)
PARSED = {
    "hermes": ((("sure. ", TAGS[0], "{" + _WEATHER_CALL.format("arguments") + "}", TAGS[1], TAGS[0],
                 '{"name": "now", "arguments": {}}', TAGS[1]), "sure. "),
               (("sure. ", "<tool_call>{" + _WEATHER_CALL.format("arguments") + "}</tool_call>\n<tool_call>",
                 '{"name": "now"}</tool_call>'), "sure. ")),
    "llama3_json": (((TAGS[2], "{" + _WEATHER_CALL.format("parameters") + "}; ", '{"name": "now", "parameters": {}}'), None),
                    ((" {" + _WEATHER_CALL.format("parameters") + "};", '{"name": "now", "arguments": {}}'), None)),
    "mistral": ((("sure. ", TAGS[3], "[{" + _WEATHER_CALL.format("arguments") + '}, {"name": "now", "arguments": {}}] '),
                 "sure. "),
                ((TAGS[3], "weather", TAGS[4], '{"city": "paris", "unit": "c"}', TAGS[3], "now", TAGS[4], "{}"), None)),
    "pythonic": ((('[weather(city="paris", unit="c"), now()]',), None),
                 ((TAGS[5], "[weather(city='paris', unit='c'), now()]", TAGS[6]), None)),
}
PARSED_TEXTS = {
    "hermes": (("no calls <tool",), ("x", TAGS[0], '{"name": '), ("x", TAGS[0], '{"name": "now", "arguments": "no"}', TAGS[1])),
    "llama3_json": (("hello {",), ('{"name": "weather"',), ('{"answer": 1}',), ('{"name": "now", "parameters": {}} and',)),
    "mistral": (("a [list]",), ("x", TAGS[3], '[{"name": '), ("x", TAGS[3], "now", TAGS[4], '"no"'),
                ("x", TAGS[3], "now"), ("x", TAGS[3], "[]"), ("x", TAGS[3], "now", TAGS[4], "{} and")),
    "pythonic": (("a [now()]",), ("[now(1)]",), ('[now(x=a)]',), ("[now()] and",), ("[]",), ('[weather(city="paris"',),
                 ("[now(x=1, x=2)]",), ("[x.now()]",)),
}
PARSED_STREAMS = {"hermes": (("sure. <tool_call>{}</tool_call>", "sure. "), ("no calls <tool", "no calls ")),
                  "llama3_json": ((' {"name": "now", "parameters": {}}', ""), (" <|python_tag|>{}", ""), (" hi {", " hi {")),
                  "mistral": (("sure. [TOOL_CALLS][]", "sure. "), ("no calls [TOOL", "no calls "), ("a [b]", "a [b]")),
                  "pythonic": ((" [now()]", ""), (" <|python_st", ""), ("hi [now()]", "hi [now()]"))}


@pytest.mark.parametrize("parser", list(PARSED))
def test_auto_tool_calls_read_by_a_parser(serve_demo, monkeypatch, parser):
    """``tool_parser`` (``--tool-call-parser``): with ``tool_choice`` "auto" (or none given) the
    model writes freely, and the calls it writes in the parser's format come back as calls
    (``hermes``: ``<tool_call>`` blocks, the text before them as content; ``llama3_json``: an
    output of ``{"name", "parameters"}`` objects; ``mistral``: ``[TOOL_CALLS]`` and a JSON list or
    ``name[ARGS]{...}`` calls; ``pythonic``: an output that is a Python list of calls with
    literal keyword arguments), whether the tags are special tokens (their
    text is kept) or written in characters; streamed, that content goes out as written, never a
    piece of what may be a call, and the calls at the end. Output without calls, or with some that
    do not parse (or whose arguments are not an object), is content. (The outputs are scripted:
    the demo model writes no tool calls.)"""
    from bora_kernels.serve.tools import TOOL_PARSERS

    chars = [c for c in BRACED.translate(str.maketrans("GHIJLOPQ", "<>_/;()=")) if c not in "EFKMNRS"] + TAGS  # (the same size)
    tokenizer = demo.char_tokenizer(chars)
    tokenizer.add_special_tokens({"additional_special_tokens": TAGS})
    assert len(tokenizer) == len(demo.SPECIALS) + len(demo.CHARS) and tokenizer.decode(tokenizer.convert_tokens_to_ids(TAGS),
                                                                                        skip_special_tokens=True) == ""
    tokenizer.chat_template = TOOL_TEMPLATE
    with pytest.raises(ValueError, match="tool_parser: 'xml' is not one of hermes, llama3_json, mistral, pythonic"):
        Server(None, tokenizer, BASE, tool_parser="xml")
    engine = Engine(transformers.AutoModelForCausalLM.from_pretrained(serve_demo / "base"), max_adapters=1,
                    max_lora_rank=8, max_batch=8)
    server = Server(engine, tokenizer, BASE, limits=Limits(max_prompt_tokens=200, max_tokens=150), tool_parser=parser)
    script = []  # the token ids every output writes, then its end

    def scripted(seqs, logits):
        return torch.tensor([script[s.generated] if s.generated < len(script) else server.eos[0] for s in seqs])

    def write(*parts):
        script[:] = tokenizer.convert_tokens_to_ids([t for part in parts for t in ([part] if part in TAGS else part)])
        return "".join(parts)

    monkeypatch.setattr(engine, "_draw", scripted)
    reader = TOOL_PARSERS[parser]()
    for text, shown in PARSED_STREAMS[parser]:  # streamed a character at a time
        stream = reader.stream()
        assert "".join(d.get("content", "") for c in text for d in stream.feed(c)) == shown
    read = []  # each streamed character is read a bounded number of times (not the whole text at every piece)
    monkeypatch.setattr(reader, "shown", lambda held, first, shown=reader.shown: read.append(len(held)) or shown(held, first))
    for text in ("x" * 3000, PARSED[parser][0][0][-1] * 20):
        stream, read[:] = reader.stream(), []
        for c in text:
            stream.feed(c)
        assert sum(read) <= 16 * len(text), (len(text), sum(read))
    if parser == "mistral":  # newer Mistral tokenizers put a call id between the name and its arguments
        calls = reader.calls("[TOOL_CALLS]now[CALL_ID]a1B2c3D4e[ARGS]{}")
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("now", "{}")]
    if parser == "pythonic":  # Python's literals become JSON; what is not a JSON value is not a call
        calls = reader.calls("[now(a=[1, -2.5, (3, 4)], b={'k': None}, c=True, d=false, e='é')]")
        assert json.loads(calls[0]["function"]["arguments"]) == {"a": [1, -2.5, [3, 4]], "b": {"k": None}, "c": True,
                                                                 "d": False, "e": "é"}
        assert '"é"' in calls[0]["function"]["arguments"]
        for text in ("[now(a=1e999)]", "[now(a={1: 2})]", "[now(a={1, 2})]", "[now(a=b'x')]", "[now(a=1j)]",
                     "[now(a=f())]", "[now(**a)]", "[now(a=[" * 300 + "]" * 300 + ")]"):
            assert reader.calls(text) is None, text
    want = [("weather", '{"city": "paris", "unit": "c"}'), ("now", "{}")]
    body = {"model": BASE, "messages": [{"role": "user", "content": "weather in paris?"}], "tools": TOOLS,
            "temperature": 0, "max_tokens": 150}
    with serving(server) as url:
        for parts, content in PARSED[parser]:
            write(*parts)
            for extra in ({}, {"tool_choice": "auto"}):
                choice = post(url, "/v1/chat/completions", {**body, **extra}).json()["choices"][0]
                assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == content, choice
                assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == want
            pieces = [e["choices"][0]["delta"].get("content") for e in stream_events(url, "/v1/chat/completions", body)]
            assert "".join(p or "" for p in pieces) == (content or "") and not any("{" in (p or "") for p in pieces)
            calls, finish, streamed = streamed_tool_calls(url, body)
            assert [(c["name"], c["arguments"]) for c in calls] == want and finish == "tool_calls"
            assert streamed == (content or "")
        for parts in PARSED_TEXTS[parser]:
            text = write(*parts)
            choice = post(url, "/v1/chat/completions", body).json()["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == "stop"
            assert streamed_tool_calls(url, body) == ([], "stop", text)


def test_detokenizer_pieces_equal_the_whole_decode(monkeypatch):
    """With a byte-level BPE (leading spaces folded into tokens, characters split over byte
    tokens) and a window of 3 tokens, so the settled text rolls over many times: the streamed
    pieces add up to the decode of the whole output, no piece holds half a character, and a stop
    string cuts the text where it starts."""
    from conftest import byte_level_bpe

    from bora_kernels.serve.app import _Detokenizer

    corpus = ["the cat sat on the mat", "héllo wörld, ça va?", "naïve café 🙂 über straße"] * 20
    tok = byte_level_bpe(corpus, 300)
    monkeypatch.setattr(_Detokenizer, "WINDOW", 3)
    prompt = tok("say:", add_special_tokens=False).input_ids
    text = " the naïve café 🙂 says héllo wörld über straße"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 3 * _Detokenizer.WINDOW and tok.decode(prompt + ids) == "say:" + text
    for stops, want in (([], text), (["über"], text[:text.index("über")]), (["🙂 s", "zz"], text[:text.index("🙂")])):
        detok, pieces = _Detokenizer(tok, prompt, stops), []
        for token in ids:
            piece, stopped = detok.add(token)
            pieces.append(piece)
            if stopped:
                break
        else:
            pieces.append(detok.flush())
        assert "".join(pieces) == want
        assert not any("\ufffd" in piece for piece in pieces)


def test_openai_client(served, reference, tokenizer):
    openai = pytest.importorskip("openai")
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [BASE] + ADAPTERS
    reply = client.completions.create(model="skip2", prompt="hello", max_tokens=7, temperature=0)
    assert reply.choices[0].text == offline(reference, tokenizer, "hello", "skip2", 7)
    assert reply.usage.completion_tokens == 7
    chunks = client.chat.completions.create(model="skip6", messages=[{"role": "user", "content": "xyz"}],
                                            max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline(reference, tokenizer, "xyz", "skip6", 6)
    scored = client.completions.create(model="skip2", prompt=["hello", "abc"], max_tokens=3, temperature=0, n=2,
                                       logprobs=2, echo=True)
    assert [c.index for c in scored.choices] == [0, 1, 2, 3]
    assert scored.choices[2].text == "abc" + offline(reference, tokenizer, "abc", "skip2", 3)
    assert scored.choices[2].logprobs.token_logprobs[0] is None and len(scored.choices[2].logprobs.tokens) == 6
    chat = client.chat.completions.create(model="skip6", messages=[{"role": "user", "content": "xyz"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=1)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert [c.top_logprobs[0].token for c in content] == [c.token for c in content]  # greedy
    with pytest.raises(openai.NotFoundError, match="available: .*skip8"):
        client.completions.create(model="skip9", prompt="abc")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="skip1", prompt="abc", max_tokens=100000)


def scored(reference, ids: list[int], adapter: str | None) -> torch.Tensor:
    """The adapter's log-softmax at every position of ``ids``, in float64."""
    with bk.use_adapters(reference, [adapter]), use_backend("torch"), torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_echo_and_logprobs_score_prompts_as_lm_eval_asks(served, reference, tokenizer):
    """lm-eval's loglikelihood request (a batch of tokenized prompts, ``echo``, ``max_tokens`` 1,
    ``logprobs`` 1, greedy): one choice per prompt in order, the prompt's text then the output's,
    a log-probability per token (None for the first) equal to the adapter's log-softmax, and each
    ``top_logprobs`` holding the most likely token and the token itself; ``max_tokens`` 0 scores
    the prompt alone. Output tokens' log-probabilities and ``text_offset`` agree with the text."""
    url, _ = served
    prompts = [tokenizer("the cat", add_special_tokens=False).input_ids, tokenizer("xyz", add_special_tokens=False).input_ids]
    for max_tokens in (1, 0, 4):
        r = post(url, "/v1/completions", {"model": "skip3", "prompt": prompts, "echo": True, "max_tokens": max_tokens,
                                          "logprobs": 1, "temperature": 0, "seed": 1234})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1]
        for prompt, choice in zip(prompts, choices):
            logprobs = choice["logprobs"]
            ids = prompt + tokenizer(choice["text"][len(tokenizer.decode(prompt)):], add_special_tokens=False).input_ids
            assert choice["text"].startswith(tokenizer.decode(prompt))
            assert len(ids) == len(prompt) + max_tokens == len(logprobs["token_logprobs"])
            want = scored(reference, ids, "skip3")
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            assert logprobs["token_logprobs"][1:] == pytest.approx([float(want[i, t]) for i, t in enumerate(ids[1:])],
                                                                   abs=1e-4)
            assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids]
            assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(ids))]
            for i, top in enumerate(logprobs["top_logprobs"][1:]):
                best = int(want[i].argmax())
                assert top[tokenizer.decode([best])] == pytest.approx(float(want[i, best]), abs=1e-4)
                assert top[logprobs["tokens"][i + 1]] == logprobs["token_logprobs"][i + 1]
            for i in range(len(prompt), len(ids)):  # greedy output: each its position's most likely token
                assert logprobs["token_logprobs"][i] == pytest.approx(max(logprobs["top_logprobs"][i].values()))
    # without echo, the output's tokens alone; streamed, the same pieces
    body = {"model": "skip5", "prompt": "abc", "max_tokens": 5, "logprobs": 2, "temperature": 0}
    whole = post(url, "/v1/completions", body).json()["choices"][0]
    assert len(whole["logprobs"]["tokens"]) == 5 and "".join(whole["logprobs"]["tokens"]) == whole["text"]
    assert all(len(top) in (2, 3) for top in whole["logprobs"]["top_logprobs"])
    events = stream_events(url, "/v1/completions", {**body, "echo": True})
    assert events[0]["choices"][0]["text"] == "abc" and events[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    pieces = [e["choices"][0] for e in events[1:]]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    # (the echoed prefill computes every position's logits, the other the last one's: another
    # matmul shape, so the first token's may differ in float rounding)
    assert [lp for p in pieces for lp in p["logprobs"]["token_logprobs"]] == pytest.approx(
        whole["logprobs"]["token_logprobs"], abs=1e-5)
    assert [p["finish_reason"] for p in pieces][-1] == "length" and not any(p["finish_reason"] for p in pieces[:-1])


def stream_events(url, path, body) -> list[dict]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_n_choices_and_prompt_batches(served, reference, tokenizer):
    """``n`` choices per prompt and several prompts per request, each its own sequence: index
    ``prompt * n + j``, greedy ones equal to ``generate``, seeded ones repeatable and choice ``j``
    equal to a lone request with ``seed + j``; streamed, each choice's pieces add up to the
    whole text and it finishes once; usage counts every prompt and choice."""
    url, _ = served
    body = {"model": "skip2", "prompt": ["ab", "klm"], "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}
    first, again = (post(url, "/v1/completions", body).json() for _ in range(2))
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == list(range(6)) and texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) > 2  # the samples differ
    for j in range(3):
        alone = post(url, "/v1/completions", {**body, "prompt": "klm", "n": 1, "seed": 7 + j}).json()["choices"][0]
        assert alone["text"] == texts[3 + j]
    assert first["usage"] == {"prompt_tokens": 5, "completion_tokens": 36, "total_tokens": 41}
    greedy = {**body, "temperature": 0, "n": 2}
    choices = post(url, "/v1/completions", greedy).json()["choices"]
    assert [c["text"] for c in choices] == [offline(reference, tokenizer, p, "skip2", 6) for p in ("ab", "ab", "klm", "klm")]
    for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab"}]})):
        request = {**body, **extra, "stream_options": {"include_usage": True}}
        if extra:
            del request["prompt"]
        whole = post(url, path, request).json()
        events = stream_events(url, path, request)
        texts, finishes = collections.defaultdict(str), collections.Counter()
        for event in events[:-1]:
            for choice in event["choices"]:
                texts[choice["index"]] += (choice["delta"].get("content") or "") if extra else choice["text"]
                finishes[choice["index"]] += choice["finish_reason"] is not None
        want = {c["index"]: c["message"]["content"] if extra else c["text"] for c in whole["choices"]}
        assert dict(texts) == want and set(finishes.values()) == {1}
        assert events[-1]["usage"] == whole["usage"]


def test_tokenizer_endpoints(served, tokenizer, monkeypatch):
    """vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (what lm-eval's remote
    tokenizer calls): a prompt's or a chat's token ids as the server's tokenizer makes them, text
    back from ids, and the special tokens and chat template; bad input gets 400 naming the field."""
    url, server = served
    r = post(url, "/tokenize", {"prompt": "hello", "add_special_tokens": False}).json()
    assert r == {"count": 5, "max_model_len": server.context, "tokens": tokenizer("hello", add_special_tokens=False).input_ids}
    monkeypatch.setattr(server.tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                                           "{% if add_generation_prompt %}ab{% endif %}")
    messages = [{"role": "user", "content": "xyz"}]
    for opened, text in ((True, "xyzab"), (False, "xyz")):
        ids = post(url, "/tokenize", {"messages": messages, "add_generation_prompt": opened}).json()["tokens"]
        assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert post(url, "/tokenize", {"messages": messages}).json()["tokens"] == server.chat_prompt({"messages": messages})
    assert post(url, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "hello"}
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    for path, body, message in (("/tokenize", {"prompt": 5}, "prompt: must be a string"),
                                ("/tokenize", {"prompt": "a", "add_special_tokens": 1}, "add_special_tokens"),
                                ("/detokenize", {"tokens": [1, 10 ** 6]}, "tokens: must be a list of token ids")):
        r = post(url, path, body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_chat_logprobs(served, reference, tokenizer):
    """Chat's ``logprobs`` and ``top_logprobs``: an entry per output token with its text, bytes
    and log-probability under the adapter, and the ``top_logprobs`` most likely tokens, the
    greedy token first; streamed, the chunks' entries add up to the whole response's."""
    url, server = served
    body = {"model": "skip6", "messages": [{"role": "user", "content": "xyz"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    choice = post(url, "/v1/chat/completions", body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    prompt = server.chat_prompt(body)
    output = tokenizer(choice["message"]["content"], add_special_tokens=False).input_ids
    want = scored(reference, prompt + output, "skip6")
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in output]
    for i, (entry, token) in enumerate(zip(content, output)):
        position = len(prompt) - 1 + i
        assert entry["logprob"] == pytest.approx(float(want[position, token]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([t]) for t in want[position].topk(2).indices]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
    streamed = [entry for e in stream_events(url, "/v1/chat/completions", body)
                if e["choices"] and e["choices"][0]["logprobs"] for entry in e["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = post(url, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None}).json()["choices"][0]
    assert plain["logprobs"] is None and plain["message"] == choice["message"]


def post(url, path, body=None, content=None, headers=None):
    return httpx.post(url + path, json=body, content=content, headers=headers, timeout=60)


def test_bad_input_gets_its_status_and_the_server_keeps_serving(served, reference, tokenizer):
    url, _ = served
    ok = {"model": "skip4", "prompt": "abc"}
    cases = [
        (None, b"{not json", 400, "not valid JSON"),
        (None, b"[1, 2]", 400, "must be a JSON object"),
        ({"prompt": "abc"}, None, 400, "model"),
        ({**ok, "model": 7}, None, 400, "model"),
        ({**ok, "model": "nope"}, None, 404, "available: ['bora-demo', 'skip1'"),
        ({**ok, "prompt": ""}, None, 400, "prompt: must not be empty"),
        ({**ok, "prompt": []}, None, 400, "prompt: must not be empty"),
        ({**ok, "prompt": 5}, None, 400, "prompt: must be a string"),
        ({**ok, "prompt": ["a", 5]}, None, 400, "prompt: must be a string, a list of token ids, or a list of either"),
        ({**ok, "prompt": ["a", [1, 10 ** 6]]}, None, 400, "prompt[1]: token ids must lie in"),
        ({**ok, "prompt": [1, 10 ** 6]}, None, 400, "token ids must lie in"),
        ({**ok, "prompt": "a" * 65}, None, 400, "more than the limit of 64"),
        ({**ok, "max_tokens": -3}, None, 400, "max_tokens: must be >= 1"),
        ({**ok, "max_tokens": 0}, None, 400, "max_tokens: must be >= 1 (0 only with echo)"),
        ({**ok, "max_tokens": "9"}, None, 400, "max_tokens: must be an integer"),
        ({**ok, "max_tokens": 1.5}, None, 400, "max_tokens: must be an integer"),
        ({**ok, "max_tokens": 10 ** 9}, None, 400, "exceeds the server's limit of 300"),
        ({**ok, "temperature": -1}, None, 400, "temperature"),
        ({**ok, "temperature": "hot"}, None, 400, "temperature"),
        ({**ok, "top_p": 0}, None, 400, "top_p"),
        ({**ok, "seed": 1.5}, None, 400, "seed"),
        ({**ok, "stop": 3}, None, 400, "stop"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop"),
        ({**ok, "stream": "yes"}, None, 400, "stream"),
        ({**ok, "n": 0}, None, 400, "n: must be an integer >= 1"),
        ({**ok, "n": "2"}, None, 400, "n: must be an integer >= 1"),
        ({**ok, "n": 65}, None, 400, "n = 65 exceeds the server's limit of 64 choices"),
        ({**ok, "prompt": ["a"] * 33, "n": 2}, None, 400, "33 prompt(s) times n = 2 exceeds"),
        ({**ok, "best_of": 3}, None, 400, "best_of: 3 is not supported"),
        ({**ok, "logprobs": 21}, None, 400, "logprobs: must be an integer in [0, 20]"),
        ({**ok, "logprobs": True}, None, 400, "logprobs: must be an integer in [0, 20]"),
        ({**ok, "top_logprobs": 2}, None, 400, "top_logprobs: is chat's"),
        ({"model": "skip4", "messages": [{"role": "user", "content": "hi"}], "logprobs": 2}, None, 400,
         "logprobs: must be true or false"),
        ({"model": "skip4", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None, 400,
         "top_logprobs: needs logprobs: true"),
        ({"model": "skip4", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
         None, 400, "top_logprobs: must be an integer in [0, 20]"),
        ({"model": "skip4", "messages": [{"role": "user", "content": "hi"}], "echo": True}, None, 400, "echo"),
        ({"model": "skip4", "messages": []}, None, 400, "messages"),
        ({"model": "skip4", "messages": [{"role": "user", "content": 3}]}, None, 400, "messages[0].content"),
        ({"model": "skip4", "messages": [{"content": "hi"}]}, None, 400, "messages[0]"),
    ]
    for body, content, status, message in cases:
        path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
        r = post(url, path, body, content, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, content, r.text)
        error = r.json()["error"]
        assert message in error["message"], (message, error)
    # a body over max_body_bytes: 413, whether it says its length or not
    big = json.dumps({**ok, "prompt": "a" * 5000}).encode()
    assert post(url, "/v1/completions", content=big).status_code == 413
    r = httpx.post(url + "/v1/completions", content=iter([big[:3000], big[3000:]]), timeout=60)  # chunked
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    # a tokenizer without a chat template: chat requests get 400, completions still work
    server = served[1]
    template, server.tokenizer.chat_template = server.tokenizer.chat_template, None
    try:
        r = post(url, "/v1/chat/completions", {"model": "skip4", "messages": [{"role": "user", "content": "abc"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        # a template that refuses a conversation (as chat models' templates do): 400 with its words
        server.tokenizer.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must "
                                          "alternate') }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
        for path in ("/v1/chat/completions", "/tokenize"):
            r = post(url, path, {"model": "skip4", "messages": [{"role": "assistant", "content": "abc"}]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
            assert "chat template refused them: roles must alternate" in r.json()["error"]["message"]
    finally:
        server.tokenizer.chat_template = template
    # still serving, exactly
    assert complete(url, "skip4", "abc", 6)[0] == offline(reference, tokenizer, "abc", "skip4", 6)
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_hot_load_only_from_inside_the_root(served, reference, tokenizer, root, monkeypatch):
    url, server = served
    outside = root.parent / "outside"

    def load(name, path):
        return post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    for path in (str(outside), "../outside", str(root / ".." / "outside"), "link", str(root / "link"), "leaky"):
        r = load("x", path)
        assert r.status_code == 403 and "outside the adapter root" in r.json()["error"]["message"], (path, r.text)
    assert load("x", "corrupt").status_code == 400
    r = load("x", "mismatched")
    assert r.status_code == 400 and "expected" in r.json()["error"]["message"]
    assert load("x", "missing").status_code == 400
    assert load("", "late3").status_code == 400
    assert load(BASE, "late3").status_code == 400
    assert load("skip1", "late3").status_code == 400  # the name is taken
    assert "x" not in server.engine.adapter_names()
    # a good one loads (by relative or absolute path) and serves exactly
    assert load("late3", "late3").json() == {"status": "ok", "lora_name": "late3"}
    assert load("late5", str(root / "late5")).status_code == 200
    # every slot is full: the least recently used run-time load (late3) gives up its slot, stays
    # listed, and is loaded again when a request names it (the 8 loaded by hand are never evicted)
    assert load("one-too-many", "late3").status_code == 200
    assert "late3" not in server.engine.adapter_names() and "one-too-many" in server.engine.adapter_names()
    assert "late3" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert complete(url, "late3", "mno", 6)[0] == offline(reference, tokenizer, "mno", "skip3", 6)
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "one-too-many"}).status_code == 200

    # unload waits for the request in flight on it, which finishes in full
    results, started = {}, threading.Event()
    decode = server.engine._decode  # slowed down, so the request is surely in flight at the unload
    monkeypatch.setattr(server.engine, "_decode", lambda: (time.sleep(0.005), decode()))
    thread = threading.Thread(target=lambda: results.update(
        out=complete(url, "late5", "abc", 200, stream=True, started=started)))
    thread.start()
    assert started.wait(30)
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "late5"})
    assert r.status_code == 200
    thread.join(60)
    monkeypatch.undo()
    text, finish, usage = results["out"]
    assert finish == "length" and usage["completion_tokens"] == 200
    assert text == offline(reference, tokenizer, "abc", "skip5", 200)
    assert post(url, "/v1/completions", {"model": "late5", "prompt": "abc"}).status_code == 404
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "late5"}).status_code == 404
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "late3"}).status_code == 200

    # without an adapter root nothing loads at run time
    server.adapter_root, saved = None, server.adapter_root
    try:
        r = load("late3", "late3")
        assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]
    finally:
        server.adapter_root = saved


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_queue_full_timeout_and_disconnects(served, monkeypatch):
    url, server = served
    engine = server.engine

    def full(request):
        raise QueueFull("256 requests are waiting (max_queue=256)")

    with monkeypatch.context() as m:
        m.setattr(engine, "submit", full)
        r = post(url, "/v1/completions", {"model": "skip1", "prompt": "abc"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "max_queue" in r.json()["error"]["message"]
    # full after two of a request's five choices: 429, and the two leave the engine
    submit, taken = engine.submit, []
    with monkeypatch.context() as m:
        m.setattr(engine, "submit", lambda request: full(request) if len(taken) == 2 else taken.append(submit(request)))
        r = post(url, "/v1/completions", {"model": "skip1", "prompt": "abc", "n": 5, "max_tokens": 300, "ignore_eos": True})
    assert r.status_code == 429 and len(taken) == 2
    wait_for(lambda: engine.batch_size() == 0 and engine._in_use[engine.adapters["skip1"]] == 0)

    # past the request timeout: 504 (or an error event once streaming), and the sequence leaves
    monkeypatch.setattr(server.limits, "request_timeout", 0.3)
    r = post(url, "/v1/completions", {"model": "skip1", "prompt": "abc", "max_tokens": 300, "ignore_eos": True})
    assert r.status_code == 504 and "timed out after 0.3 s" in r.json()["error"]["message"]
    r = post(url, "/v1/completions", {"model": "skip1", "prompt": "abc", "max_tokens": 300, "ignore_eos": True, "n": 3})
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    wait_for(lambda: engine.batch_size() == 0)  # every choice left
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": "skip1", "prompt": "abc", "max_tokens": 300, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "timed out" in lines[-2] and lines[-1] == "data: [DONE]"
    wait_for(lambda: engine.batch_size() == 0)
    monkeypatch.undo()

    def cancelled():
        return server.metrics._counters["bora_requests_total"][(("adapter", "skip2"), ("finish", "cancelled"))]

    # a streaming client that goes away: its sequence leaves the batch (decode steps slowed down
    # so that 300 tokens cannot finish before the server notices, however loaded the machine)
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda: (time.sleep(0.01), decode()))
    before = cancelled()
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": "skip2", "prompt": "abc", "max_tokens": 300, "stream": True}) as r:
        next(r.iter_lines())
    wait_for(lambda: cancelled() == before + 1 and engine.batch_size() == 0)
    # every choice of a request with n = 3
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": "skip2", "prompt": "abc", "max_tokens": 300, "stream": True, "n": 3}) as r:
        next(r.iter_lines())
    wait_for(lambda: cancelled() == before + 4 and engine.batch_size() == 0)
    # and one waiting for a whole response
    host, port = url[7:].split(":")
    body = json.dumps({"model": "skip2", "prompt": "abc", "max_tokens": 300}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: engine.batch_size() == 1)
    wait_for(lambda: cancelled() == before + 5 and engine.batch_size() == 0)
    monkeypatch.undo()
    assert complete(url, "skip2", "abc", 3)[1] == "length"


def test_metrics(served):
    url, _ = served
    complete(url, "skip7", "abc", 5)
    post(url, "/v1/completions", {"model": "nope", "prompt": "a"})
    text = httpx.get(url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['bora_requests_total{adapter="skip7",finish="length"}'] >= 1
    assert samples['bora_generation_tokens_total{adapter="skip7"}'] >= 5
    assert samples['bora_http_errors_total{status="404"}'] >= 1
    assert samples["bora_adapters_loaded"] == 8 and samples["bora_queue_depth"] == 0
    assert samples["bora_engine_step_sequences_total"] >= samples["bora_engine_steps_total"] > 0
    assert samples["bora_engine_prefilled_tokens_total"] >= 3
    assert samples["bora_engine_prefix_cache_hit_tokens_total"] == samples["bora_prefix_cache_tokens"] == 0  # (off)
    for histogram in ("bora_request_latency_seconds", "bora_time_to_first_token_seconds"):
        buckets = [v for k, v in samples.items() if k.startswith(histogram + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == samples[histogram + "_count"] > 0
    assert "# TYPE bora_request_latency_seconds histogram" in text


def test_cli_sigterm_finishes_in_flight_work_and_exits_0(serve_demo, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "bora_kernels.serve", "--demo", str(serve_demo), "--port", str(port),
                             "--max-adapters", "9", "--no-access-log"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, url, 120)
        results, started = {}, threading.Event()
        thread = threading.Thread(target=lambda: results.update(
            out=complete(url, "skip1", "abc", 500, stream=True, started=started)))
        thread.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)  # with the stream in flight
        thread.join(120)
        text, finish, usage = results["out"]
        assert finish == "length" and usage["completion_tokens"] == 500 and len(text) == 500
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.communicate()[0]
    assert "with 8 adapters" in log and "stop tokens [2])" in log, log


def test_cli_quantize_nf4_serves_the_adapters_over_a_4bit_base(serve_demo, capsys):
    from bora_kernels.serve.cli import _quantized, build_server

    server, _ = build_server(["--demo", str(serve_demo), "--quantize", "nf4"])
    layers = bk.model.adapter_layers(server.engine.model)
    assert layers and all(isinstance(layer.base_layer, NF4Linear) for layer in layers.values())
    assert len(server.engine.adapter_names()) == 8
    stored, weights = nf4_storage(server.engine.model)
    assert weights == sum(layer.in_features * layer.out_features for layer in layers.values())
    assert 0.5 < stored / weights < 0.6  # 4 bits plus the block statistics
    assert f"base in NF4: {stored / weights:.3f} bytes per weight" in _quantized(server.engine.model)
    assert _quantized(build_server(["--demo", str(serve_demo)])[0].engine.model) == ""
    with pytest.raises(SystemExit):
        build_server(["--demo", str(serve_demo), "--quantize", "int8"])
    assert "--quantize: invalid choice: 'int8'" in capsys.readouterr().err


def test_cli_serves_a_checkpoint_bitsandbytes_saved_in_4bit(serve_demo, tmp_path, monkeypatch):
    """A model folder saved by bitsandbytes in NF4 loads without bitsandbytes
    (``from_pretrained_4bit``): ``NF4Linear`` layers holding the same bytes under the adapter
    slots."""
    pytest.importorskip("bitsandbytes")
    from bora_kernels.serve.cli import _quantized, build_server

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(serve_demo / "base", quantization_config=config,
                                                              device_map="cpu")
    model.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(serve_demo / "base").save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    server, _ = build_server(["--model", str(tmp_path), "--device", "cpu", "--adapter-root",
                              str(serve_demo / "adapters")])
    layers = bk.model.adapter_layers(server.engine.model)
    assert layers and all(isinstance(layer.base_layer, NF4Linear) for layer in layers.values())
    saved = {n: m.weight.data for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert set(saved) == set(layers)
    assert all(torch.equal(layers[n].base_layer.packed.flatten(), saved[n].flatten()) for n in saved)
    assert len(server.engine.adapter_names()) == 8 and "base in NF4" in _quantized(server.engine.model)


def test_the_generation_config_gives_stop_tokens_and_sampling_defaults(served, tokenizer, monkeypatch):
    """The tokenizer's eos and each one of the model's ``generation_config.eos_token_id`` (one id
    or a list, as Llama 3 Instruct's ``<|eot_id|>`` beside ``<|end_of_text|>``) end a completion;
    its ``temperature`` and ``top_p`` are the defaults of a request that leaves them out (as
    vLLM takes them), and a value the request gives wins, 0 included."""
    from types import SimpleNamespace as Namespace

    from bora_kernels.serve.app import sampling_defaults, stop_tokens

    def model(eos=None, temperature=1.0, top_p=1.0, top_k=50, min_p=None, repetition_penalty=1.0):
        return Namespace(generation_config=Namespace(eos_token_id=eos, temperature=temperature, top_p=top_p,
                                                     top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty))

    eos = Namespace(eos_token_id=2)
    assert stop_tokens(eos, model([2, 7])) == (2, 7)
    assert stop_tokens(eos, model(9)) == (2, 9)
    assert stop_tokens(eos, model(None)) == (2,) == stop_tokens(eos, Namespace())
    assert stop_tokens(Namespace(eos_token_id=None), model((7, 8))) == (7, 8)
    assert sampling_defaults(model(temperature=0.6, top_p=0.9)) == {"temperature": 0.6, "top_p": 0.9}
    assert sampling_defaults(model()) == sampling_defaults(Namespace()) == {}
    assert sampling_defaults(model(temperature=5.0, top_p=0.0, top_k=0, min_p=2)) == {}
    assert sampling_defaults(model(temperature=None, top_k=None)) == {}
    assert sampling_defaults(model(top_k=40, min_p=0.05, repetition_penalty=1.1)) == {
        "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}
    assert sampling_defaults(model(repetition_penalty=0)) == {}

    _, server = served
    assert server.eos == (tokenizer.eos_token_id,) and server.defaults == {}
    monkeypatch.setattr(server, "eos", (2, 7))
    monkeypatch.setattr(server, "defaults", {"temperature": 0.6, "top_p": 0.9})
    params, _ = server.sampling({"max_tokens": 4}, 3, None)
    assert (params.temperature, params.top_p, params.stop_token_ids) == (0.6, 0.9, (2, 7))
    params, _ = server.sampling({"max_tokens": 4, "temperature": 0, "top_p": None, "ignore_eos": True}, 3, None)
    assert (params.temperature, params.top_p, params.stop_token_ids) == (0, 0.9, ())
    params, _ = server.sampling({"top_k": 5, "min_p": 0.1, "stop_token_ids": [9, 2]}, 3, None)
    assert (params.top_k, params.min_p, params.stop_token_ids) == (5, 0.1, (2, 7, 9))
    params, _ = server.sampling({"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1}, 3, None)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.1)
    params, _ = server.sampling({"stop_token_ids": [9], "ignore_eos": True, "tools": [],
                                 "response_format": {"type": "text"}}, 3, None)
    assert (params.top_k, params.min_p, params.stop_token_ids) == (0, 0.0, (9,))
    for body, param in (({"top_k": 2.5}, "top_k"), ({"min_p": -1}, "min_p"), ({"stop_token_ids": [10**6]}, "stop_token_ids"),
                        ({"stop_token_ids": 3}, "stop_token_ids"), ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                        ({"min_tokens": 2000}, "min_tokens"), ({"use_beam_search": True}, "use_beam_search"),
                        ({"suffix": "x"}, "suffix"),
                        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                        ({"guided_grammar": "root ::= \"a\""}, "guided_grammar")):
        with pytest.raises(APIError, match=f"^{param}"):
            server.sampling(body, 3, None)


def test_completion_prompts_get_the_tokenizers_special_tokens(served, monkeypatch):
    """A text prompt of ``/v1/completions`` is tokenized with the tokenizer's special tokens (a
    Llama tokenizer's BOS), as vLLM does, unless ``add_special_tokens`` is false; token-id
    prompts are taken as they are."""
    from tokenizers import processors

    _, server = served
    tokenizer = demo.char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", 1)])
    monkeypatch.setattr(server, "tokenizer", tokenizer)
    abc = tokenizer("abc", add_special_tokens=False).input_ids
    assert server.completion_prompts({"prompt": "abc"}) == [([1, *abc], "abc")]
    assert server.completion_prompts({"prompt": "abc", "add_special_tokens": False}) == [(abc, "abc")]
    assert server.completion_prompts({"prompt": abc}) == [(abc, "abc")]
    assert server.completion_prompts({"prompt": ["abc", abc]}) == [([1, *abc], "abc"), (abc, "abc")]
    with pytest.raises(APIError, match="add_special_tokens: must be true or false"):
        server.completion_prompts({"prompt": "abc", "add_special_tokens": "yes"})


def test_cli_loads_adapters_by_hub_id(serve_demo, fake_hub, tmp_path, monkeypatch):
    """``--adapters NAME=owner/repo`` fetches the adapter from the Hub (stood in for here), and
    ``NAME=owner/repo@v2`` that revision; the model list gives the id (and revision) as its root,
    and each answers as the same adapter from a folder. A local folder with ``@`` in its name
    stays a folder."""
    from bora_kernels.serve.cli import build_server

    shutil.copytree(serve_demo / "adapters" / "skip2", fake_hub.repos / "org" / "skip2")
    fake_hub.revisions[("org/skip2", "v2")] = serve_demo / "adapters" / "skip5"  # v2 holds another adapter
    shutil.copytree(serve_demo / "adapters" / "skip3", tmp_path / "at@home")
    monkeypatch.chdir(tmp_path)
    server, _ = build_server(["--model", str(serve_demo / "base"), "--adapters", "hubbed=org/skip2", "older=org/skip2@v2",
                              f"skip2={serve_demo / 'adapters' / 'skip2'}", f"skip5={serve_demo / 'adapters' / 'skip5'}",
                              "local=at@home", f"skip3={serve_demo / 'adapters' / 'skip3'}"])
    # (each later fetch names the commit its first resolved to)
    assert {repo for repo, _ in fake_hub.asked} == {"org/skip2"}
    assert {rev for rev in fake_hub.asked_revisions if rev is None or len(rev) != 40} == {None, "v2"}
    cards = {card["id"]: card["root"] for card in json.loads(server.models().body)["data"]}
    assert cards["hubbed"] == "org/skip2" and cards["skip2"] == str((serve_demo / "adapters" / "skip2").resolve())
    assert cards["older"] == "org/skip2@v2" and cards["local"] == str((tmp_path / "at@home").resolve())
    layers = bk.model.adapter_layers(server.engine.model)
    for ours, same in (("hubbed", "skip2"), ("older", "skip5"), ("local", "skip3")):
        a, b = server.engine.adapters[ours], server.engine.adapters[same]
        for layer in layers.values():
            assert torch.equal(layer.lora_A[a], layer.lora_A[b]) and torch.equal(layer.lora_B[a], layer.lora_B[b])


def test_cli_revision_reaches_every_loader(serve_demo, monkeypatch):
    """``--revision`` is passed to everything that reads a Hub ``--model``: its config, its
    weights (transformers', or ours with ``--quantize nf4``) and its tokenizer (the Hub is stood
    in for by the demo's folder, whatever the id)."""
    from bora_kernels import bnb_io
    from bora_kernels.serve.cli import build_server

    asked = []

    def local(label, load):
        def from_pretrained(name, *args, revision=None, **kwargs):
            if name == "org/m":  # (not the loaders' own reads of the folder)
                asked.append((label, revision))
                name = serve_demo / "base"
            return load(name, *args, **kwargs)
        return from_pretrained

    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", local(cls.__name__, cls.from_pretrained))
    monkeypatch.setattr(bnb_io, "from_pretrained_nf4", local("from_pretrained_nf4", bnb_io.from_pretrained_nf4))
    for extra, loaders in (([], ["AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"]),
                           (["--quantize", "nf4"], ["AutoConfig", "from_pretrained_nf4", "AutoTokenizer"])):
        asked.clear()
        with use_backend("torch"):  # (quantizing under the Triton interpreter is slow, and beside the point)
            build_server(["--model", "org/m", "--revision", "v1", "--adapters",
                          f"skip1={serve_demo / 'adapters' / 'skip1'}", *extra])
        assert asked == [(loader, "v1") for loader in loaders], asked


def test_cli_bad_arguments(serve_demo, capsys):
    from bora_kernels.serve.cli import build_server

    for argv, message in ((["--demo", str(serve_demo), "--adapters", "oops"], "NAME=DIR"),
                          (["--demo", str(serve_demo), "--max-batch", "0"], "argument --max-batch: must be >= 1, got 0"),
                          (["--demo", str(serve_demo), "--max-lora-rank", "4"], "--max-lora-rank"),
                          (["--demo", str(serve_demo), "--adapter-root", "/nonexistent"], "is not a folder"),
                          (["--demo", str(serve_demo), "--adapters", f"skip1={serve_demo}"], "has no adapter_config.json"),
                          (["--demo", str(serve_demo), "--revision", "v1"], "--revision names a version of a Hub --model"),
                          (["--demo", str(serve_demo), "--adapters", "x=org/lora@"], "NAME=OWNER/REPO@REVISION"),
                          (["--demo", str(serve_demo), "--prefix-cache-tokens", "-1"], "--prefix-cache-tokens: must be >= 0"),
                          (["--demo", str(serve_demo), "--tool-call-parser", "xml"], "invalid choice: 'xml'")):
        with pytest.raises(SystemExit) as exit_info:
            build_server(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    # and the good ones reach the engine
    server, _ = build_server(["--demo", str(serve_demo), "--prefix-cache-tokens", "256", "--max-choices", "8",
                              "--tool-call-parser", "hermes"])
    assert server.engine.prefix_cache.max_tokens == 256 and server.limits.max_choices == 8
    assert server.tool_parser == "hermes"
    # more adapters than slots: the first fill the slots, the others load when a request names them
    server, _ = build_server(["--demo", str(serve_demo), "--max-adapters", "3"])
    assert server.engine.adapter_names() == list(ADAPTERS[:3]) and server.adapter_names() == list(ADAPTERS)
    assert server.registry["skip8"] == (serve_demo / "adapters" / "skip8", None)
