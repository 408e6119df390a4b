"""The serving engine as a Ray Serve deployment: adapters spread over replicas (and machines) by
Ray's model multiplexing, the adapter's name being the multiplexed model id.

Each replica holds one base model and an ``Engine`` with ``max_adapters`` slots. A request names
its adapter twice: in the ``serve_multiplexed_model_id`` header, which Ray's proxy reads to send
it to a replica that has the adapter loaded already, and as ``model`` in the OpenAI body. The
replica loads an adapter it lacks from ``adapter_root/<name>`` (the same root checks as
``bora-serve``'s run-time loads), and when it holds ``max_adapters`` already, Ray unloads the
least recently used one, which waits for that adapter's requests in flight. Within a replica the
requests of all its adapters share each decode step, as in ``bora-serve``.

    import ray
    from ray import serve
    from bora_kernels.serve.ray import bora_app

    serve.run(bora_app("runs/serve_demo/base", "runs/serve_demo/adapters", num_replicas=2))
    # curl localhost:8000/v1/completions -H 'serve_multiplexed_model_id: skip2' \\
    #      -d '{"model": "skip2", "prompt": "abc", "max_tokens": 8}'

Needs ``pip install 'bora_kernels[ray]'``. Routes: ``POST /v1/completions``,
``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models`` (this replica's adapters),
``GET /health``, and the tokenizer's ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from ray import serve
from starlette.requests import Request as HTTPRequest

HEADER = "serve_multiplexed_model_id"


class _Loaded:
    """An adapter in a replica's engine; Ray calls ``__del__`` when it evicts it."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.unloaded = engine, name, False

    def __del__(self):
        from .engine import UnknownAdapter

        if not self.unloaded:  # Ray calls it once on eviction; the garbage collector may again
            self.unloaded = True
            with contextlib.suppress(UnknownAdapter):
                self.engine.unload_adapter(self.name)


def bora_app(model: str, adapter_root: str, *, max_adapters: int = 16, max_lora_rank: int = 16,
             max_batch: int = 32, max_queue: int = 256, served_model_name: str | None = None, device: str | None = None,
             backend: str | None = None, num_replicas: int = 1, ray_actor_options: dict | None = None,
             tool_parser: str | None = None):
    """A Ray Serve application: ``num_replicas`` replicas of ``model`` (a Hugging Face folder or
    hub id) serving the adapters under ``adapter_root``. ``backend``: force the ops' ``"triton"``
    or ``"torch"`` path (default: the dispatch rule); ``tool_parser``: as ``--tool-call-parser``."""

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=ray_actor_options or {})
    class BoraServe:
        def __init__(self):
            from pathlib import Path

            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from ..ops import use_backend
            from .app import Server
            from .engine import Engine

            target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            base = AutoModelForCausalLM.from_pretrained(model).to(target)
            engine = Engine(base, max_adapters=max_adapters, max_lora_rank=max_lora_rank, max_batch=max_batch,
                            max_queue=max_queue)
            name = served_model_name or Path(str(model).rstrip("/")).name
            self.server = Server(engine, AutoTokenizer.from_pretrained(model), name, adapter_root=adapter_root,
                                 tool_parser=tool_parser)
            with use_backend(backend):
                engine.start()

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str) -> _Loaded:
            folder = self.server.inside_root(name)
            await asyncio.to_thread(self.server.engine.load_adapter, name, folder)
            self.server.adapter_paths[name] = folder
            return _Loaded(self.server.engine, name)

        async def __call__(self, http: HTTPRequest):
            from .app import APIError, _bad

            server = self.server
            try:
                path = http.url.path.rstrip("/")
                if http.method == "GET" and path.endswith("/health"):
                    return server.health()
                if http.method == "GET" and path.endswith("/v1/models"):
                    return server.models()
                if http.method == "GET" and path.endswith("/tokenizer_info"):
                    return server.tokenizer_info()
                if http.method == "POST" and path.endswith("/tokenize"):
                    return await server.tokenize(http)
                if http.method == "POST" and path.endswith("/detokenize"):
                    return await server.detokenize(http)
                chat = path.endswith("/v1/chat/completions")
                if http.method != "POST" or not (chat or path.endswith("/v1/completions")):
                    raise APIError(404, f"no route {http.method} {path}")
                body = await server.read_json(http)
                adapter = serve.get_multiplexed_model_id() or body.get("model")
                if body.get("model") != adapter:
                    raise _bad("model", f"{json.dumps(body.get('model'))} differs from the {HEADER} header {adapter!r}")
                if adapter == server.model_name or not isinstance(adapter, str) or not adapter:
                    return await server.generate(http, chat, body)
                if adapter not in server.engine.adapters:  # 403 outside the root, before Ray's loader wraps it
                    server.inside_root(adapter, "model", missing=404)
                for attempt in (0, 1):  # Ray may evict it between the load and the submit: load again
                    await self.adapter(adapter)
                    try:
                        return await server.generate(http, chat, body)
                    except APIError as err:
                        if err.code != "model_not_found" or attempt:
                            raise
            except APIError as err:
                return server.error_response(err)

    return BoraServe.bind()


__all__ = ["bora_app", "HEADER"]
