"""The ``model`` suite: a whole Llama, prefill and greedy generation, with a mixed batch.

Ours (``inject`` + ``use_adapters``) against PEFT's mixed batch (``adapter_names``), PEFT with a
single adapter for the whole batch (the lower bound any multi-adapter runtime aims at) and the
base model alone. Sequence ``i`` uses adapter ``i mod D``. A tiny Llama on CPU, a ~1.1B-parameter
Llama config (TinyLlama's shape, random weights: no download) in bf16 on a GPU. All seven
projections of every layer carry rank-16 adapters. The variants of a case are timed in
interleaved rounds (``timing.interleaved_medians``), not one after the other.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools

import torch

from .. import inject, use_adapters

INTERLEAVED_ROUNDS = {False: 5, True: 3}  # by --quick
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    # name: LlamaConfig fields
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "llama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}
VARIANTS = {
    "base": "the model without adapters",
    "ours": "bora_kernels: inject + use_adapters, one adapter per sequence",
    "peft_mixed": "PEFT mixed batch (adapter_names), one adapter per sequence",
    "peft_single": "PEFT with one adapter for the whole batch (the lower bound)",
}
MODES = ("prefill", "generate")
COMPARISONS = (
    ("ours", "peft_mixed", "speed-up over PEFT mixed batch"),
    ("ours", "peft_single", "speed against PEFT single adapter (>= 1/1.2 is the GPU goal)"),
    ("ours", "base", "cost over the base model"),
)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    model: str
    adapters: int
    batch: int
    length: int
    new_tokens: int
    rank: int
    dtype: str

    def __str__(self) -> str:
        return (f"{self.model}-D{self.adapters}-B{self.batch}-L{self.length}-gen{self.new_tokens}-"
                f"r{self.rank}-{self.dtype}")


def default_cases(device: torch.device, quick: bool = False) -> list[ModelCase]:
    if device.type == "cuda":
        return [ModelCase("llama-1.1b", d, 64, 128, 8 if quick else 16, 16, "bf16") for d in (1, 8, 64)]
    return [ModelCase("tiny", d, 16, 32, 4 if quick else 8, 16, "fp32") for d in ((8,) if quick else (1, 8, 64))]


def _llama(case: ModelCase, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**MODELS[case.model]))
    return model.to(dtype).eval()


def build(case: ModelCase, device: torch.device, variants=tuple(VARIANTS)) -> dict:
    """``{(variant, mode): fn}``; every fn runs one batch under ``torch.no_grad``."""
    from peft import LoraConfig, get_peft_model

    base = _llama(case, device)
    names = [f"task{d}" for d in range(case.adapters)]
    route = [d % case.adapters for d in range(case.batch)]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, MODELS[case.model]["vocab_size"], (case.batch, case.length), generator=gen).to(device)
    generate_kwargs = dict(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False,
                           pad_token_id=0)
    models = {"base": (base, {})}
    if "ours" in variants:
        ours = inject(copy.deepcopy(base), PROJECTIONS, case.adapters, r=case.rank, alpha=2 * case.rank,
                      adapter_names=names)
        for layer in ours.modules():
            if hasattr(layer, "lora_B"):
                torch.nn.init.normal_(layer.lora_B, std=0.01)  # nonzero, as trained adapters
        models["ours"] = (ours, None)
    if {"peft_mixed", "peft_single"} & set(variants):
        config = LoraConfig(r=case.rank, lora_alpha=2 * case.rank, target_modules=PROJECTIONS, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
        peft_model.set_adapter(names[0])
        peft_model.eval()
        models["peft_mixed"] = (peft_model, {"adapter_names": [names[d] for d in route]})
        models["peft_single"] = (peft_model, {})

    fns = {}
    for variant in variants:
        model, extra = models[variant]

        def run(call, model=model, extra=extra):
            # ours routes with use_adapters; PEFT's mixed batch passes adapter_names to each call
            routing = use_adapters(model, route) if extra is None else contextlib.nullcontext()
            with torch.no_grad(), routing:
                return call(model, extra or {})

        fns[variant, "prefill"] = functools.partial(run, lambda m, kw: m(input_ids=input_ids, **kw).logits)
        fns[variant, "generate"] = functools.partial(run, lambda m, kw: m.generate(input_ids=input_ids,
                                                                                   **generate_kwargs, **kw))
    return fns
