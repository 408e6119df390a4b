"""IVON-LoRA vs AdamW at small scale: accuracy, calibration, posterior averaging and pruning.

The paper's set-up (Cong et al., "Improving LoRA with Variational Learning"), shrunk to a CPU:

- a tiny Llama built from a config (no downloads; weights drawn with std 0.1 so that its frozen
  output head can express confident answers), frozen, with LoRA (r=8, alpha=16, dropout 0.1) on
  the query and value projections, as in the paper's appendix A.1;
- a generated multiple-choice task read as a prompt: ``<bos> w1 .. w6 <ask>``; every word belongs
  to one of four classes and the answer is the class most of the words belong to (ties broken at
  random, and 10% of training labels flipped, so the task has real uncertainty). Like the paper,
  the model's next-token logits are read for the answer tokens "A"/"B"/"C"/"D" only;
- a small training set (so AdamW overfits and grows over-confident), the same steps, batches and
  warm-up for both optimizers. AdamW's learning rate is the best of 5e-4, 1e-3, 2e-3 and 5e-3 on this
  task (--quick); IVON is in the paper's hyper-parameter style (``hess_init`` 1e-3, an element-wise
  clip radius, an effective sample size 200x the training set).

It prints accuracy, expected calibration error (ECE, 15 bins) and negative log-likelihood (NLL) on
held-out questions: AdamW; IVON at the posterior mean ("@mean"); IVON averaging 10 posterior
samples; and the effect of pruning 0-50% of the LoRA weights, uncertainty-guided (largest posterior
variance first, per matrix) against the same fraction pruned at random.

    python python/ivon_lora.py [--quick] [--steps N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import bora_kernels as bk
from bora_kernels import bayes
from bora_kernels.arguments import POSITIVE, POSITIVE_INT, available_device, number
from bora_kernels.optim import IVON

CLASSES, WORDS_PER_CLASS, QUESTION_WORDS = 4, 12, 6
# vocabulary: specials, the class words, the answer letters
PAD, BOS, ASK = 0, 1, 2
FIRST_WORD = 3
ANSWERS = list(range(FIRST_WORD + CLASSES * WORDS_PER_CLASS, FIRST_WORD + CLASSES * WORDS_PER_CLASS + CLASSES))
VOCAB = ANSWERS[-1] + 1
LABEL_NOISE = 0.1
INIT_RANGE = 0.1  # larger than Llama's 0.02, so the frozen head can express confident answers
PRUNE_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def questions(n: int, gen: torch.Generator, label_noise: float):
    """``n`` prompts ``[n, QUESTION_WORDS + 2]`` and their answer classes ``[n]``."""
    words = torch.randint(0, CLASSES * WORDS_PER_CLASS, (n, QUESTION_WORDS), generator=gen)
    counts = F.one_hot(words // WORDS_PER_CLASS, CLASSES).sum(1).float()
    counts += 0.5 * torch.rand(counts.shape, generator=gen)  # ties broken at random
    labels = counts.argmax(1)
    flip = torch.rand(n, generator=gen) < label_noise
    labels[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=gen)
    prompts = torch.cat([torch.full((n, 1), BOS), words + FIRST_WORD, torch.full((n, 1), ASK)], 1)
    return prompts, labels


def tiny_lm(hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         initializer_range=INIT_RANGE)
    return LlamaForCausalLM(config)


def answer_logits(model, prompts: torch.Tensor) -> torch.Tensor:
    """The next-token logits of the answer letters after ``<ask>``: ``[n, CLASSES]``."""
    with bk.use_adapters(model, torch.zeros(len(prompts), dtype=torch.long, device=prompts.device)):
        return model(input_ids=prompts).logits[:, -1, ANSWERS].float()


def lora_model(base, device):
    model = bk.inject(copy.deepcopy(base), ["q_proj", "v_proj"], num_adapters=1, r=8, alpha=16, dropout=0.1)
    return model.to(device)


def train(model, optimizer_name: str, data, args, device):
    prompts, labels = data
    params = bk.trainable_parameters(model)
    warmup = max(1, args.steps // 20)
    if optimizer_name == "AdamW":
        opt = torch.optim.AdamW(params, lr=args.adamw_lr, weight_decay=0.0)
    else:
        opt = IVON(params, lr=args.ivon_lr, ess=args.ess, hess_init=1e-3, beta2=0.99995, clip_radius=args.clip,
                   weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * max(0.0, 1 - t / args.steps))
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, len(prompts), (args.batch,), generator=gen)
        x, y = prompts[idx].to(device), labels[idx].to(device)
        if optimizer_name == "AdamW":
            opt.zero_grad()
            F.cross_entropy(answer_logits(model, x), y).backward()
        else:
            with opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(answer_logits(model, x), y).backward()
        opt.step()
        schedule.step()
    model.eval()
    return opt


def metrics(probs, labels) -> str:
    """Accuracy, ECE and NLL, and the mean confidence (above the accuracy: over-confident)."""
    return (f"acc {100 * bayes.accuracy(probs, labels):5.1f}  conf {100 * probs.max(1).values.mean().item():5.1f}"
            f"  ECE {100 * bayes.expected_calibration_error(probs, labels):5.1f}"
            f"  NLL {bayes.negative_log_likelihood(probs, labels):.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (CPU, under 3 minutes)")
    parser.add_argument("--steps", type=POSITIVE_INT, default=None, help="training steps per optimizer")
    parser.add_argument("--batch", type=POSITIVE_INT, default=32)
    parser.add_argument("--train-size", type=POSITIVE_INT, default=1024, help="training questions")
    parser.add_argument("--adamw-lr", type=POSITIVE, default=1e-3)
    parser.add_argument("--ivon-lr", type=POSITIVE, default=3.0, help="IVON learning rate (rescaled by hess_init)")
    parser.add_argument("--ess", type=POSITIVE, default=2e5, help="IVON's effective sample size")
    parser.add_argument("--clip", type=number(float, above=0, allow_inf=True), default=1.0, help="IVON's element-wise clip radius")
    parser.add_argument("--samples", type=POSITIVE_INT, default=None, help="posterior samples to average")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1200 if args.quick else 2000)
    args.samples = args.samples or (6 if args.quick else 10)
    device = torch.device(args.device)
    start = time.time()

    torch.manual_seed(0)
    base = tiny_lm(hidden=64, layers=2)
    gen = torch.Generator().manual_seed(0)
    train_data = questions(args.train_size, gen, LABEL_NOISE)
    test_x, test_y = questions(2000, gen, 0.0)
    test_x, test_y = test_x.to(device), test_y.to(device)
    print(f"IVON-LoRA vs AdamW: tiny Llama (hidden 64, 2 layers, frozen), LoRA r=8 on q/v, "
          f"{args.train_size} training questions, {args.steps} steps of {args.batch}, {device}")

    with torch.no_grad():
        chance = torch.full((len(test_y), CLASSES), 1.0 / CLASSES, device=device)
    print(f"  {'uniform guess':<24} {metrics(chance, test_y)}")
    results = {}
    for name in ("AdamW", "IVON"):
        torch.manual_seed(1)
        model = lora_model(base, device)
        opt = train(model, name, train_data, args, device)
        results[name] = (model, opt)
        with torch.no_grad():
            at_mean = bayes.predict(lambda: answer_logits(model, test_x))
        print(f"  {name + ('@mean' if name == 'IVON' else ''):<24} {metrics(at_mean, test_y)}")
    model, opt = results["IVON"]
    averaged = bayes.predict(lambda: answer_logits(model, test_x), opt, samples=args.samples)
    print(f"  {f'IVON ({args.samples} samples)':<24} {metrics(averaged, test_y)}")

    print("\n  pruning the LoRA weights of the IVON model (at the mean), per matrix:")
    saved = {p: opt.posterior(p)[0].clone() for p in bk.trainable_parameters(model)}
    for fraction in PRUNE_FRACTIONS:
        row = []
        for how, prune in (("uncertainty", bayes.prune_uncertain), ("random", bayes.prune_random)):
            for p, mean in saved.items():
                opt.posterior(p)[0].copy_(mean)
            kwargs = {"generator": torch.Generator().manual_seed(0)} if how == "random" else {}
            prune(opt, fraction, **kwargs)
            row.append(f"{how}: {metrics(bayes.predict(lambda: answer_logits(model, test_x)), test_y)}")
        print(f"  {100 * fraction:3.0f}%  " + "   ".join(row))
    for p, mean in saved.items():
        opt.posterior(p)[0].copy_(mean)
    opt.sync_params()
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
