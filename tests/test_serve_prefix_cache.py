"""The serving engine's prefix cache on its own: exact prefixes per adapter slot, the budget, the
eviction order and dropping a slot. (``test_serve_engine.py`` checks the engine's outputs with it.)"""

from __future__ import annotations

import pytest
import torch

from bora_kernels.serve import TokenLogprobs
from bora_kernels.serve.prefix_cache import PrefixCache


def kv_of(prompt: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values that depend on the token and its position only, as a causal model's do
    (here: each layer's [1, 2, tokens, 3] holds token * 100 + position and its negative)."""
    values = torch.tensor([t * 100.0 + i for i, t in enumerate(prompt)])
    keys = values[None, None, :, None].expand(1, 2, -1, 3)
    return [(keys + layer, -keys - layer) for layer in range(layers)]


def test_match_returns_the_longest_cached_prefix_exactly():
    cache = PrefixCache(max_tokens=12, block=2)
    a = [1, 2, 3, 4, 5, 6, 7]
    cache.add(0, a, kv_of(a))
    assert cache.tokens == 6  # whole blocks only
    for prompt, want in (([1, 2, 3, 4, 5, 6, 7, 8], 6), ([1, 2, 3, 4, 5, 6], 4),  # one token left to compute
                         ([1, 2, 3, 9, 5, 6], 2), ([9, 2, 3, 4], 0), ([1, 2], 0)):
        n, kv, entries = cache.match(0, prompt)
        assert entries is None  # nothing scored asked
        assert n == want, prompt
        if n:
            for (k, v), (k0, v0) in zip(kv, kv_of(a)):
                assert torch.equal(k, k0[:, :, :n]) and torch.equal(v, v0[:, :, :n])
        else:
            assert kv is None
    assert cache.match(1, a) == (0, None, None)  # another adapter's slot


def test_budget_eviction_order_and_drop():
    """At most ``max_tokens`` after each add; the least recently used blocks go first, a chain's
    later blocks before its earlier ones; ``drop`` forgets one slot's blocks."""
    cache = PrefixCache(max_tokens=8, block=2)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9]
    cache.add(0, a, kv_of(a))
    cache.add(0, b, kv_of(b))  # shares 2 blocks with a, adds 1: 5 blocks > 4, a's last block goes
    assert cache.tokens == 8
    assert cache.match(0, a + [0])[0] == 6 and cache.match(0, b + [0])[0] == 6
    cache.add(1, [5, 5, 6, 6], kv_of([5, 5, 6, 6]))  # 2 more blocks: the chains' last blocks go,
    assert cache.tokens == 8                          # not the first two they share
    assert cache.match(1, [5, 5, 6, 6, 0])[0] == 4
    assert cache.match(0, b + [0])[0] == 4 and cache.match(0, a + [0])[0] == 4
    cache.drop(1)
    assert cache.match(1, [5, 5, 6, 6, 0]) == (0, None, None) and cache.tokens == 4
    too_long = list(range(30))
    cache.add(0, too_long, kv_of(too_long))  # more than the budget: its first blocks, as many as fit
    assert cache.tokens == 8 and cache.match(0, too_long)[0] == 8


def scores_of(prompt: list[int], k: int) -> list:
    """Made-up log-probabilities of ``prompt``'s tokens with ``k`` alternatives (the first None)."""
    return [None] + [TokenLogprobs(t, -0.5 * i, tuple((t + j, -0.1 * j) for j in range(k)))
                     for i, t in enumerate(prompt[1:], 1)]


def test_scored_prompts_reuse_blocks_that_kept_their_log_probabilities():
    """A scored prompt matches only blocks that kept their tokens' log-probabilities with at
    least as many alternatives as it asks, and gets them cut to its count; a block kept without
    them (or with fewer) gets them when a scored prompt adds it again. Unscored prompts use every
    block."""
    cache = PrefixCache(max_tokens=12, block=2)
    a = [1, 2, 3, 4, 5, 6, 7]
    cache.add(0, a[:4], kv_of(a[:4]))  # 2 blocks, unscored
    assert cache.match(0, a, logprobs=0) == (0, None, None)
    cache.add(0, a, kv_of(a), scores_of(a, 2), 2)  # the 2 get scores, a 3rd block is added with them
    n, kv, entries = cache.match(0, a + [8], logprobs=2)
    assert n == 6 and entries == scores_of(a, 2)[:6]
    for (k, v), (k0, v0) in zip(kv, kv_of(a)):
        assert torch.equal(k, k0[:, :, :6]) and torch.equal(v, v0[:, :, :6])
    assert cache.match(0, a + [8], logprobs=1)[2] == scores_of(a, 1)[:6]  # cut to 1 alternative
    assert cache.match(0, a + [8], logprobs=3) == (0, None, None)  # kept with 2 only
    cache.add(0, a[:5], kv_of(a[:5]), scores_of(a[:5], 3), 3)  # its 2 blocks now keep 3
    n, _, entries = cache.match(0, a + [8], logprobs=3)
    assert n == 4 and entries == scores_of(a, 3)[:4]
    assert cache.match(0, a + [8])[:1] == (6,) and cache.match(0, a + [8])[2] is None
    assert cache.match(0, [1, 2, 9, 9, 9], logprobs=0)[0] == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens must be an int >= 0"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="block must be a positive int"):
        PrefixCache(16, block=0)
