"""``bora_kernels.serve.ray`` on a local Ray instance (skipped when ray is not installed): the
adapter named by Ray's multiplexing header is loaded on demand, evicted when the replica's slots
are full, and greedy outputs equal offline ``generate`` with that adapter."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

import bora_kernels as bk  # noqa: E402
from bora_kernels.bench.serve import free_port  # noqa: E402
from bora_kernels.ops import use_backend  # noqa: E402
from bora_kernels.serve import demo  # noqa: E402
from bora_kernels.serve.ray import HEADER, bora_app  # noqa: E402


def offline(model, tokenizer, prompt, adapter, max_tokens):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with bk.use_adapters(model, [adapter]), use_backend("torch"):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens)
    return tokenizer.decode(out[0, ids.shape[1]:])


def test_ray_serve_multiplexes_adapters(serve_demo):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bora_app(str(serve_demo / "base"), str(serve_demo / "adapters"), max_adapters=2, max_lora_rank=8,
                           backend="torch", served_model_name="base"), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        model = transformers.AutoModelForCausalLM.from_pretrained(serve_demo / "base")
        bk.load_peft_adapters(model, {n: serve_demo / "adapters" / n for n in demo.ADAPTERS})
        tokenizer = transformers.AutoTokenizer.from_pretrained(serve_demo / "base")

        def ask(adapter, prompt="abc", stream=False, header=True):
            headers = {HEADER: adapter} if header else {}
            body = {"model": adapter, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
            r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
            return r

        # three adapters through two slots: the least recently used one is evicted and reloaded
        for adapter in ("skip1", "skip2", "skip3", "skip1", "base"):
            r = ask(adapter)
            assert r.status_code == 200, r.text
            want = offline(model, tokenizer, "abc", None if adapter == "base" else adapter, 6)
            assert r.json()["choices"][0]["text"] == want, adapter
        r = ask("skip4", stream=True)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        assert len(models) == 3 and models[0]["id"] == "base"  # the base and the two adapters held
        ids = httpx.post(url + "/tokenize", json={"prompt": "abc", "add_special_tokens": False}, timeout=30).json()["tokens"]
        assert ids == tokenizer("abc", add_special_tokens=False).input_ids
        assert httpx.post(url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"] == "abc"
        assert httpx.get(url + "/tokenizer_info", timeout=30).json()["eos_token"] == tokenizer.eos_token
        assert ask("skip9").status_code == 404
        assert ask("../outside").status_code == 403
        r = httpx.post(url + "/v1/completions", json={"model": "skip1", "prompt": "abc"}, headers={HEADER: "skip2"},
                       timeout=60)
        assert r.status_code == 400 and "differs from the" in r.json()["error"]["message"]
    finally:
        serve.shutdown()
        ray.shutdown()
