"""The demo model that ``bora-serve --demo`` serves: a tiny Llama, a character tokenizer and eight
PEFT adapters, all built here so nothing is downloaded.

The base model continues lowercase text in alphabet order (after ``c`` comes ``d``); adapter
``skipK`` (K = 1..8) skips K letters instead (``skip1``: after ``c`` comes ``e``). So every adapter
answers the same prompt differently, which makes routing visible: ``"abc"`` continues as
``defgh`` on the base, ``egikm`` on ``skip1``, ``fil..`` on ``skip2``. The adapters train together in
mixed batches (one adapter per sequence), then each is saved as a PEFT ``save_pretrained`` folder.

    python -m bora_kernels.serve.demo [--out runs/serve_demo] [--steps 300]

writes ``OUT/base`` (model and tokenizer, ``from_pretrained`` folders) and ``OUT/adapters/skipK``.
"""

from __future__ import annotations

import argparse
import contextlib
import string
import time
from pathlib import Path

import torch

DEFAULT_DIR = Path("runs/serve_demo")
MODEL_NAME = "bora-demo"
ADAPTERS = [f"skip{k}" for k in range(1, 9)]
LETTERS = string.ascii_lowercase
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = " " + LETTERS + string.ascii_uppercase + string.digits + ".,:;!?'\"-()\n"
# chat messages are joined as they are: the demo model knows no roles
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def char_tokenizer(chars=CHARS):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``chars`` (a string, or a
    list of strings, each a token's text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def letter_sequences(skips: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids of lowercase sequences where each letter is ``skip + 1`` after the one before."""
    first = torch.randint(0, 26, (len(skips), 1), generator=gen)
    letters = (first + torch.arange(length)[None] * (skips[:, None] + 1)) % 26
    return letters + len(SPECIALS) + 1  # CHARS starts with " ", then a..z


def _train(model, params, steps: int, lr: float, batch, log: str) -> float:
    from ..bora import sequence_losses
    from ..model import use_adapters

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        tokens, adapters = batch()
        with use_adapters(model, adapters) if adapters is not None else contextlib.nullcontext():
            loss = sequence_losses(model(input_ids=tokens).logits, tokens)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"  {log}: loss {loss.item():.3f} after {steps} steps")
    return loss.item()


def build(out=DEFAULT_DIR, steps: int = 300, seed: int = 0) -> Path:
    """Train the demo base model and its eight adapters (on the CPU, on the ops' torch path: this
    prepares data, it checks no kernel) and save them under ``out``."""
    from ..ops import use_backend

    with use_backend("torch"):
        return _build(Path(out), steps, seed)


def _build(out: Path, steps: int, seed: int) -> Path:
    import bora_kernels as bk

    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    length, batch = 48, 32
    print(f"building the serving demo in {out}: a tiny Llama and {len(ADAPTERS)} adapters")
    _train(model, list(model.parameters()), steps, 3e-3,
           lambda: (letter_sequences(torch.zeros(batch, dtype=torch.long), length, gen), None), "base (alphabet order)")
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")

    bk.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              len(ADAPTERS), r=8, alpha=16, adapter_names=ADAPTERS)

    def mixed_batch():  # every sequence its own adapter: all eight train in one pass
        adapters = torch.arange(batch) % len(ADAPTERS)
        return letter_sequences(adapters + 1, length, gen), adapters

    _train(model, bk.model.trainable_parameters(model), steps, 1e-2, mixed_batch, "adapters skip1..skip8 (mixed batches)")
    for name in ADAPTERS:
        bk.save_peft_adapter(model, name, out / "adapters" / name)
    print(f"  saved in {time.perf_counter() - start:.0f} s")
    return out


def ensure(folder=DEFAULT_DIR) -> Path:
    """``folder`` when it holds the demo, built there first when it does not."""
    folder = Path(folder)
    if not (folder / "base" / "config.json").is_file() or not all(
            (folder / "adapters" / name / "adapter_config.json").is_file() for name in ADAPTERS):
        build(folder)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_DIR))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bora_kernels as bk

    out = build(args.out, args.steps)
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base")
    bk.load_peft_adapters(model, {name: out / "adapters" / name for name in ADAPTERS})
    prompt = "abc"
    ids = tokenizer(prompt, return_tensors="pt").input_ids.repeat(len(ADAPTERS) + 1, 1)
    with bk.use_adapters(model, [None] + ADAPTERS):
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    for name, row in zip(["base"] + ADAPTERS, generated):
        print(f"  {name:>6}: {prompt!r} -> {tokenizer.decode(row[ids.shape[1]:])!r}")


if __name__ == "__main__":
    main()
