"""Serve PEFT adapters together: load four PEFT LoRA adapters into one model, run a mixed batch,
generate, and save one adapter back in PEFT's format.

A tiny Llama is built from a config (no download). PEFT trains nothing here: it creates four
adapters with different ranks, alphas, rsLoRA, DoRA and target modules (random weights) and
writes them with ``save_pretrained``, as a user's fine-tuning runs would. Then:

1. ``bk.load_peft_adapters`` stacks the four folders into one model;
2. one batch where each sequence picks its adapter (or none) is checked, sequence by sequence,
   against PEFT running that adapter alone, and ``generate`` holds the ids through decoding;
3. ``bk.save_peft_adapter`` writes one adapter back, and PEFT loads it with the same outputs.

    python python/peft_adapters.py [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import bora_kernels as bk
from bora_kernels.arguments import output_folder

ADAPTERS = {
    "summarize": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "translate": dict(r=16, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "classify": dict(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True),
    "extract": dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                    rank_pattern={"down_proj": 6}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_folder, help="folder for the adapters (default: a temporary folder)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bora-peft-"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config).eval()

    folders = {}
    for name, settings in ADAPTERS.items():
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **settings))
        with torch.no_grad():  # DoRA's magnitudes start at the norms (a scale of 1); move them as training would
            for key, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in key:
                    p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=torch.Generator().manual_seed(2)))
        folders[name] = out / name
        peft_model.save_pretrained(folders[name])
    print(f"PEFT saved {len(folders)} adapters under {out}")

    # the two lines a user writes
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    print("loaded:", bk.summary(model))

    route = ["summarize", "translate", None, "classify", "extract", "translate"]
    input_ids = torch.randint(1, config.vocab_size, (len(route), 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), bk.use_adapters(model, route):
        logits = model(input_ids=input_ids).logits
        tokens = model.generate(input_ids=input_ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                pad_token_id=0)

    reference = PeftModel.from_pretrained(copy.deepcopy(base), folders["summarize"], adapter_name="summarize")
    for name in list(ADAPTERS)[1:]:
        reference.load_adapter(folders[name], adapter_name=name)
    worst, same_tokens = 0.0, 0
    for i, name in enumerate(route):
        with torch.no_grad():
            if name is None:
                with reference.disable_adapter():
                    ref = reference(input_ids=input_ids[i:i + 1]).logits
                    ref_tokens = reference.generate(input_ids=input_ids[i:i + 1], max_new_tokens=6, min_new_tokens=6,
                                                    do_sample=False, pad_token_id=0)
            else:
                reference.set_adapter(name)
                ref = reference(input_ids=input_ids[i:i + 1]).logits
                ref_tokens = reference.generate(input_ids=input_ids[i:i + 1], max_new_tokens=6, min_new_tokens=6,
                                                do_sample=False, pad_token_id=0)
        worst = max(worst, ((logits[i:i + 1] - ref).norm() / ref.norm()).item())
        same_tokens += torch.equal(tokens[i:i + 1], ref_tokens)
    print(f"mixed batch of {len(route)} sequences ({', '.join(str(n) for n in route)}): largest relative "
          f"error against PEFT running each adapter alone {worst:.1e}; generated tokens equal for "
          f"{same_tokens}/{len(route)} sequences")

    saved = bk.save_peft_adapter(model, "classify", out / "classify-resaved")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), saved)
    with torch.no_grad():
        diff = (reloaded(input_ids=input_ids[3:4]).logits - logits[3:4]).abs().max().item()
    print(f"saved 'classify' back to {saved}; PEFT loads it and matches ours to {diff:.1e}")
    if worst > 1e-5 or same_tokens != len(route) or diff > 1e-4:
        raise SystemExit("demo check failed")


if __name__ == "__main__":
    main()
