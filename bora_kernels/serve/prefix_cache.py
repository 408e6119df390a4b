"""Prompt prefixes' keys and values kept between requests, per adapter (automatic prefix caching).

A prompt is cut into blocks of ``block`` tokens. Each whole block's keys and values are kept under
``(slot, parent, tokens)``: the adapter slot (the adapters change the keys and values), the id of
the block before it (0 for the first) and the block's own tokens. A key names its whole prefix
exactly, with no hash that could collide, and a prompt finds its longest cached prefix by one
dictionary lookup per block. Eviction is least recently used, and a hit makes a chain's earlier
blocks more recent than its later ones, so the later ones go first: an evicted block's
descendants can no longer be reached and go in their turn. Loading or unloading an adapter drops
its slot's blocks (``drop``).

A block computed for a request that scored its prompt also keeps its tokens' log-probabilities
(``TokenLogprobs``, with the ``k`` alternatives that request asked for), so that a later prompt
scored with at most ``k`` alternatives reuses it too: lm-eval's multiple-choice requests share
their context and differ in the continuation. A block kept without them (or with fewer
alternatives) gets them when a scored prompt computes it again.
"""

from __future__ import annotations

import collections
import itertools

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [1, heads, tokens, head_dim]


class _Block:
    """One block's id, keys and values, and (for a scored prompt's) its tokens' log-probabilities
    with ``k`` alternatives each (``logprobs`` None: not kept)."""
    __slots__ = ("id", "k", "kv", "logprobs")

    def __init__(self, block_id: int, kv: KV):
        self.id, self.kv, self.k, self.logprobs = block_id, kv, -1, None

    def scored(self, k: int) -> bool:
        return self.logprobs is not None and self.k >= k


class PrefixCache:
    """Up to ``max_tokens`` prompt tokens' keys and values, in blocks of ``block`` tokens."""

    def __init__(self, max_tokens: int, block: int = 16):
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"prefix cache: max_tokens must be an int >= 0, got {max_tokens!r}")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"prefix cache: block must be a positive int, got {block!r}")
        self.max_tokens, self.block = max_tokens, block
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()
        self._ids = itertools.count(1)

    @property
    def tokens(self) -> int:
        """Tokens held."""
        return len(self._blocks) * self.block

    def _chain(self, slot: int, prompt: list[int], blocks: int, k: int | None = None) -> list[tuple[tuple, _Block]]:
        """The cached blocks that begin ``prompt`` (at most ``blocks``; with ``k``, only while
        they hold log-probabilities with ``k`` alternatives), in order."""
        found, parent = [], 0
        for i in range(blocks):
            key = (slot, parent, tuple(prompt[i * self.block:(i + 1) * self.block]))
            entry = self._blocks.get(key)
            if entry is None or (k is not None and not entry.scored(k)):
                break
            found.append((key, entry))
            parent = entry.id
        return found

    def _touch(self, chain: list[tuple]) -> None:
        for key, _ in reversed(chain):  # the first block ends up the most recent
            self._blocks.move_to_end(key)

    def match(self, slot: int, prompt: list[int], logprobs: int | None = None) -> tuple[int, KV | None, list | None]:
        """``(n, kv, entries)``: the keys and values of the longest cached prefix of ``prompt``
        for the adapter in ``slot``, ``n`` tokens long (whole blocks, leaving at least one prompt
        token to compute), or ``(0, None, None)``. With ``logprobs=k`` (the prompt is scored with
        ``k`` alternatives) only blocks that kept their log-probabilities with at least ``k``
        alternatives count, and ``entries`` are those of the prefix's ``n`` tokens, cut to ``k``
        alternatives (the first token's is None); otherwise ``entries`` is None."""
        chain = self._chain(slot, prompt, (len(prompt) - 1) // self.block, logprobs)
        if not chain:
            return 0, None, None
        self._touch(chain)
        layers = len(chain[0][1].kv)
        kv = [tuple(torch.cat([entry.kv[layer][part] for _, entry in chain], -2) for part in (0, 1))
              for layer in range(layers)]
        entries = None
        if logprobs is not None:
            entries = [e if e is None or entry.k == logprobs else e._replace(top=e.top[:logprobs])
                       for _, entry in chain for e in entry.logprobs]
        return len(chain) * self.block, kv, entries

    def add(self, slot: int, prompt: list[int], kv: KV, logprobs: list | None = None, k: int = 0) -> None:
        """Keep the whole blocks of ``prompt`` (``kv``: its keys and values, at least as many
        tokens), copied out of ``kv``; then evict down to ``max_tokens``. ``logprobs``: the
        prompt's token log-probabilities with ``k`` alternatives (one per token, the first None),
        when it was scored; its blocks keep them."""
        blocks = min(len(prompt) // self.block, self.max_tokens // self.block)
        chain = self._chain(slot, prompt, blocks)
        parent = chain[-1][1].id if chain else 0
        for i in range(len(chain), blocks):
            key = (slot, parent, tuple(prompt[i * self.block:(i + 1) * self.block]))
            cut = slice(i * self.block, (i + 1) * self.block)
            entry = _Block(next(self._ids), [(keys[:, :, cut].clone(), values[:, :, cut].clone())
                                             for keys, values in kv])
            self._blocks[key] = entry
            chain.append((key, entry))
            parent = entry.id
        if logprobs is not None:
            for i, (_, entry) in enumerate(chain):
                if not entry.scored(k):
                    entry.k, entry.logprobs = k, tuple(logprobs[i * self.block:(i + 1) * self.block])
        self._touch(chain)
        while self.tokens > self.max_tokens:
            self._blocks.popitem(last=False)

    def drop(self, slot: int) -> None:
        """Forget every block of the adapter in ``slot`` (it is being replaced)."""
        for key in [key for key in self._blocks if key[0] == slot]:
            del self._blocks[key]
