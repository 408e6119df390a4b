"""Guided output's allowed tokens per automaton state: the tokens' tree searched a level at a
time in tensors (``RegexSet.allowed``, what the server runs) against the walk of the tree node by
node in Python that it replaced (the baseline, kept only here).

    python benchmarks/guided_masks.py [--vocab 32000] [--outputs 3] [--quick] [--json FILE]

The tokenizer is a byte-level BPE (GPT-2's kind) trained on the Python standard library's
sources (code, docstrings and comments: a vocabulary like a code model's), or on generated
words where those sources are missing. The schema is an object of 8 fields: free strings, one
of at most 40 characters, an email, an integer, a number in [0, 1], a list of strings and a
boolean. Outputs are drawn at random among the allowed tokens, 3 times in 10 among those of one
character (punctuation that ends a string is among them, so outputs get through the object),
seeded; both methods give the same tokens, so they meet the same states. An output ends where
the guide says or at 300 tokens. A figure is the
time of finding a state's allowed tokens the first time the state is met (both methods keep
them; they go first by turns, as the first makes the automaton's new states), on one thread.
The two methods' tokens are compared in every state.

Then, at every step, the row of the step's mask that rules out the other tokens: built from the
allowed ids at every step (the server before ``GuideMasks``, the baseline) against the rows
``GuideMasks`` keeps per state (built the first time a state comes, then reused), both on the
CPU here; on a GPU the baseline also copied each row over at every step.
``--quick`` (the test's smoke run): a 600-token vocabulary and one output.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bora_kernels.serve.engine import GuideMasks  # noqa: E402
from bora_kernels.serve.guided import RegexSet, TokenTexts  # noqa: E402
from bora_kernels.serve.json_schema import schema_regex  # noqa: E402
from bora_kernels.serve.pattern import DEAD  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "city": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "score": {"type": "number", "minimum": 0, "maximum": 1}, "tags": {"type": "array", "items": {"type": "string"}},
    "email": {"type": "string", "format": "email"}, "notes": {"type": "string"}, "ok": {"type": "boolean"}},
    "required": ["name", "city", "age", "score", "tags", "email", "notes", "ok"]}


def corpus(files: int) -> list[str]:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:files]
    texts = [path.read_text(errors="ignore") for path in sources]
    if sum(map(len, texts)) > 100_000:
        return texts
    rng = random.Random(0)  # no library sources here: generated words and punctuation
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(3000)]
    return [" ".join(rng.choice(words) + rng.choice(["", ",", ".", ":", '"', "(", ")"]) for _ in range(2000))
            for _ in range(200)]


def tokenizer(vocab: int, files: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus(files), trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


class NodeWalk:
    """The baseline: the texts as a tree of dicts, walked node by node beside the automaton (a
    branch left at its first character no match can take)."""

    def __init__(self, texts: TokenTexts, regexes: RegexSet):
        self.pattern, self.root = regexes.pattern, [{}, []]
        for text, ids in texts.ids.items():
            node = self.root
            for ch in text:
                node = node[0].setdefault(ch, [{}, []])
            node[1].extend(ids)
        self._allowed: dict[int, torch.Tensor] = {}

    def allowed(self, state: int) -> torch.Tensor:
        if state not in self._allowed:
            ids, todo = [], [(self.root, state)]
            while todo:
                node, at = todo.pop()
                for ch, child in node[0].items():
                    after = self.pattern.step(at, ch)
                    if after != DEAD:
                        ids.extend(child[1])
                        todo.append((child, after))
            self._allowed[state] = torch.tensor(sorted(ids), dtype=torch.long)
        return self._allowed[state]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--outputs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.outputs = 600, 1
    if args.vocab < 300 or args.outputs < 1:
        parser.error("--vocab must be at least 300 (the byte alphabet and some merges), --outputs at least 1")
    torch.set_num_threads(1)
    tok = tokenizer(args.vocab, 40 if args.quick else 3000)
    texts = TokenTexts(tok, len(tok))
    start = time.perf_counter()
    regexes = RegexSet(texts, schema_regex(SCHEMA))  # builds the tensor tree, finds the start state's tokens
    setup = {"levels": time.perf_counter() - start}
    start = time.perf_counter()
    baseline = NodeWalk(texts, regexes)
    setup["nodes"] = time.perf_counter() - start
    times: dict[str, list[float]] = {"levels": [], "nodes": []}
    counts, rng, tokens = [], random.Random(0), 0
    single = torch.tensor([len(text) == 1 for text in texts.text])
    vocab, masks, rows = len(texts.text), GuideMasks(len(texts.text), torch.device("cpu")), {"built": 0.0, "kept": 0.0}
    for _ in range(args.outputs):
        guide = regexes.guide()
        for _ in range(300):
            if guide.state not in baseline._allowed:
                found = {}
                order = (("nodes", baseline), ("levels", regexes))  # first by turns: the first makes new states
                for name, method in order[::1 if len(counts) % 2 else -1]:
                    method._allowed.pop(guide.state, None)
                    start = time.perf_counter()
                    found[name] = method.allowed(guide.state)
                    times[name].append(time.perf_counter() - start)
                assert torch.equal(found["levels"], found["nodes"]), guide.state
                counts.append(len(found["levels"]))
            allowed = regexes.allowed(guide.state)
            if not len(allowed):
                break
            start = time.perf_counter()
            built = torch.zeros(vocab, dtype=torch.bool)
            built[allowed[allowed < vocab]] = True
            rows["built"] += time.perf_counter() - start
            start = time.perf_counter()
            kept = masks.row(allowed)
            rows["kept"] += time.perf_counter() - start
            assert torch.equal(built, kept)
            tokens += 1
            short = allowed[single[allowed]]
            pick = short if len(short) and rng.random() < 0.3 else allowed
            if guide.advance(int(pick[rng.randrange(len(pick))])):
                break
    wide = [i for i, n in enumerate(counts) if n > len(texts.text) // 4]
    record = {"vocab": len(tok), "tree_nodes": regexes.texts.tree().levels[-1], "tokens": tokens, "states": len(counts),
              "wide_states": len(wide), "setup_s": setup, "threads": 1, "device": "cpu"}
    print(f"vocabulary {len(tok)}, tree of {record['tree_nodes']} nodes; {args.outputs} outputs, {tokens} tokens, "
          f"{len(counts)} states met ({len(wide)} allow over a quarter of the tokens)")
    print(f"{'method':<28}{'set-up s':>10}{'all states ms':>15}{'median ms':>11}{'max ms':>9}{'wide ms':>9}")
    for name, label in (("nodes", "node walk (baseline)"), ("levels", "levels in tensors (ours)")):
        spent = sorted(times[name])
        record[name] = {"total_ms": 1000 * sum(spent), "median_ms": 1000 * spent[len(spent) // 2],
                        "max_ms": 1000 * spent[-1], "wide_ms": 1000 * sum(times[name][i] for i in wide)}
        r = record[name]
        print(f"{label:<28}{setup[name]:>10.2f}{r['total_ms']:>15.0f}{r['median_ms']:>11.1f}{r['max_ms']:>9.1f}"
              f"{r['wide_ms']:>9.0f}")
    print(f"all states: {record['nodes']['total_ms'] / record['levels']['total_ms']:.1f}x faster than the baseline")
    record["mask_rows"] = {"steps": tokens, "rows_built_by_guide_masks": len(masks),
                           "built_every_step_ms": 1000 * rows["built"], "guide_masks_ms": 1000 * rows["kept"]}
    print(f"the steps' mask rows over {tokens} steps: built at every step {1000 * rows['built']:.1f} ms (baseline), "
          f"kept per state by GuideMasks {1000 * rows['kept']:.1f} ms ({len(masks)} rows built), "
          f"{rows['built'] / max(rows['kept'], 1e-9):.1f}x faster")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
