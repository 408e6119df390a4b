"""BoRA on a generated multi-task corpus: test perplexity against the prior's precision tau.

This is the experiment of Eide & Frigessi (BoRA, Tables 1-2 and Figures 2 and 4) at laptop scale.

- The corpus. A generic "language": a bigram chain whose rows are sparse random distributions. A
  tiny Llama (built from a config, no download) is pre-trained on it briefly, so LoRA has
  something to adapt. A domain that every task shares: one shift of the next-token logits (a
  word-frequency bias plus a low-rank change to the bigrams). Then one task per "speaker": its
  own smaller shift of the same kind (its style). Task sizes are spread geometrically (8:1 in
  the quick run). A third of each task's documents are held out for testing.
- BoRA (``bora_kernels.bora.BoRA``). One adapter per task plus the global ``Θ``, trained together
  in mixed batches (one forward and backward per step, whatever the tasks in it). The likelihood
  is the whole training set's (``likelihood="documents"``) and tasks are sampled in proportion to
  their size. ``tau = 0`` trains the tasks independently and ``tau = inf`` trains one pooled
  adapter (the paper's 10^4 stands for it there).
- Out: a table of test perplexity per tau, overall and per task (Tables 1-2). The same numbers
  go to ``results.json``, with ``perplexity_vs_tau.png`` (Figure 2) and
  ``distance_vs_size.png``, each task's distance to ``Θ`` against its training size (Figure 4).

The finding to reproduce: an intermediate tau beats both limits, and the small tasks gain most
over independent training.

    python python/bora_multitask.py --quick      # 12 tasks, ~30 s on a laptop CPU
    python python/bora_multitask.py              # 16 tasks, more data and steps (~2 minutes)
    python python/bora_multitask.py --lr-rule paper   # learning rate proportional to tau
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
from bora_kernels.arguments import POSITIVE, output_folder
from bora_kernels.bora import BoRA, TaskSampler, learning_rate_for_tau, sequence_losses

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TAUS = (0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0, math.inf)


@dataclasses.dataclass
class Config:
    tasks: int
    smallest: int       # training + test documents of the smallest task
    spread: float       # largest / smallest
    doc_len: int
    pretrain_steps: int
    steps: int
    batch: int
    vocab: int = 64


QUICK = Config(tasks=12, smallest=9, spread=8.0, doc_len=24, pretrain_steps=300, steps=150, batch=24)
FULL = Config(tasks=16, smallest=9, spread=10.0, doc_len=32, pretrain_steps=600, steps=400, batch=32)


# ---------------------------------------------------------------------- the corpus
def _shift(vocab: int, unigram: float, rank: int, bigram: float, gen: torch.Generator) -> torch.Tensor:
    """A ``[V, V]`` change of next-token logits: a word-frequency bias plus a low-rank bigram term."""
    bias = torch.randn(1, vocab, generator=gen) * unigram
    u, v = torch.randn(vocab, rank, generator=gen), torch.randn(rank, vocab, generator=gen)
    return bias + bigram * (u @ v) / math.sqrt(rank)


def make_corpus(cfg: Config, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the Dirichlet draws below use the global generator
    v = cfg.vocab
    # generic text: each word is followed by a few likely words (sparse Dirichlet rows)
    generic = torch.distributions.Dirichlet(torch.full((v,), 0.1)).sample((v,)).clamp(min=1e-6).log()
    generic = generic - generic.logsumexp(1, keepdim=True)
    domain = generic + _shift(v, 1.2, 2, 0.8, gen)
    sizes = [round(cfg.smallest * cfg.spread ** (d / (cfg.tasks - 1))) for d in range(cfg.tasks)]
    tasks = []
    for d, size in enumerate(sizes):
        logits = domain + _shift(v, 1.0, 1, 0.6, gen)
        docs = sample_chain(logits, size, cfg.doc_len, gen)
        test = max(3, size // 3)
        tasks.append({"name": f"speaker{d:02d}", "train": docs[test:], "test": docs[:test]})
    return {"generic": generic, "tasks": tasks}


def sample_chain(logits: torch.Tensor, count: int, length: int, gen: torch.Generator,
                 start: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` sequences of a bigram chain with next-token ``logits[prev]``, from random first
    tokens or the given ``start`` ``[count]``."""
    probs = logits.softmax(1)
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, logits.shape[0], (count,), generator=gen) if start is None else start
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
    return tokens


# ---------------------------------------------------------------------- the model
def pretrained_lm(cfg: Config, generic: torch.Tensor, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in tqdm(range(cfg.pretrain_steps), desc="pre-training on generic text", leave=False):
        tokens = sample_chain(generic, 32, cfg.doc_len, gen)
        nll, count = sequence_losses(model(input_ids=tokens).logits, tokens)
        opt.zero_grad()
        nll.mean().backward()
        opt.step()
    return model.requires_grad_(False)


@torch.no_grad()
def test_nll(bora: BoRA, tasks: list[dict], base: bool = False) -> list[tuple[float, int]]:
    """(summed token NLL, tokens) of each task's held-out documents, every task in one mixed batch."""
    tokens = torch.cat([t["test"] for t in tasks])
    ids = torch.cat([torch.full((len(t["test"]),), d) for d, t in enumerate(tasks)])
    if base:
        with bk.use_adapters(bora.model, None):
            nll, _ = sequence_losses(bora.model(input_ids=tokens).logits, tokens)
    else:
        nll = bora(tokens, ids).sequence_nll
    per_doc = tokens.shape[1] - 1
    sums = torch.zeros(len(tasks), dtype=torch.float64).index_add_(0, ids, nll.double() * per_doc)
    counts = torch.bincount(ids, minlength=len(tasks)) * per_doc
    return list(zip(sums.tolist(), counts.tolist()))


def train(base_lm, corpus: dict, cfg: Config, tau: float, lr: float, seed: int) -> BoRA:
    tasks = corpus["tasks"]
    sizes = [len(t["train"]) for t in tasks]
    bora = BoRA(copy.deepcopy(base_lm), TARGETS, [t["name"] for t in tasks], tau, r=4, alpha=8,
                likelihood="documents", task_sizes=sizes, sampling="proportional", init_noise=1e-3,
                generator=torch.Generator().manual_seed(seed))
    sampler = TaskSampler(sizes, "proportional")
    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(bk.trainable_parameters(bora.model), lr=lr, weight_decay=0.0)
    label = "inf" if math.isinf(tau) else f"{tau:g}"
    for _ in tqdm(range(cfg.steps), desc=f"tau={label:>5} lr={lr:.0e}", leave=False):
        ids = sampler.sample(cfg.batch, gen)
        pick = [torch.randint(0, sizes[d], (1,), generator=gen).item() for d in ids.tolist()]
        tokens = torch.stack([tasks[d]["train"][i] for d, i in zip(ids.tolist(), pick)])
        out = bora(tokens, ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return bora


def perplexity(pairs) -> float:
    return math.exp(sum(n for n, _ in pairs) / sum(c for _, c in pairs))


def run(cfg: Config, out_dir: Path, lr_rule: str, lr: float, seed: int = 0) -> dict:
    start = time.perf_counter()
    corpus = make_corpus(cfg, seed)
    tasks = corpus["tasks"]
    sizes = [len(t["train"]) for t in tasks]
    base_lm = pretrained_lm(cfg, corpus["generic"], seed)
    print(f"{len(tasks)} tasks, training documents {min(sizes)}..{max(sizes)} ({sum(sizes)} in all, "
          f"{cfg.doc_len} tokens each); adapters r=4 on {', '.join(TARGETS)} of a 2-layer Llama")
    results = {"config": dataclasses.asdict(cfg), "lr_rule": lr_rule, "tasks": [t["name"] for t in tasks],
               "train_documents": sizes, "runs": []}
    base = None
    for tau in tqdm(TAUS, desc="tau"):
        step_lr = learning_rate_for_tau(tau, per_unit_tau=lr * 1e-2, at_zero=lr) if lr_rule == "paper" else lr
        bora = train(base_lm, corpus, cfg, tau, step_lr, seed)
        if base is None:
            base = perplexity(test_nll(bora, tasks, base=True))
        per_task = test_nll(bora, tasks)
        results["runs"].append({"tau": "inf" if math.isinf(tau) else tau, "lr": step_lr,
                                "perplexity": perplexity(per_task),
                                "task_perplexity": [perplexity([p]) for p in per_task],
                                "distance_to_global": bora.distances().tolist()})
    results["base_perplexity"] = base
    results["seconds"] = time.perf_counter() - start
    report(results, out_dir)
    return results


# ---------------------------------------------------------------------- output
def best_run(results: dict) -> dict:
    return min(results["runs"], key=lambda r: r["perplexity"])


def report(results: dict, out_dir: Path) -> None:
    runs, names, sizes = results["runs"], results["tasks"], results["train_documents"]
    taus = [str(r["tau"]) if r["tau"] == "inf" else f"{r['tau']:g}" for r in runs]
    print(f"\ntest perplexity (pre-trained model without adapters: {results['base_perplexity']:.2f})")
    print("  tau        " + "".join(f"{t:>8}" for t in taus))
    print("  lr         " + "".join(f"{r['lr']:8.0e}" for r in runs))
    print("  overall    " + "".join(f"{r['perplexity']:8.3f}" for r in runs))
    for d, (name, size) in enumerate(zip(names, sizes)):
        print(f"  {name} n={size:<3d}"[:13].ljust(13) + "".join(f"{r['task_perplexity'][d]:8.3f}" for r in runs))
    best = best_run(results)
    independent, pooled = runs[0], runs[-1]
    print(f"best tau: {best['tau']} (overall {best['perplexity']:.3f}; independent {independent['perplexity']:.3f}, "
          f"pooled {pooled['perplexity']:.3f})")
    gain = [(i - b) / i for i, b in zip(independent["task_perplexity"], best["task_perplexity"])]
    half = len(sizes) // 2
    order = sorted(range(len(sizes)), key=lambda d: sizes[d])
    small = sum(gain[d] for d in order[:half]) / half
    large = sum(gain[d] for d in order[half:]) / (len(sizes) - half)
    results["gain_over_independent"] = {"smaller_half": small, "larger_half": large}
    print(f"gain of the best tau over independent training: smaller half of the tasks {100 * small:.1f}%, "
          f"larger half {100 * large:.1f}%")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plots(results, out_dir, taus)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'perplexity_vs_tau.png'}, {out_dir / 'distance_vs_size.png'}"
          f" ({results['seconds']:.0f} s)")


def _plots(results: dict, out_dir: Path, taus: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    x = list(range(len(runs)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in range(len(results["tasks"])):
        ax.plot(x, [r["task_perplexity"][d] for r in runs], color="0.75", lw=0.8)
    ax.plot(x, [r["perplexity"] for r in runs], color="k", lw=2.5, label="all tasks")
    ax.set_xticks(x, taus)
    ax.set_xlabel("precision tau (0: independent, inf: pooled)")
    ax.set_ylabel("test perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "perplexity_vs_tau.png", dpi=120)
    plt.close(fig)

    best = best_run(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(results["train_documents"], best["distance_to_global"], color="k")
    ax.set_xlabel("training documents")
    ax.set_ylabel("L2 distance of the task adapter to Θ")
    ax.set_title(f"tau = {best['tau']} (the best)")
    fig.tight_layout()
    fig.savefig(out_dir / "distance_vs_size.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 tasks, fewer steps (~30 s on CPU)")
    parser.add_argument("--out", type=output_folder, default="runs/bora_multitask", help="folder for results.json and the plots")
    parser.add_argument("--lr", type=POSITIVE, default=3e-3, help="learning rate (at tau = 0 for --lr-rule paper)")
    parser.add_argument("--lr-rule", choices=("constant", "paper"), default="constant",
                        help="paper: lr proportional to tau (lr / 100 per unit of tau, as Table 1 from tau = 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    return run(QUICK if args.quick else FULL, Path(args.out), args.lr_rule, args.lr, args.seed)


if __name__ == "__main__":
    main()
