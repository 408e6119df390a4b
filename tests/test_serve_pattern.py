"""The regular-expression automaton of guided output (``bora_kernels/serve/pattern.py``), against
Python's ``re``: every string over a small alphabet, its matches, whether it can still grow into
one, and whether it is complete; whether two patterns share a match; JSON schemas' ``pattern``
read as a search within a string's value. (``test_serve_guided.py`` checks the tokens a pattern
allows, ``test_serve_json_schema.py`` whole schemas.)"""

from __future__ import annotations

import itertools
import re

import pytest

from bora_kernels.serve.pattern import DEAD, Pattern, json_string_pattern


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
    (r"\U00000041\U0001F600*", "A\U0001F600b"),
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
    ("[ab", "unexpected end"), (r"\x4", "bad '\\x' escape"), (r"\U00110000", "bad '\\U' escape"), ("", "non-empty string"), (3, "non-empty string"),
    ("a" * 4097, "at most 4096"), ("(a{100}){100}", "more than 20000"), ("(" * 1000 + "a" + ")" * 1000, "too deeply"),
])
def test_patterns_it_cannot_read_are_refused(regex, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Pattern(regex)


@pytest.mark.parametrize("first, second, shared", [
    (r"\d+", r"[0-5]{2}", True), (r"a+", r"b+", False), (r"(ab)*", r"a(ba)*b", True), (r"[^a]", r"a", False),
    (r"x.{2}", r".{2}y", True), (r"\w+", r"\W+", False), (r"-?\d+", r"\d+(\.\d+)?", True), (r"a{3}", r"a{2}", False),
    (r"[\u00e9-\u00ff]", r"[^a-z]", True), (r"[^\u00e9]", r"\u00e9", False), (r'"a*"', r'"[b-z]+"', False),
    (r"(0|[1-9][0-9]*)(\.[0-9]+)?", r"-?(0|[1-9][0-9]*)", True), (r"1\.5|2", r"-?1(\.0+)?", False),
])
def test_intersects_finds_a_shared_match(first, second, shared):
    """Whether some text matches both, both ways round; where it does, a shared match over the
    strings of up to 4 characters of the two patterns' own characters agrees."""
    a, b = Pattern(first), Pattern(second)
    assert a.intersects(b) == shared == b.intersects(a)
    if not shared:
        alphabet = "0159ab.-xyz\"\u00e9"
        assert not any(re.fullmatch(first, t) and re.fullmatch(second, t) for t in strings(alphabet, 3))


@pytest.mark.parametrize("regex", [r"^[A-Z]{2}-\d{3}$", r"ab+", r"^a.", r".b$", r"[^a]{2}", r"\W\d|\S\D",
                                   r"^(?:a|\u00e9)+$", r"\\$", r"a\$", r"\s"])
def test_json_string_pattern_is_a_search_within_the_value(regex):
    """Over every string of up to 3 characters (quotes, backslashes, non-ASCII letters and spaces
    among them): a value it allows (with any text before and after the match where not anchored)
    is one ``re.search`` finds a match in; its match holds no character a JSON string writes
    escaped; over printable ASCII without those, it allows exactly the values ``re.search`` finds
    a match in."""
    text, at_start, at_end = json_string_pattern(regex)
    whole = re.compile(("" if at_start else ".*") + f"(?:{text})" + ("" if at_end else ".*"), re.DOTALL)
    Pattern(text)  # our automaton reads it too
    for value in strings('a1- "\\\u00e9\u00a0\u0663', 3):
        if whole.fullmatch(value):
            assert re.search(regex, value), value
        if re.fullmatch(text, value):
            assert not set(value) & set('"\\'), value
        elif set(value) <= set("a1- ") and not whole.fullmatch(value):
            assert not re.search(regex, value), value
