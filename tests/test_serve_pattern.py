"""The regular-expression automaton of guided output (``bora_kernels/serve/pattern.py``), against
Python's ``re``: every string over a small alphabet, its matches, whether it can still grow into
one, and whether it is complete. (``test_serve_guided.py`` checks the tokens a pattern allows.)"""

from __future__ import annotations

import itertools
import re

import pytest

from bora_kernels.serve.pattern import DEAD, Pattern


def strings(alphabet: str, longest: int):
    for n in range(longest + 1):
        for letters in itertools.product(alphabet, repeat=n):
            yield "".join(letters)


# (pattern, alphabet): every string of up to 5 characters and every growth of 1 to 4 (4 and 3
# over alphabets of more than 4 characters); from any string that can still match, a match is
# that many characters away at most
CASES = [
    (r"\d+", "1a-"),
    (r"-?\d+(\.\d+)?", "1-."),
    (r"(yes|no)", "yesno"),
    (r"[A-Z][a-z]{2,3}", "Aab"),
    (r"a{3}", "ab"),
    (r"a{2,}b", "ab"),
    (r"a{,2}b", "ab"),
    (r"(?:ab|a)*c?", "abc"),
    (r"[^\s@]+@(co|o)\.?", "a@.c o"),
    (r"x{", "x{"),
    (r"[\d\-a]+", "1-ab"),
    (r'\{"\d\}', '{"1}'),
    (r"[]a]+", "]ab"),
    (r"[a-]+", "a-b"),
    (r".*x", "x\nz"),
    (r"^(ok|no)$", "okn"),
    (r"[\w.]{1,3}", "a._ "),
    (r"\x41\u0042+", "AB"),
    (r"(?P<n>a|bc)(d|)", "abcd"),
    (r"[^\D5]+", "125a"),
    (r"a*?b+?", "ab"),
]


@pytest.mark.parametrize("regex, alphabet", CASES, ids=[c[0] for c in CASES])
def test_pattern_matches_as_python_does(regex, alphabet):
    """A string is a match exactly when ``re.fullmatch`` says so; its state is not ``DEAD``
    exactly when some growth of it matches; ``complete`` exactly when it matches and no growth
    does."""
    pattern, python = Pattern(regex), re.compile(regex)
    small = len(alphabet) <= 4
    growths = list(strings(alphabet, 4 if small else 3))[1:]
    matched = 0
    for text in strings(alphabet, 5 if small else 4):
        state = pattern.walk(pattern.start, text)
        assert pattern.accepts(state) == bool(python.fullmatch(text)), (regex, text)
        grows = any(python.fullmatch(text + more) for more in growths)
        assert (state != DEAD) == (grows or bool(python.fullmatch(text))), (regex, text)
        assert pattern.complete(state) == (bool(python.fullmatch(text)) and not grows), (regex, text)
        matched += pattern.accepts(state)
    assert matched  # each case reaches matches


@pytest.mark.parametrize("regex, message", [
    ("a|b)", "unbalanced ')'"), ("(a", "missing ')'"), ("*a", "nothing to repeat"), ("a++", "possessive"),
    ("(?=a)", "look-arounds"), (r"(a)\1", "back-references"), ("a{3,1}", "wrong way round"),
    ("a$b", "only at the pattern's end"), (r"\bword", "not supported"), ("[z-a]", "wrong way round"),
    ("[ab", "unexpected end"), (r"\x4", "bad '\\x' escape"), ("", "non-empty string"), (3, "non-empty string"),
    ("a" * 4097, "at most 4096"), ("(a{100}){100}", "more than 20000"),
])
def test_patterns_it_cannot_read_are_refused(regex, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Pattern(regex)
