"""QLoRA (an NF4 base) against LoRA on a bf16 base: memory, perplexity and forgetting.

The same fine-tune twice, measured as Mai's evaluation of slimming LLMs with LoRA/QLoRA does, at
laptop scale:

- A tiny Llama (built from a config, no download) is pre-trained on a generic mixture: text from a
  bigram chain over 56 words, sums ``ADD a b EQ a+b`` of digits and a table of facts
  ``FACT s R t``. Three held-out multiple-choice tasks come from that mixture, each with 4
  options scored by their log-likelihood after the prompt (lm-evaluation-harness' rule):
  ``arithmetic`` (the paper's GSM8K), ``continuation`` (4 continuations of a generic text, the
  paper's HellaSwag) and ``facts`` (the paper's MMLU).
- The fine-tuning task (the paper's Alpaca): documents of a domain whose text differs from the
  generic chain in word frequencies and bigrams. 512 training documents, several epochs.
- The same LoRA fine-tune (r=8 on every linear layer of the blocks, the same initialisation,
  data order and steps) over the base in bf16 and over the base quantized to NF4 by
  ``inject(..., quantize="nf4")`` (blocksize 64, double quantization; QLoRA). Adapters train in
  fp32, the base computes in bf16.

Out: the bytes of the base's linear weights and of the whole model, the peak memory of
fine-tuning (CUDA only), the domain's test perplexity and the task's gain for both bases with and
without the adapter, and each held-out task's accuracy with the forgetting rate
``FR = 1 - acc_ft / acc_base`` against the bf16 base model. The task's gain is the change in
``domain continuation`` accuracy: which of 4 continuations of a domain text's prefix is the
domain's, the other 3 continuing the same prefix in the generic text's style (so the base model,
which prefers the generic style, scores below chance). ``results.json`` and
``qlora.png`` go to ``--out``.

QLoRA's claim to check: 4-bit base weights (about a quarter of the bf16 bytes) fine-tune as well
as the bf16 base, and forget no more. Found (full mode, 3 seeds, mean ± standard error): NF4
takes 0.258 of the bf16 bytes; domain perplexity 6.05 ±0.31 against 6.04 ±0.29, task gain +67.3
points for both; forgetting rates (arithmetic / continuation / facts) 40.6 / 25.4 / 15.0% against
33.6 / 25.2 / 13.7%, equal within their standard errors (about 8, 2 and 7 points).

    python python/qlora.py --quick     # 3 seeds, ~2 minutes on a laptop CPU (--seeds 1: 30 s)
    python python/qlora.py             # a wider, deeper model, longer training, 3 seeds (~20 minutes)
    python python/qlora.py --device cuda   # the same on a GPU (the Triton NF4 and LoRA kernels)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import bora_kernels as bk
from bora_kernels.arguments import POSITIVE_INT, available_device, output_folder
from bora_kernels.bora import sequence_losses
from bora_kernels.nn import MultiLoRALinear, NF4Linear
from bora_multitask import _shift, sample_chain  # the generated bigram text

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS, DIGITS, SUBJECTS = 56, 10, 32           # tokens 0..55 are words; the first 19 are numbers
ADD, EQ, FACT = 56, 57, 58
RELATIONS = torch.tensor([59, 60, 61, 62])
VOCAB, OPTIONS, DOC_LEN = 64, 4, 20
HELD_OUT = ("arithmetic", "continuation", "facts")


@dataclasses.dataclass
class Config:
    hidden: int
    layers: int
    pretrain_steps: int
    finetune_steps: int
    batch: int = 32
    lr: float = 2e-3
    rank: int = 8
    questions: int = 400


QUICK = Config(hidden=128, layers=2, pretrain_steps=600, finetune_steps=200)
FULL = Config(hidden=256, layers=4, pretrain_steps=2000, finetune_steps=600)


# ---------------------------------------------------------------------- the data
def make_world(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the Dirichlet draws use the global generator
    generic = torch.distributions.Dirichlet(torch.full((WORDS,), 0.1)).sample((WORDS,)).clamp(min=1e-6).log()
    generic = generic - generic.logsumexp(1, keepdim=True)
    domain = generic + _shift(WORDS, 1.5, 2, 1.0, gen)
    facts = torch.randint(0, WORDS, (SUBJECTS, len(RELATIONS)), generator=gen)
    docs = sample_chain(domain, 640, DOC_LEN, gen)
    return {"generic": generic, "domain": domain, "facts": facts, "train": docs[:512], "test": docs[512:]}


def sums(count: int, gen) -> torch.Tensor:
    """``[count, 5]``: ``ADD a b EQ a+b`` for digits a, b."""
    a, b = torch.randint(0, DIGITS, (2, count), generator=gen)
    return torch.stack([torch.full_like(a, ADD), a, b, torch.full_like(a, EQ), a + b], 1)


def fact_rows(facts: torch.Tensor, count: int, gen) -> torch.Tensor:
    """``[count, 4]``: ``FACT s R_r facts[s, r]``."""
    s = torch.randint(0, SUBJECTS, (count,), generator=gen)
    r = torch.randint(0, len(RELATIONS), (count,), generator=gen)
    return torch.stack([torch.full_like(s, FACT), s, RELATIONS[r], facts[s, r]], 1)


def generic_batch(world: dict, count: int, gen) -> torch.Tensor:
    """``[count, 20]`` pre-training documents: a third text, a third 4 packed sums, a third 5
    packed facts, shuffled."""
    third = count // 3
    text = sample_chain(world["generic"], count - 2 * third, DOC_LEN, gen)
    math_docs = sums(4 * third, gen).reshape(third, DOC_LEN)
    fact_docs = fact_rows(world["facts"], 5 * third, gen).reshape(third, DOC_LEN)
    docs = torch.cat([text, math_docs, fact_docs])
    return docs[torch.randperm(count, generator=gen)]


def _options(right: torch.Tensor, high: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """4 distinct single-token options (the right one and 3 others below ``high``), shuffled, and
    the right one's position."""
    count = len(right)
    offsets = torch.argsort(torch.rand(count, high - 1, generator=gen), 1)[:, :OPTIONS - 1] + 1
    options = torch.cat([right[:, None], (right[:, None] + offsets) % high], 1)
    return _shuffle(options[..., None], gen)


def _shuffle(options: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.argsort(torch.rand(options.shape[:2], generator=gen), 1)
    return options.gather(1, perm[..., None].expand_as(options)), (perm == 0).float().argmax(1)


def continuation_task(logits: torch.Tensor, count: int, gen, distractors: torch.Tensor | None = None,
                      prefix: int = 8, length: int = 4) -> dict:
    """A text's first ``prefix`` tokens and 4 continuations of ``length`` tokens: its own, and 3
    continuations of other texts of the same chain (fluent, but not after this prefix), or with
    ``distractors`` (another chain's logits) 3 continuations of this prefix in that chain."""
    docs = sample_chain(logits, count, prefix + length, gen)
    if distractors is None:
        others = sample_chain(logits, count * (OPTIONS - 1), prefix + length, gen)[:, prefix:]
    else:
        last = docs[:, prefix - 1].repeat_interleave(OPTIONS - 1)
        others = sample_chain(distractors, len(last), length + 1, gen, start=last)[:, 1:]
    options = torch.cat([docs[:, None, prefix:], others.view(count, OPTIONS - 1, length)], 1)
    options, answer = _shuffle(options, gen)
    return {"prompts": docs[:, :prefix], "options": options, "answer": answer}


def held_out_tasks(world: dict, count: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 101)
    math_rows = sums(count, gen)
    fact_q = fact_rows(world["facts"], count, gen)
    tasks = {}
    options, answer = _options(math_rows[:, 4], 2 * DIGITS - 1, gen)
    tasks["arithmetic"] = {"prompts": math_rows[:, :4], "options": options, "answer": answer}
    tasks["continuation"] = continuation_task(world["generic"], count, gen)
    options, answer = _options(fact_q[:, 3], WORDS, gen)
    tasks["facts"] = {"prompts": fact_q[:, :3], "options": options, "answer": answer}
    tasks["domain continuation"] = continuation_task(world["domain"], count, gen, distractors=world["generic"])
    return tasks


# ---------------------------------------------------------------------- the model
def pretrained_lm(cfg: Config, world: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                                         num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32))
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 2 * (1 - s / cfg.pretrain_steps)))
    for _ in tqdm(range(cfg.pretrain_steps), desc="pre-training on the generic mixture", leave=False):
        tokens = generic_batch(world, 48, gen)
        loss = sequence_losses(model(input_ids=tokens).logits, tokens)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False)


def with_adapter(base: LlamaForCausalLM, quantize: str | None, cfg: Config, seed: int) -> LlamaForCausalLM:
    """A copy of the bf16 ``base`` with one fp32 LoRA adapter on every block linear, its base
    quantized to NF4 when ``quantize="nf4"``. The same seed gives the same adapter initialisation."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed + 3)
    return bk.inject(model, TARGETS, num_adapters=1, r=cfg.rank, alpha=2 * cfg.rank, quantize=quantize,
                     dtype=torch.float32)


def finetune(model, world: dict, cfg: Config, seed: int, label: str) -> dict:
    """LoRA on the domain's training documents; returns the peak memory (CUDA) and the time."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + 5)  # the same batches for every base
    train = world["train"].to(device)
    opt = torch.optim.AdamW(bk.trainable_parameters(model), lr=cfg.lr, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with bk.use_adapters(model, 0):
        for _ in tqdm(range(cfg.finetune_steps), desc=f"fine-tuning, {label}", leave=False):
            tokens = train[torch.randint(0, len(train), (cfg.batch,), generator=gen).to(device)]
            loss = sequence_losses(model(input_ids=tokens).logits, tokens)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start,
            "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


# ---------------------------------------------------------------------- evaluation
def memory(model) -> dict:
    """Bytes of the adapted layers' base weights, of the whole model (parameters and buffers), and
    of the adapters (what trains, and what the optimizer keeps two more copies of)."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    base = sum(m.base_layer.base_bytes() if isinstance(m.base_layer, NF4Linear)
               else m.base_layer.weight.nbytes for m in layers)
    total = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    adapters = sum(p.nbytes for p in bk.trainable_parameters(model))
    return {"linear_base_bytes": base, "model_bytes": total, "adapter_bytes": adapters}


@torch.no_grad()
def option_loglik(model, prompts: torch.Tensor, options: torch.Tensor) -> torch.Tensor:
    """``[n, 4]``: summed log-likelihood of each option's tokens after its prompt."""
    n, k, length = options.shape
    seqs = torch.cat([prompts[:, None].expand(n, k, -1), options], 2).reshape(n * k, -1)
    logp = model(input_ids=seqs).logits[:, -length - 1:-1].float().log_softmax(-1)
    return logp.gather(2, seqs[:, -length:, None]).sum((1, 2)).view(n, k)


@torch.no_grad()
def evaluate(model, world: dict, tasks: dict) -> dict:
    device = next(model.parameters()).device
    out = {}
    for name, task in tasks.items():
        scores = option_loglik(model, task["prompts"].to(device), task["options"].to(device))
        out[name] = (scores.argmax(1).cpu() == task["answer"]).float().mean().item()
    test = world["test"].to(device)
    nll, count = sequence_losses(model(input_ids=test).logits, test)
    out["domain perplexity"] = math.exp((nll * count).sum().item() / count.sum().item())
    return out


def run_seed(cfg: Config, device: torch.device, seed: int) -> dict:
    world = make_world(seed)
    tasks = held_out_tasks(world, cfg.questions, seed)
    base = pretrained_lm(cfg, world, seed).to(device=device, dtype=torch.bfloat16)
    models = {}
    for label, quantize in (("bf16", None), ("nf4", "nf4")):
        model = with_adapter(base, quantize, cfg, seed)
        with bk.use_adapters(model, None):
            before = evaluate(model, world, tasks)
        run_info = finetune(model, world, cfg, seed, f"{label} base, seed {seed}")
        with bk.use_adapters(model, 0):
            after = evaluate(model, world, tasks)
        models[label] = {"base": before, "fine-tuned": after, "memory": memory(model), **run_info}
    reference = models["bf16"]["base"]
    for entry in models.values():
        entry["forgetting_rate"] = {t: 1 - entry["fine-tuned"][t] / reference[t] for t in HELD_OUT}
        entry["task_gain"] = entry["fine-tuned"]["domain continuation"] - reference["domain continuation"]
    return {"seed": seed, "models": models}


def _mean_se(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    return [t.mean().item(), (t.std() / len(t) ** 0.5).item() if len(t) > 1 else 0.0]


def summarize(per_seed: list[dict]) -> dict:
    """Each metric's mean and standard error over the seeds (memory is the same for every seed)."""
    summary = {}
    for label in ("bf16", "nf4"):
        entries = [r["models"][label] for r in per_seed]
        first = entries[0]
        summary[label] = {
            **{part: {k: _mean_se([e[part][k] for e in entries]) for k in first[part]}
               for part in ("base", "fine-tuned", "forgetting_rate")},
            "task_gain": _mean_se([e["task_gain"] for e in entries]),
            "memory": first["memory"], "peak_bytes": first["peak_bytes"],
            "seconds": sum(e["seconds"] for e in entries) / len(entries)}
    return summary


def run(cfg: Config, out_dir: Path, device: torch.device, seeds: list[int]) -> dict:
    start = time.perf_counter()
    print(f"a {cfg.layers}-layer Llama (hidden {cfg.hidden}) pre-trained on the generic mixture; LoRA r={cfg.rank} "
          f"on {', '.join(TARGETS)}; {cfg.finetune_steps} steps of {cfg.batch} domain documents; seeds {seeds} "
          f"({device})")
    per_seed = [run_seed(cfg, device, seed) for seed in tqdm(seeds, desc="seeds")]
    results = {"config": dataclasses.asdict(cfg), "device": str(device), "seeds": per_seed,
               "summary": summarize(per_seed), "seconds": time.perf_counter() - start}
    report(results, out_dir)
    return results


# ---------------------------------------------------------------------- output
def _fmt(value: list[float], scale: float = 100.0, unit: str = "%", sign: str = "", digits: int = 1) -> str:
    mean, se = value
    text = f"{scale * mean:{sign}.{digits}f}{unit}" + (f" ±{scale * se:.{digits}f}" if se else "")
    return f"{text:>14}"


def report(results: dict, out_dir: Path) -> None:
    bf16, nf4 = results["summary"]["bf16"], results["summary"]["nf4"]
    mib = lambda b: f"{b / 2 ** 20:8.3f} MiB"  # noqa: E731
    print("\nmemory                         bf16 base    NF4 base")
    for key, name in (("linear_base_bytes", "adapted layers' base weights"), ("model_bytes", "whole model"),
                      ("adapter_bytes", "adapters (fp32)")):
        print(f"  {name:28s} {mib(bf16['memory'][key])} {mib(nf4['memory'][key])}")
    if bf16["peak_bytes"] is not None:
        print(f"  {'peak during fine-tuning':28s} {mib(bf16['peak_bytes'])} {mib(nf4['peak_bytes'])}")
    ratio = nf4["memory"]["linear_base_bytes"] / bf16["memory"]["linear_base_bytes"]
    print(f"  NF4 / bf16 base weights: {ratio:.3f}")
    columns = [("bf16 base", bf16["base"]), ("NF4 base", nf4["base"]), ("LoRA", bf16["fine-tuned"]),
               ("QLoRA", nf4["fine-tuned"])]
    seeds = len(results["seeds"])
    print(f"\nmean over {seeds} seed(s)" + (" ± standard error" if seeds > 1 else ""))
    print(" " * 32 + "".join(f"{c:>14}" for c, _ in columns))
    print(f"  {'domain perplexity':30s}" + "".join(_fmt(m["domain perplexity"], 1.0, "", digits=2) for _, m in columns))
    for task in ("domain continuation", *HELD_OUT):
        print(f"  {task + ' accuracy':30s}" + "".join(_fmt(m[task]) for _, m in columns))
    for task in HELD_OUT:
        print(f"  {'forgetting rate, ' + task:30s}" + " " * 28
              + "".join(_fmt(e["forgetting_rate"][task]) for e in (bf16, nf4)))
    print(f"  {'task gain (accuracy)':30s}" + " " * 28 + "".join(_fmt(e["task_gain"], sign="+") for e in (bf16, nf4)))
    print(f"fine-tuning time on {results['device']}: bf16 base {bf16['seconds']:.1f} s, NF4 base {nf4['seconds']:.1f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(results["summary"], out_dir)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'qlora.png'} ({results['seconds']:.0f} s)")


def _plot(summary: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bf16, nf4 = summary["bf16"], summary["nf4"]
    names = ["domain continuation", *HELD_OUT]
    bars = [("bf16 base", bf16["base"]), ("LoRA (bf16 base)", bf16["fine-tuned"]),
            ("QLoRA (NF4 base)", nf4["fine-tuned"])]
    fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(bars)
    for i, (label, metrics) in enumerate(bars):
        ax.bar([j + i * width for j in range(len(names))], [metrics[n][0] for n in names], width,
               yerr=[metrics[n][1] for n in names], label=label)
    ax.set_xticks([j + width for j in range(len(names))], names)
    ax.set_ylabel("accuracy (4 options)")
    ax.axhline(1 / OPTIONS, color="0.5", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    ax_mem.bar([0, 1], [bf16["memory"]["linear_base_bytes"] / 2 ** 20, nf4["memory"]["linear_base_bytes"] / 2 ** 20],
               color=["C1", "C2"])
    ax_mem.set_xticks([0, 1], ["bf16", "NF4"])
    ax_mem.set_ylabel("base weights of the adapted layers (MiB)")
    fig.tight_layout()
    fig.savefig(out_dir / "qlora.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, fewer steps (~2 minutes on CPU)")
    parser.add_argument("--out", type=output_folder, default="runs/qlora", help="folder for results.json and qlora.png")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=POSITIVE_INT, help="how many seeds (0, 1, ...); default 3")
    parser.add_argument("--finetune-steps", type=POSITIVE_INT, help="override the fine-tuning steps")
    parser.add_argument("--pretrain-steps", type=POSITIVE_INT, help="override the pre-training steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    cfg = QUICK if args.quick else FULL
    cfg = dataclasses.replace(cfg, finetune_steps=args.finetune_steps or cfg.finetune_steps,
                              pretrain_steps=args.pretrain_steps or cfg.pretrain_steps)
    return run(cfg, Path(args.out), torch.device(args.device), list(range(args.seeds or 3)))


if __name__ == "__main__":
    main()
