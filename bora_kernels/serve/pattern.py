"""Regular expressions as automata over characters, for guided output (``guided_regex``).

``Pattern(regex)`` reads a regular expression in Python's syntax, less what needs more than an
automaton (back-references, look-arounds, possessive quantifiers, flags), and answers, for the
text generated so far, whether the whole of it can still grow into a match: ``step`` walks one
character from a state, ``walk`` a string. A match is of the whole output (as ``re.fullmatch``);
``^`` and ``$`` are accepted at the pattern's ends only, where they change nothing.

How: the expression is parsed into a tree, the tree into a nondeterministic automaton (one start,
one accepting end, empty moves and character moves), and its sets of states into deterministic
states as the text meets them, each step cached. States from which the end cannot be reached
are dropped from every set, so a state exists only while a match is still possible (unless the
pattern needs a character from an empty set, such as ``[^\\s\\S]``): ``step`` returns ``DEAD``
otherwise.

``json_string_pattern(regex)`` serves JSON schemas' ``pattern`` keyword: the same syntax, read as
a search within a JSON string's value, written as the string's text between its quotes.
"""

from __future__ import annotations

import dataclasses

DEAD = -1
MAX_STATES = 20000  # automaton states a pattern may need (a bound on {n,m} repeats)
MAX_PATTERN_CHARS = 4096
MAX_NESTING = 200  # groups within groups (the parser and the automaton's builder recurse into them)
USER_LIMITS = (MAX_PATTERN_CHARS, MAX_STATES)  # a request's own pattern: characters, automaton states
SCHEMA_LIMITS = (1_000_000, 200_000)  # one written from a JSON schema (large models, free-form values)


@dataclasses.dataclass(frozen=True)
class Chars:
    """A set of characters: inclusive code-point ranges, or everything outside them."""

    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def __contains__(self, ch: str) -> bool:
        code = ord(ch)
        return any(lo <= code <= hi for lo, hi in self.ranges) != self.negated


def _ranges(chars: str) -> tuple[tuple[int, int], ...]:
    return tuple((ord(c), ord(c)) for c in chars)


DIGITS = ((ord("0"), ord("9")),)
WORD = ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("_"), ord("_")), (ord("a"), ord("z")))
SPACE = _ranges(" \t\n\r\f\v")
CLASSES = {"d": Chars(DIGITS), "D": Chars(DIGITS, True), "w": Chars(WORD), "W": Chars(WORD, True),
           "s": Chars(SPACE), "S": Chars(SPACE, True)}
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
ANY = Chars(_ranges("\n"), True)  # "." as Python reads it: anything but a newline
PRINTABLE_ASCII = ((0x20, 0x7E),)


class _Parser:
    """Recursive descent over the pattern: alternation, concatenation, repeats, atoms. Its tree:
    ``("chars", Chars)``, ``("cat", [...])``, ``("alt", [...])``, ``("rep", node, lo, hi or None)``."""

    def __init__(self, text: str, classes: dict[str, Chars] = CLASSES):
        self.text, self.i, self.classes, self.depth = text, 0, classes, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"{what} at position {self.i} of {shown(self.text)}")

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def take(self) -> str:
        ch = self.peek()
        if ch is None:
            raise self.error("unexpected end")
        self.i += 1
        return ch

    def parse(self):
        if self.text.startswith("^"):
            self.i = 1
        node = self.alternation()
        if self.peek() is not None:
            raise self.error("unbalanced ')'")
        return node

    def alternation(self):
        options = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.concatenation())
        return options[0] if len(options) == 1 else ("alt", options)

    def concatenation(self):
        parts = []
        while self.peek() not in (None, "|", ")"):
            if self.text[self.i:] == "$":  # the pattern's end: a whole-output match anyway
                self.i += 1
                break
            parts.append(self.repeat(self.atom()))
        return ("cat", parts)

    def repeat(self, node):
        while self.peek() in ("*", "+", "?", "{"):
            ch, start = self.take(), self.i
            if ch == "{":
                bounds = self.bounds()
                if bounds is None:  # a literal "{", as Python reads one that starts no repeat
                    self.i = start
                    return ("cat", [node, ("chars", Chars(_ranges("{")))])
                lo, hi = bounds
            else:
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            if self.peek() == "?":  # lazy: the same set of matches
                self.i += 1
            elif self.peek() == "+":
                raise self.error("possessive repeats are not supported")
            node = ("rep", node, lo, hi)
        return node

    def bounds(self) -> tuple[int, int | None] | None:
        end = self.text.find("}", self.i)
        if end < 0:
            return None
        lo, comma, hi = self.text[self.i:end].partition(",")
        if not (lo.isdigit() or (comma and not lo)) or not (hi.isdigit() or not hi) or not (lo or hi):
            return None
        self.i = end + 1
        lo_n, hi_n = int(lo or 0), (int(hi) if hi else None if comma else int(lo))
        if hi_n is not None and hi_n < lo_n:
            raise self.error(f"the repeat {{{lo},{hi}}} has its bounds the wrong way round")
        return lo_n, hi_n

    def atom(self):
        ch = self.take()
        if ch == "(":
            if self.peek() == "?":
                self.i += 1
                kind = self.take()
                if kind == "P" and self.peek() == "<":
                    end = self.text.find(">", self.i)
                    if end < 0:
                        raise self.error("unterminated group name")
                    self.i = end + 1
                elif kind != ":":
                    raise self.error(f"'(?{kind}' (look-arounds, flags, references) is not supported")
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.error(f"groups nest too deeply (over {MAX_NESTING})")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            self.depth -= 1
            return node
        if ch == "[":
            return ("chars", self.char_class())
        if ch == ".":
            return ("chars", ANY)
        if ch == "\\":
            return ("chars", self.escape(in_class=False))
        if ch in "*+?":
            raise self.error(f"nothing to repeat before '{ch}'")
        if ch in "^$":
            raise self.error(f"'{ch}' is supported only at the pattern's {'start' if ch == '^' else 'end'}")
        return ("chars", Chars(_ranges(ch)))

    def escape(self, in_class: bool) -> Chars:
        ch = self.take()
        if ch in self.classes:
            return self.classes[ch]
        if ch in ESCAPES:
            return Chars(_ranges(ESCAPES[ch]))
        if ch in HEX_DIGITS:
            count = HEX_DIGITS[ch]
            digits = self.text[self.i:self.i + count]
            if len(digits) != count or not all(c in "0123456789abcdefABCDEF" for c in digits) \
                    or int(digits, 16) > 0x10FFFF:
                raise self.error(f"bad '\\{ch}' escape")
            self.i += count
            return Chars(((int(digits, 16),) * 2,))
        if ch.isalnum():
            raise self.error(f"'\\{ch}' is not supported" + ("" if in_class else " (back-references and "
                                                                                   "anchors need more than an automaton)"))
        return Chars(_ranges(ch))

    def char_class(self) -> Chars:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            ch = self.take()
            if ch == "]" and not first:
                break
            first = False
            if ch == "\\":
                item = self.escape(in_class=True)
                if item.negated or len(item.ranges) != 1 or item.ranges[0][0] != item.ranges[0][1]:
                    if item.negated:  # \D, \W, \S inside a class: the complement's gaps as ranges
                        ranges.extend(_subtract(((0, 0x10FFFF),), item.ranges))
                    else:
                        ranges.extend(item.ranges)
                    continue
                lo = item.ranges[0][0]
            else:
                lo = ord(ch)
            if self.peek() == "-" and self.i + 1 < len(self.text) and self.text[self.i + 1] != "]":
                self.i += 1
                end = self.take()
                hi = self.escape(in_class=True).ranges[0][0] if end == "\\" else ord(end)
                if hi < lo:
                    raise self.error("a character range with its ends the wrong way round")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return Chars(tuple(ranges), negated)


def _subtract(ranges, remove) -> list[tuple[int, int]]:
    """The code points of ``ranges`` outside ``remove`` (both inclusive ranges), as ranges."""
    out = []
    for lo, hi in sorted(ranges):
        for cut_lo, cut_hi in sorted(remove):
            if cut_hi < lo or cut_lo > hi:
                continue
            if cut_lo > lo:
                out.append((lo, cut_lo - 1))
            lo = cut_hi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


def _parse(regex, classes: dict[str, Chars] = CLASSES, most: int = MAX_PATTERN_CHARS):
    if not isinstance(regex, str) or not 0 < len(regex) <= most:
        raise ValueError(f"must be a non-empty string of at most {most} characters")
    return _Parser(regex, classes).parse()


def shown(regex: str) -> str:
    """A pattern as an error message quotes it (the start of a long one)."""
    return repr(regex) if len(regex) <= 100 else f"the pattern {regex[:60]!r}..."


class Pattern:
    """A regular expression as an automaton over characters (see the module's docstring).
    States are ints from ``start``; raises ``ValueError`` for a pattern it cannot read, or
    longer or needing more automaton states than ``limits`` (``USER_LIMITS``, or
    ``SCHEMA_LIMITS`` for a pattern made from a JSON schema)."""

    def __init__(self, regex: str, limits: tuple[int, int] = USER_LIMITS):
        self.regex, self._most = regex, limits[1]
        self._empty: list[list[int]] = []  # per automaton state: empty moves
        self._moves: list[list[tuple[Chars, int]]] = []  # and character moves
        begin, self._end = self._build(_parse(regex, most=limits[0]))
        self._live = self._reaching_end()
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._steps: list[dict[str, int]] = []
        first = self._closure({begin})
        if not first:
            raise ValueError(f"{shown(regex)} matches nothing")
        self.start = self._state(first)

    # the nondeterministic automaton

    def _new(self) -> int:
        if len(self._empty) >= self._most:
            raise ValueError(f"{shown(self.regex)} needs more than {self._most} automaton states (large {{n,m}} "
                             "repeats; in a JSON schema, many optional properties with large values)")
        self._empty.append([])
        self._moves.append([])
        return len(self._empty) - 1

    def _build(self, node) -> tuple[int, int]:
        kind = node[0]
        if kind == "chars":
            a, b = self._new(), self._new()
            self._moves[a].append((node[1], b))
            return a, b
        if kind == "cat":
            a = b = self._new()
            for part in node[1]:
                s, e = self._build(part)
                self._empty[b].append(s)
                b = e
            return a, b
        if kind == "alt":
            a, b = self._new(), self._new()
            for option in node[1]:
                s, e = self._build(option)
                self._empty[a].append(s)
                self._empty[e].append(b)
            return a, b
        _, inner, lo, hi = node  # "rep": lo copies, then (hi - lo) optional ones or a loop
        a = b = self._new()
        for _ in range(lo):
            s, e = self._build(inner)
            self._empty[b].append(s)
            b = e
        if hi is None:
            s, e = self._build(inner)
            self._empty[b].append(s)
            self._empty[e].append(s)
            end = self._new()
            self._empty[b].append(end)
            self._empty[e].append(end)
            return a, end
        end = self._new()
        for _ in range(hi - lo):
            self._empty[b].append(end)
            s, e = self._build(inner)
            self._empty[b].append(s)
            b = e
        self._empty[b].append(end)
        return a, end

    def _reaching_end(self) -> set[int]:
        """The automaton states from which the end can be reached."""
        back: list[list[int]] = [[] for _ in self._empty]
        for s, targets in enumerate(self._empty):
            for t in targets:
                back[t].append(s)
        for s, moves in enumerate(self._moves):
            for _, t in moves:
                back[t].append(s)
        live, todo = {self._end}, [self._end]
        while todo:
            for s in back[todo.pop()]:
                if s not in live:
                    live.add(s)
                    todo.append(s)
        return live

    def _closure(self, states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for t in self._empty[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen & self._live)

    # the deterministic states, made as the text meets them

    def _state(self, states: frozenset[int]) -> int:
        if states not in self._ids:
            self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._steps.append({})
        return self._ids[states]

    def step(self, state: int, ch: str) -> int:
        """The state after ``ch``, or ``DEAD`` when no match begins with the text so far and ``ch``."""
        steps = self._steps[state]
        if ch not in steps:
            targets = {t for s in self._sets[state] for chars, t in self._moves[s] if ch in chars}
            after = self._closure(targets)
            steps[ch] = self._state(after) if after else DEAD
        return steps[ch]

    def walk(self, state: int, text: str) -> int:
        for ch in text:
            if state == DEAD:
                break
            state = self.step(state, ch)
        return state

    @property
    def size(self) -> int:
        """The nondeterministic automaton's states (what the pattern costs to keep)."""
        return len(self._empty)

    def accepts(self, state: int) -> bool:
        """The text so far is a match."""
        return state != DEAD and self._end in self._sets[state]

    def complete(self, state: int) -> bool:
        """The text so far is a match, and no longer text would be one."""
        return self.accepts(state) and not any(self._moves[s] for s in self._sets[state])

    def fullmatch(self, text: str) -> bool:
        return self.accepts(self.walk(self.start, text))

    def alphabet(self, *others: Pattern) -> list[str]:
        """One character of each stretch of code points that no set of this pattern (or of
        ``others``) splits: every character of a stretch moves every state alike."""
        cuts = {0}
        for pattern in (self, *others):
            for moves in pattern._moves:
                for chars, _ in moves:
                    cuts.update(edge for lo, hi in chars.ranges for edge in (lo, hi + 1))
        return [chr(code) for code in sorted(cuts) if code <= 0x10FFFF]

    def intersects(self, other: Pattern, limit: int = MAX_STATES) -> bool:
        """Whether some text is a match of both: pairs of states walked over ``alphabet``;
        ``ValueError`` past ``limit`` pairs."""
        alphabet = self.alphabet(other)
        seen, todo = {(self.start, other.start)}, [(self.start, other.start)]
        while todo:
            a, b = todo.pop()
            if self.accepts(a) and other.accepts(b):
                return True
            for ch in alphabet:
                after = (self.step(a, ch), other.step(b, ch))
                if DEAD not in after and after not in seen:
                    if len(seen) >= limit:
                        raise ValueError(f"too large to check against another pattern (over {limit} pairs of states)")
                    seen.add(after)
                    todo.append(after)
        return False


# JSON schemas' `pattern`: a search within a string's value. In the string's text a quote, a
# backslash and control characters are written escaped, and U+2028/U+2029 end a line for "." in
# ECMA-262 (the schemas' own dialect) but not in Python's re: the pattern's characters keep clear
# of them all, so that its text is the value itself and every dialect reads it alike.
NOT_IN_JSON_TEXT = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x2028, 0x2029))



# \D, \W, \S as printable ASCII: Python's re reads \d, \w, \s as Unicode classes (ECMA-262 as
# ASCII ones), so their complements agree on ASCII only; so do ".", [^...] (see _json_chars)
JSON_CLASSES = {**CLASSES, "D": Chars(tuple(_subtract(PRINTABLE_ASCII, DIGITS))),
                "W": Chars(tuple(_subtract(PRINTABLE_ASCII, WORD))), "S": Chars(tuple(_subtract(PRINTABLE_ASCII, SPACE)))}


def _json_chars(chars: Chars) -> Chars:
    ranges = _subtract(PRINTABLE_ASCII, chars.ranges) if chars.negated else chars.ranges
    return Chars(tuple(_subtract(ranges, NOT_IN_JSON_TEXT)))


def _code(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _text(node) -> str:
    """The tree (after ``_json_chars``, so no negated sets) as pattern text."""
    kind = node[0]
    if kind == "chars":
        ranges = node[1].ranges
        if not ranges:
            return r"[^\s\S]"
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1] and chr(ranges[0][0]).isascii() \
                and chr(ranges[0][0]).isalnum():
            return chr(ranges[0][0])
        return "[" + "".join(_code(lo) if lo == hi else f"{_code(lo)}-{_code(hi)}" for lo, hi in ranges) + "]"
    if kind == "cat":
        return "".join(_text(part) for part in node[1])
    if kind == "alt":
        return "(?:" + "|".join(_text(option) for option in node[1]) + ")"
    _, inner, lo, hi = node
    return f"(?:{_text(inner)}){{{lo},{'' if hi is None else hi}}}"


def _json_tree(node):
    kind = node[0]
    if kind == "chars":
        return ("chars", _json_chars(node[1]))
    if kind in ("cat", "alt"):
        return (kind, [_json_tree(part) for part in node[1]])
    return ("rep", _json_tree(node[1]), *node[2:])


def json_string_pattern(regex: str) -> tuple[str, bool, bool]:
    """A JSON schema's ``pattern`` (``regex``, in the syntax ``Pattern`` reads) as pattern text for
    values that match it written without escapes, and whether it is anchored at the value's start
    and at its end (elsewhere the value may hold any text before and after the match).

    Its characters keep clear of those a JSON string's text writes escaped, and ``.``, ``[^...]``,
    ``\\D``, ``\\W``, ``\\S`` stand for printable ASCII only (where Python's and ECMA-262's
    readings agree). A ``^`` that starts the pattern or a ``$`` that ends it anchors the whole of
    it, every alternative included: a narrower reading than the schema's, so its matches still
    match. ``ValueError`` for a pattern it cannot read."""
    tree = _parse(regex, JSON_CLASSES)
    before = regex[:-1]  # a "$" that ends it is an anchor unless an odd number of backslashes escape it
    at_end = regex.endswith("$") and (len(before) - len(before.rstrip("\\"))) % 2 == 0
    return _text(_json_tree(tree)), regex.startswith("^"), at_end
