"""Guided output: a request's text restricted to one of a list of strings (vLLM's
``guided_choice``, or ``structured_outputs: {"choice": [...]}``), for classification adapters,
or to a match of a regular expression (``guided_regex``, ``structured_outputs: {"regex": ...}``,
and JSON schemas turned into one by ``json_schema.py``), for extraction adapters.

The engine asks a request's guide which tokens may come next and rules out the others before it
chooses (greedy or sampled), then tells the guide the token it chose (``Engine``'s ``guide``
hook: ``allowed()`` and ``advance(token)``). ``ChoiceGuide`` allows a token only where the text
so far plus the token's text begins one of the choices *and* the rest of that choice can still be
written with the tokenizer's tokens, so a request never reaches a dead end; once the text is a
choice that no other choice extends, the output is complete (finish reason ``"stop"``). Where
one choice extends another, the stop tokens are allowed at the shorter one too.

A token's text is the text it adds after other text (``TokenTexts``): a leading space that a
tokenizer folds into a token (SentencePiece's "▁") is kept, as the server's decoded output keeps
it. Tokens whose text is empty (special tokens) or part of a character (byte-fallback pieces)
are never allowed inside a choice.

``RegexSet`` allows a token where the text so far plus the token's text can still grow into a
whole match of the pattern (``serve.pattern``), and the stop tokens where the text is a match;
the output is complete once no longer text would match. Its allowed tokens are found on the
tokens' texts as a tree of characters, a level of the tree at a time in tensors: the state after
each node's text is looked up from its parent's in a table of the automaton's moves by class of
characters (those that move every state alike, so a table row is a few dozen steps, made once per
state). This is done once per automaton state and request pattern, and kept for later requests
with the same pattern. Unlike a choice, a pattern can need a character
that no token writes alone (one byte-fallback pieces would spell): where the text can still match
but no token continues it, ``allowed()`` is empty and the engine ends the output as cut short
(``"length"``).
"""

from __future__ import annotations

import dataclasses

import torch

from .pattern import DEAD, USER_LIMITS, Pattern, shown

MAX_CHOICES = 256  # strings a request may offer
MAX_CHOICE_CHARS = 1024  # characters of one string
MAX_KEPT_BYTES = 64 << 20  # a RegexSet's allowed tokens kept per state (the oldest states' dropped past it)


class TokenTexts:
    """Each token's text as it reads after other text, and the tokens of each such text (made
    once per tokenizer: one batched decode of the vocabulary)."""

    def __init__(self, tokenizer, vocab: int):
        size = min(len(tokenizer), vocab)
        anchor, before = self._anchor(tokenizer, size)
        pairs = tokenizer.batch_decode([[anchor, t] for t in range(size)], skip_special_tokens=True)
        self.text = [pair[len(before):] if pair.startswith(before) else tokenizer.decode([t], skip_special_tokens=True)
                     for t, pair in enumerate(pairs)]
        self.ids: dict[str, list[int]] = {}
        for t, text in enumerate(self.text):
            if text and "\ufffd" not in text:
                self.ids.setdefault(text, []).append(t)
        self.longest = max(map(len, self.ids), default=0)
        self._tree = None

    def tree(self) -> Tree:
        """The texts as a tree of characters, in arrays (built at the first use)."""
        if self._tree is None:
            root: list = [{}, []]  # a node: [{char: node}, [tokens whose text ends here]]
            for text, ids in self.ids.items():
                node = root
                for ch in text:
                    node = node[0].setdefault(ch, [{}, []])
                node[1].extend(ids)
            chars = sorted({ch for text in self.ids for ch in text})
            index = {ch: i for i, ch in enumerate(chars)}
            order, parent, char, levels, tokens, nodes = [root], [0], [0], [0, 1], [], []
            for at, node in enumerate(order):  # breadth first: a level's nodes are next to each other
                if at == levels[-1]:
                    levels.append(len(order))
                for ch, child in node[0].items():
                    order.append(child)
                    parent.append(at)
                    char.append(index[ch])
                tokens += node[1]
                nodes += [at] * len(node[1])
            self._tree = Tree(chars, torch.tensor(parent), torch.tensor(char), levels,
                              torch.tensor(tokens, dtype=torch.long), torch.tensor(nodes, dtype=torch.long))
        return self._tree

    @staticmethod
    def _anchor(tokenizer, size: int) -> tuple[int, str]:
        """A token to decode the others after, and its text: "a"'s token, or else the first
        ordinary token with text of its own."""
        special = set(tokenizer.all_special_ids)
        for t in [*tokenizer.encode("a", add_special_tokens=False), *range(size)]:
            text = tokenizer.decode([t], skip_special_tokens=True)
            if t not in special and text and "\ufffd" not in text:
                return t, text
        raise ValueError("the tokenizer has no token with text of its own")


def check_choices(choices, param: str) -> list[str]:
    """``choices`` as a list of distinct strings, or ``ValueError`` naming ``param``."""
    if not (isinstance(choices, list) and 1 <= len(choices) <= MAX_CHOICES
            and all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in choices)):
        raise ValueError(f"{param}: must be a list of 1 to {MAX_CHOICES} non-empty strings of at most "
                         f"{MAX_CHOICE_CHARS} characters")
    return list(dict.fromkeys(choices))


@dataclasses.dataclass(frozen=True)
class Tree:
    """The tokens' texts as a tree of characters, breadth first (node 0 the root): per node,
    its parent and the character into it (an index into ``chars``; the root's are 0); where
    each level of the tree begins (the nodes of level ``d`` are ``levels[d]`` up to
    ``levels[d + 1]``), and each token with a text and the node where its text ends."""

    chars: list[str]
    parent: torch.Tensor
    char: torch.Tensor
    levels: list[int]
    tokens: torch.Tensor
    nodes: torch.Tensor


class ChoiceSet:
    """A request's ``choices``, ready to guide its outputs (see the module's docstring): which
    ends of each choice its tokens can reach, and the tokens allowed after each text, found once
    and shared by the request's outputs (``guide()`` gives each its own). ``stop_ids``: the
    request's stop tokens, never used inside a choice. Raises ``ValueError`` when a choice cannot
    be written with the tokenizer's tokens."""

    def __init__(self, texts: TokenTexts, choices: list[str], stop_ids=()):
        self.texts, self.choices, self.stops = texts, set(choices), sorted(set(stop_ids))
        self._allowed: dict[str, list[int]] = {}
        # ends[c][i]: c[i:] can be written with tokens (so a token may end at i)
        self.ends = {c: self._writable(c) for c in choices}
        for c in choices:
            if not self.ends[c][0]:
                raise ValueError(f"the choice {c!r} cannot be written with this tokenizer's tokens")

    def guide(self) -> ChoiceGuide:
        """A guide for one output, at its start."""
        return ChoiceGuide(self)

    def _pieces(self, text: str) -> list[int]:
        return [t for t in self.texts.ids.get(text, ()) if t not in self.stops]

    def _writable(self, choice: str) -> list[bool]:
        ends = [False] * len(choice) + [True]
        for i in range(len(choice) - 1, -1, -1):
            ends[i] = any(ends[j] and self._pieces(choice[i:j])
                          for j in range(i + 1, min(len(choice), i + self.texts.longest) + 1))
        return ends

    def longer(self, text: str) -> list[str]:
        """The choices ``text`` can still grow into (longer than it)."""
        i = len(text)
        return [c for c in self.choices if len(c) > i and c.startswith(text) and self.ends[c][i]]

    def allowed(self, text: str) -> list[int]:
        """The tokens that may follow ``text``."""
        if text not in self._allowed:
            i, ids = len(text), set()
            for c in self.longer(text):
                for j in range(i + 1, min(len(c), i + self.texts.longest) + 1):
                    if self.ends[c][j]:
                        ids.update(self._pieces(c[i:j]))
            if text in self.choices:
                ids.update(self.stops)
            self._allowed[text] = sorted(ids)
        return self._allowed[text]


class ChoiceGuide:
    """One output's guide to one of a ``ChoiceSet``'s choices: the text so far."""

    def __init__(self, choices: ChoiceSet):
        self.choices, self.text = choices, ""

    def allowed(self) -> list[int]:
        """The tokens that may come next."""
        return self.choices.allowed(self.text)

    def advance(self, token: int) -> bool:
        """Take the chosen ``token``; True once the text is a choice that nothing extends."""
        self.text += self.choices.texts.text[token]
        return self.text in self.choices.choices and not self.choices.longer(self.text)


class RegexSet:
    """A request's pattern, ready to guide its outputs (see the module's docstring): the tokens
    allowed in each automaton state, found when first needed and kept (the set is shared by
    requests with the same pattern and stop tokens). Raises ``ValueError`` for a pattern that
    ``Pattern`` cannot read (within ``limits``), or whose matches no token can begin."""

    def __init__(self, texts: TokenTexts, regex: str, stop_ids=(), limits: tuple[int, int] = USER_LIMITS):
        self.texts, self.pattern = texts, Pattern(regex, limits)
        self.stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self._allowed: dict[int, torch.Tensor] = {}  # per state: int32 ids
        self._kept, self.max_kept = 0, MAX_KEPT_BYTES  # bytes in _allowed, and their budget
        self._class, self._members = self._classes()
        self._moves = torch.full((1, len(self._members)), DEAD, dtype=torch.long)  # see _after
        self._known = torch.ones(1, dtype=torch.bool)
        if not len(self.allowed(self.pattern.start)):
            raise ValueError(f"no match of {shown(regex)} can be written with this tokenizer's tokens")

    def guide(self) -> RegexGuide:
        return RegexGuide(self)

    def _classes(self) -> tuple[torch.Tensor, list[str]]:
        """The tokens' characters in classes that move every state alike (the pattern's classes
        that hold some of them): per character of the tree, its class, and one member of each."""
        chars = self.texts.tree().chars
        cuts = torch.tensor([ord(c) for c in self.pattern.alphabet()])
        within = torch.searchsorted(cuts, torch.tensor([ord(c) for c in chars], dtype=torch.long), right=True)
        used, classes = torch.unique(within, return_inverse=True)
        members = [chars[int(i)] for i in torch.searchsorted(within, used)] if len(chars) else []
        return classes, members

    def _after(self, states: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The states after each of ``classes`` from the matching ``states`` (``DEAD`` stays
        ``DEAD``), from a table of the states' moves by class, a row added for each state the
        first time it is met (row 0 is ``DEAD``'s)."""
        rows = states + 1
        more = (int(rows.max()) + 1 if len(rows) else 0) - len(self._moves)
        if more > 0:  # room for the states made since (at least doubled)
            more = max(more, len(self._moves))
            self._moves = torch.cat([self._moves, self._moves.new_full((more, len(self._members)), DEAD)])
            self._known = torch.cat([self._known, self._known.new_zeros(more)])
        for row in torch.unique(rows[~self._known[rows]]).tolist():
            self._moves[row] = torch.tensor([self.pattern.step(row - 1, ch) for ch in self._members], dtype=torch.long)
            self._known[row] = True
        return self._moves[rows, classes]

    def allowed(self, state: int) -> torch.Tensor:
        """The tokens that may come in ``state``: an int32 tensor of ids, in order, found once
        and kept (while the kept states take under ``max_kept`` bytes): the kept tensor itself,
        not to be changed (a copy per step would cost what a step's mask does)."""
        if state not in self._allowed:
            kept = self._allowed[state] = self._found(state).to(torch.int32)
            self._kept += kept.nbytes
            while self._kept > self.max_kept and len(self._allowed) > 1:
                self._kept -= self._allowed.pop(next(iter(self._allowed))).nbytes
        return self._allowed[state]

    def _found(self, state: int) -> torch.Tensor:
        """The tokens that may come in ``state``, in order: see the module's docstring."""
        tree = self.texts.tree()
        at = torch.full((tree.levels[-1],), DEAD, dtype=torch.long)  # each node's state after its text
        at[0] = state
        for begin, end in zip(tree.levels[1:-1], tree.levels[2:]):  # a level at a time, from its parents'
            at[begin:end] = self._after(at[tree.parent[begin:end]], self._class[tree.char[begin:end]])
            if not (at[begin:end] != DEAD).any():
                break
        allowed = tree.tokens[at[tree.nodes] != DEAD].sort().values
        if len(self.stops):
            allowed = allowed[~torch.isin(allowed, self.stops)]
            if self.pattern.accepts(state):
                allowed = torch.cat([allowed, self.stops]).sort().values
        return allowed


class RegexGuide:
    """One output's guide to a match of a ``RegexSet``'s pattern: the automaton's state."""

    def __init__(self, regex: RegexSet):
        self.regex, self.state = regex, regex.pattern.start

    def allowed(self) -> torch.Tensor:
        """The tokens that may come next (empty: none can continue the text)."""
        return self.regex.allowed(self.state)

    def advance(self, token: int) -> bool:
        """Take the chosen ``token``; True once the text is a match that nothing extends."""
        self.state = self.regex.pattern.walk(self.state, self.regex.texts.text[token])
        return self.regex.pattern.complete(self.state)
