"""Eight task adapters on one tiny Llama, trained together in mixed batches.

A Llama is built from a config (no download) and every attention and MLP projection gets a
``MultiLoRALinear`` holding 8 adapters. Each task is a different rule for the next token
(``next = token + task + 1 mod V``). One mixed batch, where every sequence uses a different adapter
and some use none, runs forward and backward and is checked against running each sequence alone;
then a few optimizer steps train all 8 adapters at once, and the loss per task is printed.

With ``--quantize nf4`` the projections' frozen base weights are first stored in NF4 (4-bit,
bitsandbytes' format; QLoRA), and the 8 adapters train and serve over that one 4-bit base.

    python python/multi_task_lora.py [--steps 60] [--quantize nf4] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bora_kernels as bk
from bora_kernels.arguments import POSITIVE_INT, available_device
from bora_kernels.bora import sequence_losses

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def task_batch(tasks: torch.Tensor, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences whose next token is ``token + task + 1 (mod vocab)``, from a random start."""
    start = torch.randint(0, vocab, (len(tasks), 1), generator=gen)
    steps = torch.arange(length)[None, :] * (tasks[:, None] + 1)
    return (start + steps) % vocab


def loss_per_sequence(model, tokens: torch.Tensor) -> torch.Tensor:
    return sequence_losses(model(input_ids=tokens).logits, tokens)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=POSITIVE_INT, default=60)
    parser.add_argument("--quantize", choices=("nf4",), default=None, help="4-bit base weights (QLoRA)")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vocab, num_tasks, length = 64, 8, 24

    model = tiny_llama(vocab).to(device)
    bk.inject(model, PROJECTIONS, num_adapters=num_tasks, r=8, alpha=16, quantize=args.quantize)
    layers = [m for m in model.modules() if isinstance(m, bk.nn.MultiLoRALinear)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"tiny Llama on {device}: {len(layers)} projections with {num_tasks} adapters each, "
          f"{trainable:,} trainable parameters")
    if args.quantize:
        stored, weights = bk.nn.nf4_storage(model)
        print(f"  base projections in NF4: {stored / weights:.3f} bytes per weight (measured; bf16 takes 2, "
              f"fp32 4), {stored / 2 ** 10:.0f} KiB for {weights:,} weights")

    # 1. a mixed batch: sequence i uses adapter i, the last two no adapter
    for m in layers:  # B starts at zero; give the adapters something to say for the check
        torch.nn.init.normal_(m.lora_B, std=0.02)
    ids = torch.tensor(list(range(num_tasks)) + [-1, -1])
    tokens = task_batch(ids.clamp(min=0), length, vocab, gen).to(device)
    with bk.use_adapters(model, ids.to(device)):
        logits = model(input_ids=tokens).logits
        logits.float().square().mean().backward()
    worst = 0.0
    with torch.no_grad():
        for i, task in enumerate(ids.tolist()):
            with bk.use_adapters(model, torch.tensor([task], device=device)):
                alone = model(input_ids=tokens[i:i + 1]).logits
            worst = max(worst, (alone - logits[i:i + 1]).abs().max().item())
    grads = [m.lora_A.grad.abs().sum(dim=(1, 2)) for m in layers]
    with_grad = int((torch.stack(grads).sum(0) > 0).sum())
    print(f"mixed batch of {len(ids)} sequences (8 adapters + 2 without): forward and backward ran; "
          f"max |mixed - alone| = {worst:.2e}; adapters with a gradient: {with_grad}/{num_tasks}")
    model.zero_grad(set_to_none=True)
    for m in layers:
        m.reset_lora_parameters()

    # 2. train all adapters at once on mixed batches of the 8 tasks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    eval_tasks = torch.arange(num_tasks).repeat_interleave(4)
    eval_tokens = task_batch(eval_tasks, length, vocab, torch.Generator().manual_seed(1)).to(device)

    def task_losses() -> list[float]:
        with torch.no_grad(), bk.use_adapters(model, eval_tasks.to(device)):
            per_seq = loss_per_sequence(model, eval_tokens)
        return [per_seq[eval_tasks == t].mean().item() for t in range(num_tasks)]

    before = task_losses()
    start = time.perf_counter()
    for _ in range(args.steps):
        tasks = torch.randint(0, num_tasks, (32,), generator=gen)
        batch = task_batch(tasks, length, vocab, gen).to(device)
        with bk.use_adapters(model, tasks.to(device)):
            loss = loss_per_sequence(model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    after = task_losses()
    with torch.no_grad(), bk.use_adapters(model, None):
        base = loss_per_sequence(model, eval_tokens).mean().item()

    print(f"{args.steps} steps of 32 mixed sequences in {seconds:.1f} s; loss per task "
          f"(base model without adapters: {base:.3f}):")
    print("  task  " + "  ".join(f"{t:>6d}" for t in range(num_tasks)))
    print("  before" + "  ".join(f"{v:6.3f}" for v in before))
    print("  after " + "  ".join(f"{v:6.3f}" for v in after))
    improved = sum(a < b for a, b in zip(after, before))
    print(f"{improved}/{num_tasks} tasks improved")


if __name__ == "__main__":
    main()
