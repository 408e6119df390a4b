"""The serving engine: greedy outputs equal offline ``generate`` with each adapter alone, whatever
shares the batch; adapters load and unload while it serves; bad adapters change nothing.

The engine's scheduling is what is tested here, so most tests run the ops' torch path (the
engine thread inherits ``use_backend`` from ``start``); ``test_cancel...`` runs the Triton
kernels (under the interpreter in CI)."""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import bora_kernels as bk  # noqa: E402
from bora_kernels.nn import NF4Linear  # noqa: E402
from bora_kernels.ops import use_backend  # noqa: E402
from bora_kernels.serve import Engine, QueueFull, Request, SamplingParams, SlotsBusy, UnknownAdapter  # noqa: E402

VOCAB = 64


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """8 PEFT folders for ``tiny_llama()``, of ranks 2..8 on different modules, strong enough to
    change greedy outputs; three are DoRA adapters."""
    root = tmp_path_factory.mktemp("adapters")
    names = [f"task{d}" for d in range(8)]
    model = bk.inject(tiny_llama(), ["q_proj", "v_proj", "up_proj", "down_proj"], 8, r=[2, 4, 8, 4, 2, 8, 4, 6],
                      alpha=16, adapter_names=names, use_dora=[d in (1, 4, 6) for d in range(8)])
    gen = torch.Generator().manual_seed(1)
    for layer in bk.model.adapter_layers(model).values():
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
        layer.lora_magnitude.data.mul_(torch.rand(layer.lora_magnitude.shape, generator=gen) + 0.5)
    for name in names:
        bk.save_peft_adapter(model, name, root / name)
    return root, names


def collect(engine: Engine, prompt, adapter, params, guide=None) -> tuple[Request, dict]:
    out = {"tokens": [], "finish": None, "done": threading.Event()}

    def on_token(token, finish):
        if token is not None:
            out["tokens"].append(token)
        else:
            out["finish"] = finish
            out["done"].set()

    return engine.submit(Request(list(prompt), adapter, params, on_token, guide=guide)), out


def offline(reference, prompt, adapter, max_tokens, **generate) -> list[int]:
    ids = torch.tensor([prompt])
    with bk.use_adapters(reference, [adapter]), use_backend("torch"):
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, min_new_tokens=max_tokens, **generate)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(adapters):
    root, names = adapters
    return bk.load_peft_adapters(tiny_llama(), {n: root / n for n in names})


def served(adapters, **kw) -> Engine:
    root, names = adapters
    engine = Engine(tiny_llama(), **{"max_adapters": 10, "max_lora_rank": 8, **kw})
    for name in names:
        engine.load_adapter(name, root / name)
    return engine


def start(engine: Engine) -> Engine:
    with use_backend("torch"):
        return engine.start()


def test_greedy_equals_offline_generate_in_a_mixed_batch(adapters, reference):
    """8 adapters and the base model, mixed prompt lengths and output lengths, requests arriving
    while others run: every request's tokens equal ``generate`` with its adapter alone."""
    root, names = adapters
    engine = start(served(adapters, max_batch=6))
    gen = torch.Generator().manual_seed(3)
    jobs = []
    for i in range(14):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 13, (1,), generator=gen)),), generator=gen).tolist()
        adapter = None if i % 5 == 4 else names[i % 8]
        max_tokens = 3 + i % 7
        jobs.append((prompt, adapter, max_tokens, *collect(engine, prompt, adapter,
                                                           SamplingParams(max_tokens=max_tokens, temperature=0))))
    assert all(out["done"].wait(60) for *_, out in jobs)
    engine.shutdown(10)  # (Triton's interpreter runs one kernel at a time: no offline run alongside)
    for prompt, adapter, max_tokens, _, out in jobs:
        assert out["finish"] == "length"
        assert out["tokens"] == offline(reference, prompt, adapter, max_tokens), (adapter, prompt)
    assert engine.stats["steps"] > 0 and engine.stats["step_sequences"] > engine.stats["steps"]  # batched
    # the outputs differ by adapter, so routing mattered
    outputs = {tuple(out["tokens"][:3]) for *_, out in jobs}
    assert len(outputs) > 4


def test_per_adapter_schedule_runs_one_adapter_per_step(adapters, reference, monkeypatch):
    """The baseline schedule: every decode step holds one adapter's sequences, the outputs are
    the same, and it takes more steps than the mixed schedule for the same requests."""
    root, names = adapters
    steps = {}
    for schedule in ("mixed", "per-adapter"):
        engine = served(adapters, max_batch=8, schedule=schedule)
        mixes = []
        decode = engine._decode
        monkeypatch.setattr(engine, "_decode", lambda: (mixes.append({s.request.slot for s in engine._running}), decode()))
        jobs = [(names[i % 4], collect(engine, [1 + i, 2, 3], names[i % 4], SamplingParams(max_tokens=4, temperature=0)))
                for i in range(8)]
        with use_backend("torch"):
            while not all(out["done"].is_set() for _, (_, out) in jobs):
                engine.step()
        for i, (name, (_, out)) in enumerate(jobs):
            assert out["tokens"] == offline(reference, [1 + i, 2, 3], name, 4)
        assert max(map(len, mixes)) == (4 if schedule == "mixed" else 1)
        steps[schedule] = len(mixes)
    assert steps["per-adapter"] > steps["mixed"]
    with pytest.raises(ValueError, match="schedule must be one of"):
        Engine(tiny_llama(), schedule="fifo")


def test_nf4_base_serves_what_the_dequantized_model_generates(adapters):
    """``quantize="nf4"``: every block projection's base is stored in NF4 under the adapter
    slots, and a mixed batch generates, per request, what ``generate`` gives with the adapter
    alone over the dense model whose weights are the dequantized NF4 ones (and not what the
    unquantized model gives: the 4-bit base is really used)."""
    root, names = adapters
    engine = Engine(tiny_llama(), max_adapters=10, max_lora_rank=8, quantize="nf4")
    layers = bk.model.adapter_layers(engine.model)
    assert len(layers) == 14 and all(isinstance(layer.base_layer, NF4Linear) for layer in layers.values())
    for name in names:
        engine.load_adapter(name, root / name)
    dequantized = tiny_llama()
    for module_name, layer in layers.items():
        dequantized.get_submodule(module_name).weight.data.copy_(layer.base_layer.nf4_weight().dequantize())
    dequantized = bk.load_peft_adapters(dequantized, {n: root / n for n in names})
    dense = bk.load_peft_adapters(tiny_llama(), {n: root / n for n in names})
    gen = torch.Generator().manual_seed(5)
    jobs = []
    for i in range(10):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 13, (1,), generator=gen)),), generator=gen).tolist()
        adapter = None if i % 5 == 4 else names[i % 8]
        jobs.append((prompt, adapter, collect(engine, prompt, adapter, SamplingParams(max_tokens=6, temperature=0))))
    with use_backend("torch"):
        while not all(out["done"].is_set() for *_, (_, out) in jobs):
            engine.step()
    assert engine.stats["step_sequences"] > engine.stats["steps"]  # batched
    for prompt, adapter, (_, out) in jobs:
        assert out["tokens"] == offline(dequantized, prompt, adapter, 6), (adapter, prompt)
    assert any(out["tokens"] != offline(dense, prompt, adapter, 6) for prompt, adapter, (_, out) in jobs)


def test_a_failed_prefill_ends_that_request_alone(adapters, reference, monkeypatch):
    """A prefill that fails (here the model raises on one prompt) ends that request with
    "error", in the step that admitted it beside others; the request already running and the one
    admitted after it go on, and each generates what it would alone."""
    names = adapters[1]
    engine = served(adapters, max_batch=4)
    forward = engine.model.forward

    def failing(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 6:
            raise RuntimeError("this prefill fails")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", failing)
    prompts = {names[0]: [5, 6, 7], names[1]: [1, 2, 3, 4, 5, 6], names[2]: [8, 9]}
    jobs = {name: collect(engine, prompt, name, SamplingParams(max_tokens=5, temperature=0))[1]
            for name, prompt in prompts.items()}
    with use_backend("torch"):
        engine.step()  # admits all three: the first joins, the second fails, the third joins
        assert jobs[names[1]]["finish"] == "error" and jobs[names[1]]["tokens"] == []
        assert engine.batch_size() == 2
        while not all(out["done"].is_set() for out in jobs.values()):
            engine.step()
    for name in (names[0], names[2]):
        assert jobs[name]["finish"] == "length"
        assert jobs[name]["tokens"] == offline(reference, prompts[name], name, 5), name


def test_requests_with_one_prompt_share_its_prefill(adapters, reference, monkeypatch):
    """Requests queued together with the same prompt and adapter (an HTTP request's ``n``
    choices) are prefilled by one forward, as far as the batch has room; each then generates what
    it would alone: greedy ones ``generate``'s tokens, seeded ones the tokens of a lone request
    with that seed. A different adapter, prompt or prompt scoring gets its own prefill."""
    names = adapters[1]
    engine = served(adapters, max_batch=5)
    prefills = []
    forward = engine.model.forward

    def counted(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefills.append(kwargs["input_ids"][0].tolist())
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counted)
    joined = []
    join = engine._join
    monkeypatch.setattr(engine, "_join", lambda seqs, *a: joined.append(len(seqs)) or join(seqs, *a))
    prompt = [5, 6, 7, 8]
    asks = [(names[0], prompt, {})] * 3 + [(names[0], prompt, {"prompt_logprobs": 1}), (names[1], prompt, {}),
                                            (names[0], prompt[:3], {})] + [(names[0], prompt, {})] * 2
    jobs = [collect(engine, p, name, SamplingParams(max_tokens=4, temperature=0, **ask)) for name, p, ask in asks]
    sampled = [collect(engine, prompt, names[2], SamplingParams(max_tokens=6, temperature=1.0, seed=s))
               for s in range(4)]
    with use_backend("torch"):
        while not all(out["done"].is_set() for _, out in jobs + sampled):
            engine.step()
    # the first 3 share one; the scored one, the other adapter's alone; the batch (5) is full
    # until they finish together; then the shorter prompt, the 2 alike together, and 2 of the 4
    # seeded ones (room for 2), then the other 2
    assert prefills == [prompt, prompt, prompt, prompt[:3], prompt, prompt, prompt], prefills
    assert joined == [3, 1, 1, 1, 2, 2, 2]
    for (name, p, _), (_, out) in zip(asks, jobs):
        assert out["tokens"] == offline(reference, p, name, 4)
    assert jobs[3][0].prompt_logprobs is not None and jobs[0][0].prompt_logprobs is None
    engine.shutdown()
    alone = start(served(adapters))
    for s, (_, out) in enumerate(sampled):
        _, lone = collect(alone, prompt, names[2], SamplingParams(max_tokens=6, temperature=1.0, seed=s))
        assert lone["done"].wait(30) and lone["tokens"] == out["tokens"]
    assert len({tuple(out["tokens"]) for _, out in sampled}) > 1
    alone.shutdown()


def test_prefix_cache_reuses_prompt_blocks_per_adapter(adapters, reference, monkeypatch, tmp_path):
    """With a prefix cache (blocks of 4 tokens), prompts that share a 10-token system prompt are
    prefilled from the last cached whole block, each adapter from its own blocks: every output
    equals ``generate`` with its adapter alone. The same prompt for another adapter and an adapter
    loaded anew into a slot compute it whole; the cache never holds more than its budget. A
    scored prompt reuses only blocks a scored prompt left with at least its count of alternatives
    (from the token before them, whose logits score the first new token); its log-probabilities
    are the model's either way."""
    root, names = adapters
    engine = served(adapters, max_batch=2, prefix_cache_tokens=24, prefix_block=4)
    fed = []
    forward = engine.model.forward

    def counted(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1 or kwargs[engine._cache_arg].get_seq_length() == 0:
            fed.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counted)
    system = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]
    asks = [(names[0], system + [11, 12]), (names[0], system + [13]), (names[1], system + [13]),
            (names[0], system + [21, 22, 23, 24, 25]), (names[0], system + [13], {"prompt_logprobs": 0}),
            (names[0], system[:6]), (names[0], system + [13, 14], {"prompt_logprobs": 0}),
            (names[0], system + [13, 14], {"prompt_logprobs": 2}), (names[0], system + [15], {"prompt_logprobs": 1})]
    # the 2nd reuses 2 of the 1st's 3 blocks (one token must be left); the 3rd's are another
    # adapter's; the 4th reuses 2 (its 3rd block differs); the first scored one none (no block
    # kept scores), the 6th 1; the next scored one 2 blocks less their last token; the one with 2
    # alternatives none (the blocks kept 0); the last 2 blocks less a token again
    want_fed = [12, 3, 11, 7, 11, 2, 5, 12, 4]
    with use_backend("torch"):
        for i, (name, prompt, *extra) in enumerate(asks):
            extra = extra[0] if extra else {}
            request, out = collect(engine, prompt, name, SamplingParams(max_tokens=5, temperature=0, **extra))
            while not out["done"].is_set():
                engine.step()
            assert out["tokens"] == offline(reference, prompt, name, 5), i
            assert fed[-1] == want_fed[i] and engine.prefix_cache.tokens <= 24, (i, fed)
            if extra:
                assert_prompt_logprobs(reference, name, prompt, request.prompt_logprobs, extra["prompt_logprobs"])
        assert engine.stats["cached_prompt_tokens"] == 8 + 8 + 4 + 7 + 7
        # task0's slot gets another adapter: its blocks go, and the prompt is computed whole
        engine.unload_adapter(names[0])
        engine.load_adapter("again", root / names[3])
        request, out = collect(engine, system + [13], "again", SamplingParams(max_tokens=5, temperature=0))
        while not out["done"].is_set():
            engine.step()
        assert fed[-1] == 11 and out["tokens"] == offline(reference, system + [13], names[3], 5)


@pytest.mark.parametrize("prefix_cache_tokens", [0, 64])
def test_sliding_window_model_serves_what_generate_gives(tmp_path, prefix_cache_tokens):
    """Mistral with a 4-token sliding window, prompts and outputs longer than the window, in one
    batch: the batch's cache keeps every key (a sliding layer's own cache keeps only its window,
    which could not be padded to the others) and each request generates what ``generate`` gives
    with its adapter alone; with a prefix cache too (the prompts share 9 tokens)."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        sliding_window=4, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    base = transformers.MistralForCausalLM(config).eval()
    names = ["a", "b"]
    reference = bk.inject(copy.deepcopy(base), "all-linear", 2, r=4, alpha=8, adapter_names=names)
    gen = torch.Generator().manual_seed(1)
    for layer in bk.model.adapter_layers(reference).values():
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    engine = Engine(base, max_adapters=2, max_lora_rank=4, prefix_cache_tokens=prefix_cache_tokens, prefix_block=4)
    for name in names:
        engine.load_adapter(name, bk.save_peft_adapter(reference, name, tmp_path / name))
    jobs = []
    shared = torch.randint(1, VOCAB, (9,), generator=gen).tolist()
    for i in range(6):
        prompt = shared + torch.randint(1, VOCAB, (1 + 2 * i,), generator=gen).tolist()
        adapter = [*names, None][i % 3]
        jobs.append((prompt, adapter, collect(engine, prompt, adapter, SamplingParams(max_tokens=8, temperature=0))[1]))
    with use_backend("torch"):
        while not all(out["done"].is_set() for *_, out in jobs):
            engine.step()
    assert engine.stats["step_sequences"] > engine.stats["steps"]  # batched
    assert (engine.stats["cached_prompt_tokens"] > 0) == bool(prefix_cache_tokens)
    for prompt, adapter, out in jobs:
        assert out["finish"] == "length" and out["tokens"] == offline(reference, prompt, adapter, 8), (adapter, prompt)


def test_stop_tokens_and_sampling(adapters, reference):
    root, names = adapters
    engine = start(served(adapters))
    prompt = [5, 9, 17, 3]
    want = offline(reference, prompt, names[2], 12)
    stop = want[4]
    _, out = collect(engine, prompt, names[2], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,)))
    assert out["done"].wait(60)
    assert out["finish"] == "stop" and out["tokens"] == want[:want.index(stop)]
    # seeded sampling repeats; another seed differs; top_p tiny is greedy
    runs = []
    for seed in (7, 7, 8):
        _, out = collect(engine, prompt, names[1], SamplingParams(max_tokens=16, temperature=1.5, seed=seed))
        assert out["done"].wait(60)
        runs.append(out["tokens"])
    assert runs[0] == runs[1] != runs[2]
    # tiny top_p is greedy, seeded or not (an unseeded row takes the batch's shared draw)
    outs = [collect(engine, prompt, names[1], SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=seed))[1]
            for seed in (1, None)]
    assert all(out["done"].wait(60) for out in outs)
    assert all(out["tokens"] == offline(reference, prompt, names[1], 8) for out in outs)
    # so are top_k=1 and min_p=1
    outs = [collect(engine, prompt, names[1], SamplingParams(max_tokens=8, temperature=1.5, **cut))[1]
            for cut in ({"top_k": 1}, {"min_p": 1.0, "seed": 3})]
    assert all(out["done"].wait(60) for out in outs)
    assert all(out["tokens"] == offline(reference, prompt, names[1], 8) for out in outs)
    engine.shutdown(10)


class _OutputPenalties(transformers.LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated after ``start``."""

    def __init__(self, start, presence, frequency):
        self.start, self.presence, self.frequency = start, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids[:, self.start:], torch.ones_like(input_ids[:, self.start:], dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def test_penalties_equal_generate_with_the_same_logits_processors(adapters, reference):
    """Greedy with penalties, in one batch with a request without them: ``repetition_penalty``
    as ``generate``'s own, presence and frequency penalties as OpenAI defines them (a logits
    processor here), token for token."""
    root, names = adapters
    engine = start(served(adapters))
    prompt = [5, 9, 17, 3, 9]
    cases = [({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
             ({"presence_penalty": 1.5, "frequency_penalty": 0.7},
              {"logits_processor": transformers.LogitsProcessorList([_OutputPenalties(len(prompt), 1.5, 0.7)])}),
             ({"repetition_penalty": 0.6, "frequency_penalty": -0.4},
              {"repetition_penalty": 0.6,
               "logits_processor": transformers.LogitsProcessorList([_OutputPenalties(len(prompt), 0.0, -0.4)])}),
             ({}, {})]
    runs = [collect(engine, prompt, names[1], SamplingParams(max_tokens=12, temperature=0, **ours))[1]
            for ours, _ in cases]
    assert all(out["done"].wait(60) for out in runs)
    plain = offline(reference, prompt, names[1], 12)
    for (ours, theirs), out in zip(cases, runs):
        want = offline(reference, prompt, names[1], 12, **theirs)
        assert out["tokens"] == want and (want != plain) == bool(ours), ours
    engine.shutdown(10)


def test_logit_bias_and_min_tokens_equal_generate(adapters, reference):
    """Greedy, in one batch: ``logit_bias`` as ``generate``'s ``sequence_bias`` of single
    tokens, and ``min_tokens`` as its ``min_new_tokens`` with the stop token as its eos, token for
    token; the same stop token without ``min_tokens`` ends the output at its first place."""
    _, names = adapters
    engine = start(served(adapters))
    prompt = [5, 9, 17, 3, 9]
    plain = offline(reference, prompt, names[1], 12)
    bias, stop = {plain[0]: -3.0, plain[2]: -1.5, 7: 2.0}, plain[3]
    runs = [collect(engine, prompt, names[1], SamplingParams(max_tokens=12, temperature=0, **ours))[1]
            for ours in ({"logit_bias": bias}, {"stop_token_ids": (stop,), "min_tokens": 6}, {"stop_token_ids": (stop,)})]
    assert all(out["done"].wait(60) for out in runs)
    ids = torch.tensor([prompt])

    def generate(**kw):
        with bk.use_adapters(reference, [names[1]]), use_backend("torch"):
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, **kw)
        return out[0, len(prompt):].tolist()

    want = generate(sequence_bias={(t,): b for t, b in bias.items()}, min_new_tokens=12)
    assert runs[0]["tokens"] == want != plain
    held = generate(eos_token_id=stop, min_new_tokens=6)  # (ends with the stop token where it stopped)
    stopped = stop in held[6:]
    assert runs[1]["tokens"] == (held[:6 + held[6:].index(stop)] if stopped else held)
    assert runs[1]["finish"] == ("stop" if stopped else "length") and len(runs[1]["tokens"]) >= 6
    assert runs[2]["tokens"] == plain[:plain.index(stop)] and runs[2]["finish"] == "stop"
    engine.shutdown(10)


def test_penalized_logits_equal_the_definitions():
    """``penalized`` row by row against transformers' repetition penalty (over prompt and output)
    and OpenAI's presence and frequency penalties (over the output), exactly; the engine's
    counting across steps is checked against ``generate`` above."""
    from bora_kernels.serve.engine import penalized

    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    prompts, outputs = [[1, 2], [3], []], [[2, 2, 5], [], [7]]
    repetition, presence, frequency = [1.3, 1.0, 0.7], [0.5, 0.0, -1.0], [0.2, 1.0, 0.0]
    column = lambda values: torch.tensor(values)[:, None]  # noqa: E731
    bincount = lambda ids: torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=10).float()  # noqa: E731
    counts = torch.stack([torch.stack([(bincount(p) > 0).float(), bincount(o)]) for p, o in zip(prompts, outputs)])
    got = penalized(logits, counts, column(repetition), column(presence), column(frequency))
    for row in range(3):
        ids = torch.tensor([prompts[row] + outputs[row]])
        want = transformers.RepetitionPenaltyLogitsProcessor(repetition[row])(ids, logits[row:row + 1].clone())
        counts = torch.bincount(torch.tensor(outputs[row], dtype=torch.long), minlength=10).float()
        want = want[0] - frequency[row] * counts - presence[row] * (counts > 0)
        assert torch.equal(got[row], want), row


def test_top_k_top_p_and_min_p_cut_the_distribution():
    """``truncated``: each row keeps its ``top_k`` most likely tokens, of those the fewest whose
    share of their mass reaches ``top_p``, of those the ones at least ``min_p`` times as likely as
    the first; the kept ones keep their probabilities."""
    from bora_kernels.serve.engine import truncated

    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    cases = [((0, 1.0, 0.0), [0.1, 0.5, 0.05, 0.2, 0.15]), ((-1, 1.0, 0.0), [0.1, 0.5, 0.05, 0.2, 0.15]),
             ((2, 1.0, 0.0), [0, 0.5, 0, 0.2, 0]), ((0, 0.6, 0.0), [0, 0.5, 0, 0.2, 0]),
             ((0, 0.75, 0.0), [0, 0.5, 0, 0.2, 0.15]),
             ((3, 0.8, 0.0), [0, 0.5, 0, 0.2, 0]),  # 0.8 of the top 3's 0.85: the third starts past it
             ((0, 1.0, 0.3), [0, 0.5, 0, 0.2, 0.15]), ((0, 1e-9, 0.0), [0, 0.5, 0, 0, 0]),
             ((4, 0.9, 0.35), [0, 0.5, 0, 0.2, 0])]
    rows = len(cases)
    column = lambda values, dtype: torch.tensor(values, dtype=dtype)[:, None]  # noqa: E731
    got = truncated(probs.repeat(rows, 1), column([c[0][0] for c in cases], torch.long),
                    column([c[0][1] for c in cases], torch.float), column([c[0][2] for c in cases], torch.float))
    for row, (cut, want) in enumerate(cases):
        assert torch.equal(got[row], torch.tensor(want)), cut


def test_token_logprobs_of_ruled_out_tokens_fit_in_json():
    """A token the model rules out (-inf logit) gets -9999.0 (as vLLM reports it), so a response
    holding it is valid JSON; the others are the exact log-softmax."""
    from bora_kernels.serve.engine import token_logprobs

    logits = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.5, -math.inf]])
    entries = token_logprobs(logits, torch.tensor([1, 0]), 3)
    assert entries[0].logprob == -9999.0 and entries[0].top[-1] == (1, -9999.0)
    assert entries[1].logprob == pytest.approx(float(logits[1].log_softmax(-1)[0]))
    assert [t for t, _ in entries[1].top] == [0, 1, 2]
    json.dumps([e._asdict() for e in entries], allow_nan=False)


def assert_entry(entry, token: int, want: torch.Tensor, k: int) -> None:
    """``entry`` is ``token``'s log-probability under ``want`` (a position's float64 log-softmax)
    with the ``k`` most likely tokens in order."""
    assert entry.token == token
    assert entry.logprob == pytest.approx(float(want[token]), abs=1e-4)
    top = want.topk(k)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def assert_prompt_logprobs(reference, adapter, prompt: list[int], entries: list, k: int) -> None:
    """``entries`` are ``prompt``'s log-probabilities under ``adapter`` (the first None)."""
    with bk.use_adapters(reference, [adapter]), use_backend("torch"), torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0].double().log_softmax(-1)
    assert entries[0] is None and len(entries) == len(prompt)
    for position, entry in enumerate(entries[1:]):
        assert_entry(entry, prompt[position + 1], want[position], k)


def test_logprobs_are_the_models_log_softmax(adapters, reference, monkeypatch):
    """Requests asking for log-probabilities (of the output, of the prompt, with 0 to 5
    alternatives, one scoring its prompt only) in a batch with requests that do not: each
    recorded entry is the adapter's log-softmax at that position (one forward over prompt and
    output, in float64), its alternatives are the most likely tokens in order, and the tokens are
    the greedy ones. Prefills that score nothing ask the model for the last position's logits only."""
    _, names = adapters
    engine = served(adapters, max_batch=4)
    keeps = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **kw: keeps.append(kw.get("logits_to_keep")) or forward(*a, **kw))
    start(engine)
    asks = [{"logprobs": 3}, {}, {"logprobs": 0, "prompt_logprobs": 2}, {"prompt_logprobs": 5, "max_tokens": 0},
            {"logprobs": 5}, {}]
    jobs = []
    for i, ask in enumerate(asks):
        prompt, adapter = [1 + i, 9, 4 + 2 * i, 7][: 2 + i % 3], [names[i], None][i % 2]
        jobs.append((prompt, adapter, ask, *collect(engine, prompt, adapter, SamplingParams(**{
            "max_tokens": 6, "temperature": 0, **ask}))))
    for prompt, adapter, ask, request, out in jobs:
        assert out["done"].wait(60)
        assert out["finish"] == "length"
        assert len(out["tokens"]) == ask.get("max_tokens", 6)
        if out["tokens"]:
            assert out["tokens"] == offline(reference, prompt, adapter, 6)
        ids = torch.tensor([prompt + out["tokens"]])
        with bk.use_adapters(reference, [adapter]), use_backend("torch"), torch.no_grad():
            want = reference(ids).logits[0].double().log_softmax(-1)
        entries = [(len(prompt) - 1 + j, e) for j, e in enumerate(request.logprobs)]
        assert len(request.logprobs) == (len(out["tokens"]) if "logprobs" in ask else 0)
        if "prompt_logprobs" in ask:
            assert request.prompt_logprobs[0] is None and len(request.prompt_logprobs) == len(prompt)
            entries += [(j, e) for j, e in enumerate(request.prompt_logprobs[1:])]
        else:
            assert request.prompt_logprobs is None
        for position, entry in entries:
            k = ask["logprobs"] if position >= len(prompt) - 1 else ask["prompt_logprobs"]
            assert_entry(entry, int(ids[0, position + 1]), want[position], k)
    assert keeps.count(1) == sum("prompt_logprobs" not in ask for ask in asks)  # one per such prefill
    assert keeps.count(None) == len(keeps) - keeps.count(1)
    engine.shutdown(30)


class StepGuide:
    """A guide that allows ``steps[i]`` as output token ``i`` and calls the output complete after
    ``len(steps)`` tokens; ``taken`` records what the engine told it."""

    def __init__(self, steps: list[list[int]]):
        self.steps, self.taken = steps, []

    def allowed(self) -> list[int]:
        return self.steps[len(self.taken)]

    def advance(self, token: int) -> bool:
        self.taken.append(token)
        return len(self.taken) == len(self.steps)


def test_guided_requests_choose_only_allowed_tokens(adapters, reference):
    """In one batch with an unguided request: a guided greedy request gives ``generate``'s tokens
    under the same allowed sets (``prefix_allowed_tokens_fn``) and ends with ``"stop"`` when its
    guide says it is complete; a guided sampled one draws only allowed tokens; a stop token the
    guide allows ends the output without reaching the guide; one whose guide allows nothing ends
    there as cut short (``"length"``); the unguided one is unchanged."""
    names = adapters[1]
    engine = start(served(adapters, max_batch=5))
    steps = [[5, 9, 30], [2, 3], [40, 41, 42, 43], [7], [11, 12, 13]]
    prompt = [4, 8, 15, 16]
    jobs = {}
    for key, adapter, guide, params in (("greedy", names[0], StepGuide(steps), {"temperature": 0}),
                                        ("free", names[1], None, {"temperature": 0}),
                                        ("sampled", names[2], StepGuide(steps), {"temperature": 1.5, "seed": 3}),
                                        ("stopped", names[3], StepGuide([[6, 7], [63], [1]]),
                                         {"temperature": 0, "stop_token_ids": (63,)}),
                                        ("stuck", names[0], StepGuide([[6, 7], torch.tensor([], dtype=torch.long)]),
                                         {"temperature": 0})):
        jobs[key] = (guide, collect(engine, prompt, adapter, SamplingParams(max_tokens=8, **params), guide)[1])
    for _, out in jobs.values():
        assert out["done"].wait(60)
    guide, out = jobs["greedy"]
    want = offline(reference, prompt, names[0], len(steps),
                   prefix_allowed_tokens_fn=lambda batch, ids: steps[len(ids) - len(prompt)])
    assert out["tokens"] == want == guide.taken and out["finish"] == "stop"
    assert want != offline(reference, prompt, names[0], len(steps))  # the guide changed the output
    assert jobs["free"][1]["tokens"] == offline(reference, prompt, names[1], 8)
    guide, out = jobs["sampled"]
    assert out["finish"] == "stop" and all(t in allowed for t, allowed in zip(out["tokens"], steps))
    assert len(out["tokens"]) == len(steps) and guide.taken == out["tokens"]
    guide, out = jobs["stopped"]
    assert out["finish"] == "stop" and len(out["tokens"]) == 1 and guide.taken == out["tokens"]
    guide, out = jobs["stuck"]
    first = offline(reference, prompt, names[0], 1, prefix_allowed_tokens_fn=lambda batch, ids: [6, 7])
    assert out["finish"] == "length" and out["tokens"] == guide.taken == first
    engine.shutdown(30)


def test_cancel_leaves_the_batch_and_others_continue(adapters, reference):
    """Stepped by hand, on the Triton kernels: the cancelled sequence leaves, the other one's
    output is unchanged."""
    root, names = adapters
    engine = served(adapters, max_batch=4)
    long_req, long_out = collect(engine, [1, 2, 3], names[0], SamplingParams(max_tokens=50, temperature=0))
    _, short_out = collect(engine, [4, 5], names[3], SamplingParams(max_tokens=6, temperature=0))
    engine.step()  # both prefilled (a token each), then one decode step (another each)
    engine.step()
    assert engine.batch_size() == 2
    engine.cancel(long_req)
    while not short_out["done"].is_set():
        engine.step()
    assert long_out["finish"] == "cancelled" and len(long_out["tokens"]) == 3
    assert short_out["tokens"] == offline(reference, [4, 5], names[3], 6)
    assert engine.batch_size() == 0 and engine._in_use[engine.adapters[names[0]]] == 0


def test_hot_load_unload_and_bad_adapters(adapters, reference, tmp_path):
    root, names = adapters
    engine = start(Engine(tiny_llama(), max_adapters=2, max_lora_rank=4))
    engine.load_adapter("a", root / names[1])  # rank 4
    with pytest.raises(ValueError, match="rank 8 .* more than the injected rank 4"):
        engine.load_adapter("b", root / names[2])
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter("a", root / names[1])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        engine.load_adapter("b", broken)
    config = json.loads((root / names[0] / "adapter_config.json").read_text())
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    (mismatched / "adapter_model.safetensors").write_bytes((root / names[0] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="expected"):
        engine.load_adapter("b", mismatched)
    assert engine.adapter_names() == ["a"]
    # the failed loads changed nothing: "a" still serves exactly
    _, out = collect(engine, [3, 1, 4], "a", SamplingParams(max_tokens=5, temperature=0))
    assert out["done"].wait(60) and out["tokens"] == offline(reference, [3, 1, 4], names[1], 5)

    # unload waits for the request in flight, which finishes in full
    req, out = collect(engine, [3, 1, 4], "a", SamplingParams(max_tokens=40, temperature=0))
    engine.unload_adapter("a", timeout=60)
    assert out["finish"] == "length" and out["tokens"] == offline(reference, [3, 1, 4], names[1], 40)
    with pytest.raises(UnknownAdapter, match="available: \\[\\]"):
        collect(engine, [1], "a", SamplingParams())
    assert all(int(layer.ranks.abs().sum()) == 0 for layer in engine.layers.values())
    engine.load_adapter("c", root / names[3])
    engine.load_adapter("d", root / names[4])
    with pytest.raises(ValueError, match="all 2 adapter slots are in use"):
        engine.load_adapter("e", root / names[0])
    _, out = collect(engine, [3, 1, 4], "d", SamplingParams(max_tokens=5, temperature=0))
    assert out["done"].wait(60) and out["tokens"] == offline(reference, [3, 1, 4], names[4], 5)
    engine.shutdown(10)


def test_embedding_adapters_serve_beside_linear_ones(adapters, tmp_path):
    """``embedding_adapters=True``: the slots hold LoRA on the token embedding (or trainable
    tokens) too, and adapters with and without them share decode steps, each answering as
    ``generate`` with it alone; without it, such an adapter is refused with the flag to use."""
    root, names = adapters
    source = _randomized_embedding_adapter(bk.inject(tiny_llama(), ["embed_tokens", "v_proj"], 1, r=6,
                                                     adapter_names=["emb"]))
    bk.save_peft_adapter(source, "emb", tmp_path / "emb")
    tokens = _randomized_embedding_adapter(bk.inject(tiny_llama(), ["v_proj"], 1, r=2, adapter_names=["tok"],
                                                     trainable_token_indices=[5, 7, 9]))
    with torch.no_grad():
        tokens.get_input_embeddings().token_values.normal_()
    bk.save_peft_adapter(tokens, "tok", tmp_path / "tok")
    folders = {"emb": tmp_path / "emb", "tok": tmp_path / "tok", names[0]: root / names[0]}
    reference = bk.load_peft_adapters(tiny_llama(), folders)
    with pytest.raises(ValueError, match="an embedding: bora-serve takes --embedding-adapters"):
        Engine(tiny_llama(), max_adapters=2, max_lora_rank=8).load_adapter("emb", folders["emb"])
    engine = Engine(tiny_llama(), max_adapters=3, max_lora_rank=8, embedding_adapters=True)
    assert isinstance(engine.model.get_input_embeddings(), bk.nn.MultiLoRAEmbedding) and len(engine.layers) == 15
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    jobs = [(prompt, name, collect(engine, prompt, name, SamplingParams(max_tokens=6, temperature=0))[1])
            for prompt in ([5, 9, 2], [7, 7]) for name in ("emb", "tok", names[0], None)]
    with use_backend("torch"):
        while not all(out["done"].is_set() for *_, out in jobs):
            engine.step()
    for prompt, name, out in jobs:
        assert out["tokens"] == offline(reference, prompt, name, 6), (name, prompt)
    for i in (0, 1):
        assert jobs[i][2]["tokens"] != offline(reference, [5, 9, 2], None, 6), "the embedding adapters change the output"


def _randomized_embedding_adapter(model):
    """Adapters strong enough to change greedy outputs (an embedding's A starts at zero)."""
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for layer in bk.model.adapter_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    return model


def test_evictable_adapters_give_up_their_slot(adapters, reference):
    """Stepped by hand, 2 slots: a load with ``evictable`` names takes the slot of the least
    recently used of them with no request queued or running and not ``held`` (never one with
    requests, never one not named); ``SlotsBusy`` when each has requests or is held. The new adapter and the one that kept
    its slot answer as ``generate`` does, and an evicted one loaded again does too."""
    root, names = adapters
    engine = served((root, names[:2]), max_adapters=2)  # names[0] in slot 0, names[1] in slot 1
    prompt = [3, 1, 4]

    def run(adapter, want):
        _, out = collect(engine, prompt, adapter, SamplingParams(max_tokens=5, temperature=0))
        with use_backend("torch"):
            while not out["done"].is_set():
                engine.step()
        assert out["tokens"] == offline(reference, prompt, want, 5), adapter

    run(names[1], names[1])
    run(names[0], names[0])  # names[1] is now the least recently used
    with pytest.raises(ValueError, match="all 2 adapter slots are in use"):
        engine.load_adapter(names[2], root / names[2])  # nothing evictable
    busy, _ = collect(engine, prompt, names[1], SamplingParams(max_tokens=5, temperature=0))  # queued
    engine.load_adapter(names[2], root / names[2], evictable={names[0], names[1]})
    assert sorted(engine.adapter_names()) == sorted([names[1], names[2]])  # names[0] went: names[1] has a request
    with pytest.raises(SlotsBusy, match="requests in flight"):
        engine.load_adapter(names[3], root / names[3], evictable={names[1]})
    engine.cancel(busy)
    with use_backend("torch"):
        engine.step()
    run(names[2], names[2])
    both = {names[1], names[2]}
    with pytest.raises(SlotsBusy):  # ``held``: requests on their way to both
        engine.load_adapter(names[0], root / names[0], evictable=both, held=both)
    engine.load_adapter(names[0], root / names[0], evictable=both, held={names[1]})  # names[1] is older, but held
    assert sorted(engine.adapter_names()) == sorted([names[0], names[1]])
    run(names[0], names[0])
    run(names[1], names[1])
    assert (engine.stats["adapter_loads"], engine.stats["adapter_evictions"]) == (4, 2)


def test_queue_limit_and_shutdown_finishes_work(adapters):
    root, names = adapters
    engine = served(adapters, max_queue=2)
    outs = [collect(engine, [1, 2], names[0], SamplingParams(max_tokens=4, temperature=0))[1] for _ in range(2)]
    with pytest.raises(QueueFull, match="max_queue=2"):
        collect(engine, [1, 2], names[0], SamplingParams())
    start(engine)
    engine.shutdown(30)
    assert all(o["finish"] == "length" and len(o["tokens"]) == 4 for o in outs)
    with pytest.raises(QueueFull, match="shutting down"):
        collect(engine, [1, 2], names[0], SamplingParams())


def test_bad_arguments():
    for kw, match in (({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
                      ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                      ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": "x"}, "seed"),
                      ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"min_p": 1.5}, "min_p"),
                      ({"min_p": float("nan")}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                      ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
                      ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"),
                      ({"prompt_logprobs": -1}, "prompt_logprobs"),
                      ({"max_tokens": 0, "logprobs": 1}, r"max_tokens: must be >= 1 \(0 only with prompt_logprobs\)"),
                      ({"min_tokens": 17}, r"min_tokens: must be an integer in \[0, max_tokens = 16\]"),
                      ({"min_tokens": -1}, "min_tokens"), ({"logit_bias": {3: 101}}, "logit_bias"),
                      ({"logit_bias": {"3": 1}}, "logit_bias"), ({"logit_bias": [3]}, "logit_bias")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        Engine(tiny_llama(), max_batch=0)
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        Engine(tiny_llama(), quantize="int8")
    with pytest.raises(ValueError, match="embedding_adapters must be a bool"):
        Engine(tiny_llama(), embedding_adapters="yes")
    with pytest.raises(ValueError, match="unquantized bases"):
        Engine(bk.inject(tiny_llama(), ["q_proj"], 2), quantize="nf4")
    qlora = bk.inject(tiny_llama(), ["q_proj", "embed_tokens"], 2, quantize="nf4")
    assert Engine(qlora, quantize="nf4").model is qlora  # already over NF4 (embeddings never are): served as it is
    engine = Engine(copy.deepcopy(tiny_llama()), max_adapters=1, max_lora_rank=2)
    for prompt, match in (([], "prompt: must be a non-empty list"), ("12", "prompt: must be a non-empty list"),
                          ([1, VOCAB], r"prompt: token ids must be ints in \[0, 64\)"), ([1, -1], "prompt: token ids"),
                          ([1, 2.0], "prompt: token ids")):
        with pytest.raises(ValueError, match=match):
            engine.submit(Request(prompt, None, SamplingParams(), lambda token, finish: None))
    with pytest.raises(ValueError, match=r"logit_bias: token ids must be in \[0, 64\)"):
        engine.submit(Request([1], None, SamplingParams(logit_bias={VOCAB: 1.0}), lambda token, finish: None))
    assert engine.queue_depth() == 0
    with pytest.raises(ValueError, match="adapter name must be a non-empty str"):
        engine.load_adapter("", "x")
    with pytest.raises(ValueError, match="is not a folder"):
        engine.load_adapter("x", "/nonexistent")


def test_guide_masks_are_built_once_per_state_and_kept_within_budget():
    """A guide state's mask is built and sent once, for the ids object its guide hands out at
    every step; the least recently used masks go once the kept ones pass the budget."""
    from bora_kernels.serve.engine import GuideMasks

    masks = GuideMasks(10, torch.device("cpu"), budget=30)  # three rows of 10 bytes
    first, second = torch.tensor([1, 3, 12], dtype=torch.int32), [0, 9]  # 12 lies past the vocabulary
    row = masks.row(first)
    assert row.tolist() == [i in (1, 3) for i in range(10)] and row.device.type == "cpu"
    assert masks.row(first) is row, "the same state's mask is not built again"
    second_row = masks.row(second)
    assert second_row.tolist() == [i in (0, 9) for i in range(10)]
    third = torch.tensor([5])
    third_row = masks.row(third)
    masks.row(first)  # used again: now the most recent
    masks.row(torch.tensor([7]))  # a fourth row: the least recently used (second) goes
    assert len(masks) == 3
    assert masks.row(first) is row and masks.row(third) is third_row
    again = masks.row(second)  # built anew, equal
    assert again is not second_row and torch.equal(again, second_row) and len(masks) == 3
