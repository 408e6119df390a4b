"""``bora-bench``: time the ops against their baselines and print (or save) the ratios.

    bora-bench lora [--device cpu|cuda] [--quick] [--json FILE] [--tokens ...] [--adapters ...]
                    [--ranks ...] [--features K N] [--dtype bf16]
    bora-bench dora [the options of lora]
                    MultiLoRALinear with DoRA adapters against PEFT's DoRA layer, one adapter at a time
    bora-bench model [--device cpu|cuda] [--quick] [--json FILE] [--adapters ...]
                    a whole Llama: prefill and greedy generation with a mixed batch
    bora-bench context [--device cpu|cuda] [--quick] [--json FILE] [--tokens ...] [--contexts ...]
                    context_lora_delta against Algorithm 1's einsum and the masked concatenation
    bora-bench ivon [--device cpu|cuda] [--quick] [--json FILE] [--params ...] [--tensors T]
                    one IVON step plus the next sample against ivon-opt, AdamW and a device copy
    bora-bench nf4  [--device cpu|cuda] [--quick] [--json FILE] [--tokens ...] [--features K N]
                    nf4_matmul against bitsandbytes matmul_4bit and the dense weight
    bora-bench serve [--device cpu|cuda] [--quick] [--json FILE] [--model DIR] [--requests N]
                    [--concurrency C] [--adapters A] [--slots S] [--max-tokens T] [--time-limit S] [--quantize nf4]
                    a load test of bora-serve on loopback against one-adapter-per-batch serving
    bora-bench all  [--device ...] [--quick] [--json FILE]       every op and model suite
    bora-bench table [--results DIR] [--readme README.md]         README table from result files

``--graph`` (lora, context, nf4, ivon; CUDA only) times each call replayed from a CUDA graph: the
device work alone, without the host time that bounds small calls (what a loop that captures its
steps pays). Variants that cannot be captured (a host sync) are listed as not captured.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

from ..arguments import POSITIVE, POSITIVE_INT, number, output_file
from ..ops import use_backend
from . import context, dora, ivon, lora, model, nf4, serve
from .report import format_table, write_readme_table
from .timing import (GRAPH_TIMER, NotCapturable, environment, graph_median_seconds, interleaved_medians,
                     median_seconds, peak_extra_mib)

SUITES = {"lora": lora, "dora": dora, "model": model, "context": context, "ivon": ivon, "nf4": nf4}


def run_suite(module, cases, device: torch.device, quick: bool, variants=None, echo=print,
              graph: bool = False) -> list[dict]:
    """Time every (case, variant, mode); returns one record per (case, mode). On CUDA a record
    also holds each variant's peak memory beyond what was allocated before the call (MiB). A
    variant that does not apply to a case (``build`` leaves it out) is skipped there. ``graph``
    (CUDA, op suites; the caller labels the result file's timer) times device work alone,
    replayed from CUDA graphs; a variant that cannot be captured is left out of the times and its
    reason kept under ``not_captured``; a suite whose callables differ when captured (``ivon``:
    capturable optimizers) builds them with its ``build_captured``."""
    asked = tuple(variants or module.VARIANTS)
    rounds = getattr(module, "INTERLEAVED_ROUNDS", None)  # long calls: see interleaved_medians
    if graph and rounds:
        raise ValueError("graph timing is for the op suites (lora, context, nf4, ivon), not whole models")
    build = getattr(module, "build_captured", module.build) if graph else module.build
    records = []
    for case in cases:
        fns = build(case, device, asked)
        for mode in module.MODES:
            variants = [v for v in asked if (v, mode) in fns]
            peaks = {v: peak_extra_mib(fns[v, mode], device) for v in variants} if device.type == "cuda" else None
            not_captured = {}
            if rounds:
                seconds = interleaved_medians({v: fns[v, mode] for v in variants}, device, rounds[quick])
                times = {v: t * 1e3 for v, t in seconds.items()}
            elif graph:
                times = {}
                for v in variants:
                    try:
                        times[v] = graph_median_seconds(fns[v, mode], device, quick) * 1e3
                    except NotCapturable as error:
                        not_captured[v] = str(error)
                        echo(f"  {case} {mode}: {v} not captured ({error})", file=sys.stderr)
            else:
                times = {v: median_seconds(fns[v, mode], device, quick) * 1e3 for v in variants}
            comparisons = [
                {"ours": ours, "baseline": base, "meaning": meaning, "ours_ms": times[ours],
                 "baseline_ms": times[base], "ratio": times[base] / times[ours]}
                for ours, base, meaning in module.COMPARISONS if ours in times and base in times
            ]
            records.append({"case": str(case), "shape": vars(case), "mode": mode,
                            "median_ms": times, "comparisons": comparisons})
            if rounds:
                records[-1]["timer"] = f"median of {rounds[quick]} interleaved rounds, perf_counter"
            if not_captured:
                records[-1]["not_captured"] = not_captured
            if peaks is not None:
                records[-1]["peak_extra_mib"] = peaks
            if hasattr(case, "bytes_moved"):  # memory-bound suites count the bytes they must move
                records[-1]["bytes_moved"] = case.bytes_moved
            echo(f"  {case} {mode}: " + ", ".join(f"{v} {t:.3f} ms" for v, t in times.items()),
                 file=sys.stderr)
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bora-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", choices=("cpu", "cuda"),
                       default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--quick", action="store_true", help="headline cases only, short timing")
        p.add_argument("--json", type=output_file, metavar="FILE", help="write the results file (see ARCHITECTURE.md)")

    def graph_option(p):
        p.add_argument("--graph", action="store_true",
                       help="CUDA only: time each call replayed from a CUDA graph (device work without host "
                            "time, L2 flushed before each call); variants that cannot be captured are reported")

    for name, module, text in (("lora", lora, "lora_delta and MultiLoRALinear against PEFT and F.linear"),
                               ("dora", dora, "MultiLoRALinear with DoRA adapters against PEFT's DoRA layer")):
        p_lora = sub.add_parser(name, help=text)
        common(p_lora)
        p_lora.add_argument("--tokens", type=POSITIVE_INT, nargs="+", help="tokens per batch")
        p_lora.add_argument("--adapters", type=POSITIVE_INT, nargs="+", help="adapters in the mix")
        p_lora.add_argument("--ranks", type=POSITIVE_INT, nargs="+", help="LoRA ranks")
        p_lora.add_argument("--features", type=POSITIVE_INT, nargs=2, metavar=("K", "N"), help="in and out features")
        p_lora.add_argument("--dtype", choices=tuple(lora.DTYPES), help="input and weight dtype")
        p_lora.add_argument("--variants", nargs="+", choices=tuple(module.VARIANTS), help="subset to time")
        graph_option(p_lora)

    p_model = sub.add_parser("model", help="a whole Llama (prefill, generate) against PEFT")
    common(p_model)
    p_model.add_argument("--adapters", type=POSITIVE_INT, nargs="+", help="adapters in the mix")
    p_model.add_argument("--variants", nargs="+", choices=tuple(model.VARIANTS), help="subset to time")

    p_context = sub.add_parser("context", help="context_lora_delta against the einsum and masked concatenation")
    common(p_context)
    p_context.add_argument("--tokens", type=number(int, at_least=context.SEQUENCE, multiple_of=context.SEQUENCE),
                           nargs="+", help=f"tokens per batch (multiples of {context.SEQUENCE})")
    p_context.add_argument("--contexts", type=POSITIVE_INT, nargs="+", help="numbers of contexts")
    p_context.add_argument("--variants", nargs="+", choices=tuple(context.VARIANTS), help="subset to time")
    graph_option(p_context)

    p_ivon = sub.add_parser("ivon", help="the IVON step against ivon-opt, AdamW and a device copy")
    common(p_ivon)
    graph_option(p_ivon)
    p_ivon.add_argument("--params", type=POSITIVE_INT, nargs="+", help="parameter counts (elements)")
    p_ivon.add_argument("--tensors", type=POSITIVE_INT, help="how many tensors hold them (default 256)")
    p_ivon.add_argument("--variants", nargs="+", choices=tuple(ivon.VARIANTS), help="subset to time")

    p_nf4 = sub.add_parser("nf4", help="nf4_matmul against bitsandbytes and the dense weight")
    common(p_nf4)
    p_nf4.add_argument("--tokens", type=POSITIVE_INT, nargs="+", help="rows M of the activations")
    p_nf4.add_argument("--features", type=POSITIVE_INT, nargs=2, metavar=("K", "N"), help="in and out features")
    p_nf4.add_argument("--variants", nargs="+", choices=tuple(nf4.VARIANTS), help="subset to time")
    graph_option(p_nf4)

    p_serve = sub.add_parser("serve", help="load test of bora-serve against one adapter per batch")
    common(p_serve)
    p_serve.add_argument("--model", help="a Hugging Face model folder (default: the serving demo's model)")
    p_serve.add_argument("--requests", type=POSITIVE_INT, help="requests to send (default 256; --quick 64)")
    p_serve.add_argument("--concurrency", type=POSITIVE_INT, help="concurrent clients, also --max-batch (default 32; --quick 16)")
    p_serve.add_argument("--adapters", type=POSITIVE_INT, help="adapters the requests spread over (default 16; --quick 8)")
    p_serve.add_argument("--max-tokens", type=POSITIVE_INT, help="tokens generated per request (default 32; --quick 16)")
    p_serve.add_argument("--slots", type=POSITIVE_INT,
                         help="adapter slots of both servers (default: one per adapter; fewer: loaded on demand)")
    p_serve.add_argument("--time-limit", type=POSITIVE, default=600.0, help="seconds per server before requests count as lost")
    p_serve.add_argument("--quantize", choices=("nf4",), default=None,
                         help="both servers keep the base weights in NF4 (bora-serve --quantize nf4)")

    p_all = sub.add_parser("all", help="every suite with its default grid")
    common(p_all)

    p_table = sub.add_parser("table", help="print the results table; --readme rewrites README's")
    p_table.add_argument("--results", default="benchmarks/results", help="folder of result files")
    p_table.add_argument("--readme", help="README to update between its results markers")
    return parser


def _lora_cases(args, device):
    """The cases of the lora or dora suite: its default grid, or the one the flags give."""
    if not any((args.tokens, args.adapters, args.ranks, args.features, args.dtype)):
        return SUITES[args.command].default_cases(device, args.quick)
    k, n = args.features or ((4096, 4096) if device.type == "cuda" else (1024, 1024))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return [lora.LoraCase(t, d, r, k, n, dtype) for t, d, r in itertools.product(
        args.tokens or [4096 if device.type == "cuda" else 256],
        args.adapters or [32 if device.type == "cuda" else 16],
        args.ranks or [16])]


def _write_json(file: str | None, result: dict) -> None:
    if file:
        path = Path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def _serve(args, device: torch.device) -> int:
    case = dataclasses.replace(serve.QUICK) if args.quick else serve.LoadCase()
    for name in ("requests", "concurrency", "adapters", "max_tokens", "time_limit", "slots"):
        value = getattr(args, name)
        if value is not None:
            setattr(case, name, value)
    case.quantize = args.quantize
    env = environment(device)
    print(f"bora-bench serve on {env['device']}", file=sys.stderr)
    result = {"environment": env, "quick": args.quick, "serve": serve.run(case, args.model, device.type)}
    print(serve.format_result(result["serve"], env["device"]))
    _write_json(args.json, result)
    runs = result["serve"]["runs"].values()
    return 0 if all(r["failed"] == 0 and r["lost"] == 0 for r in runs) else 1


def _check_together(parser, args) -> None:
    """What one flag's type cannot check alone."""
    tensors = getattr(args, "tensors", None) or ivon.IVONCase.tensors
    if args.command == "ivon" and any(n < tensors for n in args.params or ()):
        parser.error(f"--params: each count must be >= --tensors ({tensors} tensors hold it), got {args.params}")
    if args.command == "nf4" and args.features and args.features[0] % nf4.BLOCKSIZE:
        parser.error(f"--features: K must be a multiple of the NF4 blocksize {nf4.BLOCKSIZE}, got {args.features[0]}")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_together(parser, args)
    if args.command == "table":
        if args.readme:
            write_readme_table(Path(args.results), Path(args.readme))
            print(f"updated the results table in {args.readme}")
        else:
            print(format_table([json.loads(p.read_text()) for p in sorted(Path(args.results).glob("*.json"))]))
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bora-bench: --device cuda but no CUDA device is visible")
    graph = getattr(args, "graph", False)
    if graph and device.type != "cuda":
        raise SystemExit(f"bora-bench {args.command}: --graph times CUDA graph replays and needs --device cuda "
                         f"(the device is {device.type})")
    if args.command == "serve":
        return _serve(args, device)
    if args.command in ("lora", "dora"):
        plan = {args.command: (_lora_cases(args, device), args.variants)}
    elif args.command == "model":
        cases = model.default_cases(device, args.quick)
        if args.adapters:
            cases = [dataclasses.replace(cases[0], adapters=d) for d in args.adapters]
        plan = {"model": (cases, args.variants)}
    elif args.command == "context":
        cases = context.default_cases(device, args.quick)
        if args.tokens or args.contexts:
            cases = [dataclasses.replace(cases[-1], tokens=t, contexts=c) for t, c in itertools.product(
                args.tokens or [cases[-1].tokens], args.contexts or [2, 4, 8])]
        plan = {"context": (cases, args.variants)}
    elif args.command == "ivon":
        cases = ivon.default_cases(device, args.quick)
        if args.params or args.tensors:
            tensors = args.tensors or ivon.IVONCase.tensors
            cases = [ivon.IVONCase(n, tensors) for n in (args.params or [c.params for c in cases])]
        plan = {"ivon": (cases, args.variants)}
    elif args.command == "nf4":
        cases = nf4.default_cases(device, args.quick)
        if args.tokens or args.features:
            k, n = args.features or (cases[0].in_features, cases[0].out_features)
            cases = [nf4.NF4Case(m, k, n, cases[0].dtype) for m in (args.tokens or sorted({c.m for c in cases}))]
        plan = {"nf4": (cases, args.variants)}
    else:
        plan = {name: (module.default_cases(device, args.quick), None) for name, module in SUITES.items()}

    result = {"environment": environment(device), "quick": args.quick, "suites": {}}
    if graph:
        result["environment"]["timer"] = GRAPH_TIMER
    print(f"bora-bench on {result['environment']['device']}", file=sys.stderr)
    # CPU figures are for the torch path: the interpreter, if set, must never be timed
    with use_backend("torch" if device.type == "cpu" else None):
        for name, (cases, variants) in plan.items():
            result["suites"][name] = run_suite(SUITES[name], cases, device, args.quick, variants, graph=graph)
    print(format_table([result]))
    _write_json(args.json, result)
    return 0
