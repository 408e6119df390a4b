"""``bora-serve``: many adapters over one model behind an OpenAI-compatible HTTP API.

    bora-serve --demo                                  # the tiny demo model and its 8 adapters
    bora-serve --model DIR --adapters a=DIR_A b=DIR_B  # a Hugging Face model and PEFT adapters (folders
                                                       # or Hub ids: --model owner/model --adapters a=owner/lora,
                                                       # at a revision: a=owner/lora@v2)
    bora-serve --model DIR --adapter-root ROOT         # every sub-folder of ROOT is an adapter,
                                                       # and POST /v1/load_lora_adapter may load more from it
    bora-serve --model DIR --adapters ... --quantize nf4   # the adapters over a 4-bit NF4 base (QLoRA)
    bora-serve --model DIR-bnb-4bit --adapters ...     # a bitsandbytes 4-bit checkpoint, read without bitsandbytes

Then ``curl localhost:8000/v1/completions -d '{"model": "skip2", "prompt": "abc", "max_tokens": 8}'``
(``model`` is the adapter; the base model's name means none). SIGTERM or Ctrl-C stops taking
requests, finishes those in flight and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

from ..arguments import POSITIVE, POSITIVE_INT, available_device, number

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _parser() -> argparse.ArgumentParser:
    from .engine import SCHEDULES
    from .tools import TOOL_PARSERS

    p = argparse.ArgumentParser(prog="bora-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face model folder (or hub id) with its tokenizer")
    source.add_argument("--demo", nargs="?", const="runs/serve_demo", metavar="DIR",
                        help="the tiny demo model and its adapters (built in DIR first if missing; default %(const)s)")
    p.add_argument("--revision", help="the branch, tag or commit of a Hub --model (and its tokenizer)")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: the folder's name)")
    p.add_argument("--adapters", nargs="+", default=[], metavar="NAME=DIR",
                   help="PEFT adapters to load: folders, or Hugging Face Hub ids (owner/repo, or owner/repo@revision "
                        "for a branch, tag or commit)")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="load every adapter sub-folder of DIR, and allow run-time loads from inside it (only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=number(int, at_least=0, at_most=65535), default=8000)
    p.add_argument("--device", type=available_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="the ops' implementation (auto: the dispatch rule of ARCHITECTURE.md)")
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="store the frozen base weights of the adapted layers (every linear layer but the "
                        "output head) in NF4 (4-bit) under the adapters")
    p.add_argument("--max-adapters", type=POSITIVE_INT, default=16,
                   help="adapter slots (loaded at once); more adapters than slots are loaded when a request "
                        "names them, in the slot of the least recently used idle one")
    p.add_argument("--max-lora-rank", type=POSITIVE_INT, default=16, help="the largest adapter rank a slot holds")
    p.add_argument("--embedding-adapters", action="store_true",
                   help="slots take LoRA on the token embedding too (adapters whose target_modules name "
                        "embed_tokens): max-adapters x max-lora-rank x (vocabulary + hidden) parameters more")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=32, help="sequences in one decode step")
    p.add_argument("--prefix-cache-tokens", type=number(int, at_least=0), default=0,
                   help="prompt tokens whose keys and values are kept between requests, per adapter (0: off)")
    p.add_argument("--max-queue", type=POSITIVE_INT, default=256, help="waiting requests before 429")
    p.add_argument("--max-prompt-tokens", type=POSITIVE_INT, default=None, help="default: the model's context")
    p.add_argument("--max-tokens-limit", type=POSITIVE_INT, default=1024, help="the largest max_tokens a request may ask")
    p.add_argument("--max-choices", type=POSITIVE_INT, default=64,
                   help="the most choices one request may ask for (its prompts times n)")
    p.add_argument("--max-body-bytes", type=POSITIVE_INT, default=1 << 20, help="request body limit (413 past it)")
    p.add_argument("--request-timeout", type=POSITIVE, default=600.0, help="seconds before a request ends with 504")
    p.add_argument("--tool-call-parser", choices=list(TOOL_PARSERS), default=None,
                   help="how the model writes tool calls, for tool_choice \"auto\" (hermes: <tool_call> blocks, as "
                        "Hermes 2 Pro and Qwen 2.5 and later write them; llama3_json: Llama 3.1's JSON calls; "
                        "mistral: [TOOL_CALLS] and a JSON list or name[ARGS]{...}; pythonic: Llama 3.2 and 4's "
                        "[name(key=value, ...), ...]); "
                        "without it \"auto\" gets 400, while a named function and \"required\" work with any model")
    p.add_argument("--schedule", choices=SCHEDULES, default="mixed",
                   help="per-adapter: one adapter per batch (the baseline bora-bench serve compares with)")
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument("--log-level", default="info")
    return p


def _adapter_folders(parser, args, root: Path | None, defaults: dict) -> tuple[dict[str, Path], dict[str, str]]:
    """Each adapter's folder (or Hub id), and the revisions asked of Hub ids (``owner/repo@v2``;
    a folder that exists is a folder, ``@`` and all)."""
    folders, revisions = dict(defaults), {}
    for item in args.adapters:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--adapters takes NAME=DIR items, got {item!r}")
        if "@" in folder and not Path(folder).exists():
            folder, _, revision = folder.rpartition("@")
            if not folder or not revision:
                parser.error(f"--adapters takes NAME=OWNER/REPO@REVISION for a Hub revision, got {item!r}")
            revisions[name] = revision
        folders[name] = Path(folder)
    if root is not None:
        if not root.is_dir():
            parser.error(f"--adapter-root {str(root)!r} is not a folder")
        for sub in sorted(root.iterdir()):
            if (sub / "adapter_config.json").is_file():
                folders.setdefault(sub.name, sub)
    return folders, revisions


def build_server(argv=None):
    """Parse ``argv`` and load the model and adapters: returns ``(Server, args)``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..bnb_io import from_pretrained_4bit, from_pretrained_nf4, is_nf4_checkpoint
    from ..peft_io import read_peft_adapter
    from . import demo
    from .app import Limits, Server
    from .engine import DEFAULT_TARGETS, Engine

    parser = _parser()
    args = parser.parse_args(argv)
    defaults = {}
    if args.demo is not None:
        folder = demo.ensure(args.demo)
        path, name = folder / "base", args.served_model_name or demo.MODEL_NAME
        defaults = {n: folder / "adapters" / n for n in demo.ADAPTERS}
    else:
        path, name = args.model, args.served_model_name or Path(args.model.rstrip("/")).name
    if args.revision is not None and args.demo is not None:
        parser.error("--revision names a version of a Hub --model, not of --demo")
    root = Path(args.adapter_root) if args.adapter_root else None
    folders, revisions = _adapter_folders(parser, args, root, defaults)
    if name in folders:
        parser.error(f"adapter {name!r} has the base model's name; rename it or pass --served-model-name")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kwargs = {dtype_key: getattr(torch, DTYPES[args.dtype])} if DTYPES[args.dtype] else {}
    revision = {"revision": args.revision} if args.revision is not None else {}
    config = transformers.AutoConfig.from_pretrained(path, **revision)
    if is_nf4_checkpoint(config):  # a *-bnb-4bit model, without bitsandbytes
        model = from_pretrained_4bit(path, dtype=kwargs.get(dtype_key), device=device, **revision)
    elif args.quantize == "nf4" and getattr(config, "quantization_config", None) is None:  # never the dense model whole
        model = from_pretrained_nf4(path, DEFAULT_TARGETS, dtype=kwargs.get(dtype_key), device=device, **revision)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **revision).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, **revision)
    engine = Engine(model, max_adapters=args.max_adapters, max_lora_rank=args.max_lora_rank, max_batch=args.max_batch,
                    max_queue=args.max_queue, schedule=args.schedule, quantize=args.quantize,
                    prefix_cache_tokens=args.prefix_cache_tokens, embedding_adapters=args.embedding_adapters)
    for i, (adapter, folder) in enumerate(folders.items()):  # each is checked; the first fill the slots
        try:
            read = read_peft_adapter(engine.model, adapter, folder, revisions.get(adapter))
            if i < args.max_adapters:
                engine.install_adapter(adapter, read)
        except ValueError as err:
            parser.error(f"{err} (--max-lora-rank raises the slots' rank)" if "rank" in str(err) else str(err))
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                    max_choices=args.max_choices, max_body_bytes=args.max_body_bytes,
                    request_timeout=args.request_timeout)
    server = Server(engine, tokenizer, name, adapter_root=root, limits=limits,
                    registry={a: (f, revisions.get(a)) for a, f in folders.items()}, tool_parser=args.tool_call_parser)
    return server, args


def _uvicorn_server(config):
    import uvicorn

    class Graceful(uvicorn.Server):
        """uvicorn's server, except that after the graceful shutdown a SIGTERM or SIGINT ends the
        process with status 0 (uvicorn re-raises the signal, which kills it with the signal's)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Graceful(config)


def _quantized(model) -> str:
    """``", base in NF4: ..."`` (bytes per weight, measured) for a model with NF4 layers, else ``""``."""
    from ..nn import nf4_storage

    stored, weights = nf4_storage(model)
    size = f"{stored / 2 ** 20:.1f} MiB" if stored >= 2 ** 20 else f"{stored / 2 ** 10:.1f} KiB"
    return f", base in NF4: {stored / weights:.3f} bytes per weight, {size}" if weights else ""


def main(argv=None) -> int:
    import uvicorn

    from ..ops import use_backend
    from .app import create_app

    server, args = build_server(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with use_backend(None if args.backend == "auto" else args.backend):
        server.engine.start()  # the engine thread keeps the backend chosen here
    adapters = server.adapter_names()
    slots = len(server.engine.adapter_names())
    on_demand = f" ({slots} in slots, the others loaded on demand)" if slots < len(adapters) else ""
    print(f"bora-serve: {server.model_name} with {len(adapters)} adapters {adapters}{on_demand} on "
          f"http://{args.host}:{args.port} (schedule {args.schedule}{_quantized(server.engine.model)}; stop tokens "
          f"{list(server.eos)}" + "".join(f", default {k} {v:g}" for k, v in server.defaults.items()) + ")",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.no_access_log)
    _uvicorn_server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
