"""Guided output (``bora_kernels/serve/guided.py``) on its own: each token's text after other
text; a guide that allows exactly the tokens that can still end in one of the choices, checked
against every token sequence that writes a choice; and one that allows exactly the tokens that
can still end in a match of a pattern, checked with Python's ``re``; a JSON schema guiding a
byte-level BPE to objects Pydantic accepts. (``test_serve_engine.py`` checks the engine's
masking, ``test_serve_http.py`` the API's guided fields.)"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import itertools  # noqa: E402
import re  # noqa: E402

import torch  # noqa: E402

from bora_kernels.serve.guided import ChoiceSet, RegexSet, TokenTexts, check_choices  # noqa: E402
from bora_kernels.serve.pattern import DEAD  # noqa: E402

# a SentencePiece-like vocabulary ("▁" is a space folded into the token): "abc" can be written
# "ab" + "c" but "a" leads nowhere (no "b" or "bc"); " yes" as one token or as "▁" "y" "es"
PIECES = ["<unk>", "</s>", "a", "ab", "c", "▁yes", "y", "es", "▁no", "no", "▁", "▁maybe", "may", "be", "<0xE2>",
          "abc", "x"]
STOP = 1


@pytest.fixture(scope="module")
def texts():
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(PIECES)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.ByteFallback(), tokenizers.decoders.Metaspace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    return TokenTexts(tokenizer, vocab=len(PIECES) + 5)  # (a model's vocabulary may be larger)


def test_token_texts_keep_the_space_a_token_folds_in(texts):
    """Each token's text as it reads after other text; special tokens' and part-characters'
    (byte-fallback pieces) are never a choice's."""
    assert texts.text[PIECES.index("▁yes")] == " yes" and texts.text[PIECES.index("y")] == "y"
    assert texts.text[PIECES.index("▁")] == " " and texts.text[STOP] == "" and texts.text[0] == ""
    assert texts.text[PIECES.index("<0xE2>")] == "\ufffd" and len(texts.text) == len(PIECES)
    assert texts.ids[" yes"] == [PIECES.index("▁yes")] and "" not in texts.ids and "\ufffd" not in texts.ids
    assert texts.longest == len(" maybe")


def writings(texts, choices, stops) -> list[tuple[int, ...]]:
    """Every token sequence whose text is one of ``choices`` (no stop token, no empty text)."""
    found, todo = [], [((), "")]
    while todo:
        tokens, text = todo.pop()
        if text in choices:
            found.append(tokens)
        for t, piece in enumerate(texts.text):
            if piece and t not in stops and "\ufffd" not in piece and any(c.startswith(text + piece) for c in choices):
                todo.append((tokens + (t,), text + piece))
    return found


@pytest.mark.parametrize("choices", [["abc", " yes", "yes", " maybe", "c"], ["ab", "abc"], [" no", " yes", "x"]])
def test_guide_allows_exactly_the_tokens_that_can_end_in_a_choice(texts, choices):
    """Walked along every way of writing a choice: at each point the guide allows exactly the
    tokens that some writing takes next (plus the stop token where the text is a choice that a
    longer one extends), and says the output is complete exactly where nothing can follow."""
    full = writings(texts, choices, {STOP})
    prefixes = {w[:i] for w in full for i in range(len(w) + 1)}
    assert () in prefixes and len(full) >= len(choices)
    for prefix in prefixes:
        guide = ChoiceSet(texts, check_choices(choices, "choices"), [STOP]).guide()
        complete = [guide.advance(t) for t in prefix]
        follow = {w[len(prefix)] for w in full if w[:len(prefix)] == prefix and len(w) > len(prefix)}
        ends_here = prefix in full
        assert complete == ([False] * (len(prefix) - 1) + [ends_here and not follow] if prefix else [])
        if follow or not ends_here:
            assert guide.allowed() == sorted(follow | ({STOP} if ends_here else set())), (prefix, guide.text)


def test_choices_that_cannot_be_written_are_refused(texts):
    with pytest.raises(ValueError, match="'zz' cannot be written"):
        ChoiceSet(texts, ["ab", "zz"], [STOP])
    c = PIECES.index("c")  # a stop token is never written inside a choice: "abc" needs "c" or "abc"
    assert ChoiceSet(texts, ["abc"], [STOP, c]).guide().allowed() == [PIECES.index("abc")]
    for bad in ([], ["ok", ""], ["ok", 3], "yes", ["x" * 1025]):
        with pytest.raises(ValueError, match="choices: must be a list of 1 to 256 non-empty strings"):
            check_choices(bad, "choices")
    assert check_choices(["b", "a", "b"], "choices") == ["b", "a"]


@pytest.mark.parametrize("regex", [r" ?(yes|no)", r"(ab)+c?", r"[a-c]{2,3}x?", r"may(be)?", r"[^a]*"])
def test_regex_guide_allows_exactly_the_tokens_that_can_end_in_a_match(texts, regex):
    """Along every output of up to 3 tokens that the guide allows: it allows a token exactly when
    the text with it is a match for ``re.fullmatch``, or becomes one with some characters after
    it (up to 3 of the vocabulary's, enough for these patterns), and the stop token exactly where
    the text is a match; it says the output is complete exactly where the text is a match that
    no longer text matches."""
    pieces = [t for t, text in enumerate(texts.text) if text and "\ufffd" not in text and t != STOP]
    alphabet = sorted(set("".join(texts.text[t] for t in pieces)))
    growths = ["".join(more) for n in (1, 2, 3) for more in itertools.product(alphabet, repeat=n)]
    python = re.compile(regex)

    def grows(text: str) -> bool:
        return any(python.fullmatch(text + more) for more in growths)

    regexes = RegexSet(texts, regex, [STOP])
    todo = [()]
    while todo:
        prefix = todo.pop()
        guide = regexes.guide()
        complete = [guide.advance(t) for t in prefix]
        text = "".join(texts.text[t] for t in prefix)
        matched = bool(python.fullmatch(text))
        want = {t for t in pieces if python.fullmatch(text + texts.text[t]) or grows(text + texts.text[t])}
        allowed = guide.allowed().tolist()
        assert sorted(allowed) == sorted(want | ({STOP} if matched else set())), (regex, text)
        if prefix:
            assert complete[-1] == (matched and not grows(text)), (regex, text)
        if len(prefix) < 3:
            todo.extend(prefix + (t,) for t in want)


def test_regex_sets_keep_allowed_tokens_within_their_budget(texts):
    """A state's allowed tokens are kept as int32 ids; past ``max_kept`` bytes the oldest
    states' are dropped and found again when met: along every output of up to 3 tokens, a set
    kept within 16 bytes answers as one kept whole."""
    regex = r"(ab)+c?|[^a]*x"
    whole, small, todo, met = RegexSet(texts, regex, [STOP]), RegexSet(texts, regex, [STOP]), [()], 0
    small.max_kept = 16
    while todo:
        prefix = todo.pop()
        a, b = whole.guide(), small.guide()
        for t in prefix:
            a.advance(t)
            b.advance(t)
        allowed = a.allowed().tolist()
        assert b.allowed().tolist() == allowed, prefix
        assert small._kept <= 16 or len(small._allowed) == 1, small._kept
        met += 1
        if len(prefix) < 3:
            todo.extend(prefix + (t,) for t in allowed if t != STOP)
    kinds = {kept.dtype for kept in whole._allowed.values()}
    assert kinds == {torch.int32} and len(small._allowed) < len(whole._allowed) < met, (kinds, met)


def test_patterns_no_token_can_write_are_refused_or_cut_short(texts):
    """A pattern whose matches no token begins is refused; one that needs a character no token
    writes alone leaves a guide with nothing to allow there (the engine ends such an output as
    ``"length"``); a stop token is never written inside a match."""
    for regex in ("zz", r"[^\s\S]"):
        with pytest.raises(ValueError, match="can be written with this tokenizer's tokens"):
            RegexSet(texts, regex, [STOP])
    guide = RegexSet(texts, "xq", [STOP]).guide()
    assert guide.allowed().tolist() == [PIECES.index("x")]
    assert not guide.advance(PIECES.index("x")) and guide.allowed().tolist() == []
    c = PIECES.index("c")
    # "a" may start "abc" though "bc" has no tokens (a text is followed character by character)
    want = [PIECES.index("a"), PIECES.index("ab"), PIECES.index("abc")]
    assert RegexSet(texts, "abc", [STOP, c]).guide().allowed().tolist() == want
    with pytest.raises(ValueError, match="missing"):
        RegexSet(texts, "(ab", [STOP])


def _random_outputs(regexes: RegexSet, stop: int, rng, outputs: int, longest: int, stop_chance: float, checked: set):
    """The texts of ``outputs`` outputs of tokens drawn at random among those ``regexes`` allows
    (its stop token, where allowed, with ``stop_chance``), less those cut at ``longest`` tokens;
    in every state met (added to ``checked``), the allowed tokens must be exactly the texts that,
    walked alone from it, leave a live state, and some (a byte-level vocabulary writes every
    character)."""
    texts, pattern = regexes.texts, regexes.pattern
    for _ in range(outputs):
        guide, tokens = regexes.guide(), []
        while len(tokens) < longest:
            allowed = guide.allowed().tolist()
            if guide.state not in checked:
                checked.add(guide.state)
                want = [t for t, text in enumerate(texts.text) if text in texts.ids and t != stop
                        and pattern.walk(guide.state, text) != DEAD]
                assert allowed == sorted(want + ([stop] if pattern.accepts(guide.state) else [])), tokens
            assert allowed, "".join(texts.text[t] for t in tokens)
            if stop in allowed and (len(allowed) == 1 or rng.random() < stop_chance):
                break
            token = rng.choice([t for t in allowed if t != stop])
            tokens.append(token)
            if guide.advance(token):
                break
        else:
            continue  # (long outputs are left unchecked: the walk is random)
        yield "".join(texts.text[t] for t in tokens)


def test_json_schema_guides_a_byte_level_tokenizer_to_valid_objects():
    """A Pydantic model's schema (objects, a list of objects, a map, formats, bounds, an optional
    field) guiding a byte-level BPE tokenizer whose tokens span JSON's punctuation (``{"``,
    ``": "``, ``"}``...): outputs of tokens chosen at random among those allowed, ended with the
    stop token when it is allowed, are objects that Pydantic accepts; in every state met, the
    allowed tokens are exactly those whose text, walked from that state, leaves a live one (the
    tree of texts is searched a level at a time in tensors; this walks each text alone)."""
    import datetime
    import json
    import random
    from typing import Annotated

    pydantic = pytest.importorskip("pydantic")
    from conftest import byte_level_bpe

    from bora_kernels.serve.json_schema import schema_regex

    class Item(pydantic.BaseModel):
        sku: Annotated[str, pydantic.Field(pattern=r"^[A-Z]{3}\d{2}$")]
        qty: Annotated[int, pydantic.Field(ge=1, le=99)]

    class Order(pydantic.BaseModel):
        customer: Annotated[str, pydantic.Field(max_length=12)]
        day: datetime.date
        share: Annotated[float, pydantic.Field(ge=0, le=1)]
        items: Annotated[list[Item], pydantic.Field(min_length=1, max_length=3)]
        notes: dict[str, bool]
        coupon: str | None = None

    rng = random.Random(0)
    corpus = [json.dumps({"customer": rng.choice(["ann", "bo lee", "Zoë"]), "day": f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                          "share": rng.random(), "items": [{"sku": "ABC12", "qty": rng.randint(1, 99)}] * rng.randint(1, 3),
                          "notes": {"gift": rng.random() < 0.5}, "coupon": None}) for _ in range(200)]
    tokenizer = byte_level_bpe(corpus, 400, split_words=False, eos="</s>")
    texts = TokenTexts(tokenizer, vocab=len(tokenizer))
    stop = tokenizer.eos_token_id
    spanning = [t for t in texts.text if len(t) > 1 and set(t) & set('{}[]":,')]
    assert len(spanning) > 20, spanning  # tokens that cross the pattern's punctuation
    regexes, checked, finished = RegexSet(texts, schema_regex(Order.model_json_schema()), [stop]), set(), 0
    for text in _random_outputs(regexes, stop, rng, 30, 400, 0.5, checked):
        finished += 1
        Order.model_validate_json(text)
    assert finished >= 10 and len(checked) > 100, (finished, len(checked))


def test_free_form_json_guides_a_byte_level_tokenizer_to_valid_values():
    """``response_format: {"type": "json_object"}`` (the schema of any object) and a Pydantic
    model with ``dict[str, Any]`` and ``Any`` fields guide a byte-level BPE to JSON that parses,
    that Pydantic accepts (for the model), and whose free-form parts nest at most ``FREE_DEPTH``
    deep; in every state met, the allowed tokens are exactly the texts that, walked alone, leave
    a live state."""
    import json
    import random
    from typing import Any

    pydantic = pytest.importorskip("pydantic")
    from conftest import byte_level_bpe

    from bora_kernels.serve.json_schema import FREE_DEPTH, schema_regex
    from bora_kernels.serve.pattern import SCHEMA_LIMITS

    class Event(pydantic.BaseModel):
        name: str
        payload: dict[str, Any]
        extra: Any = None

    rng = random.Random(1)

    def value(depth: int):
        kind = rng.choice(["scalar", "array", "object"] if depth else ["scalar"])
        if kind == "scalar":
            return rng.choice([None, True, 7, -0.5, "ok", "a b"])
        items = [value(depth - 1) for _ in range(rng.randint(0, 3))]
        return items if kind == "array" else {rng.choice(["id", "tags", "x"]) + str(i): v for i, v in enumerate(items)}

    corpus = [json.dumps({"name": "e", "payload": value(3), "extra": value(2)}) for _ in range(300)]
    tokenizer = byte_level_bpe(corpus, 400, split_words=False, eos="</s>")
    texts = TokenTexts(tokenizer, vocab=len(tokenizer))
    stop = tokenizer.eos_token_id

    def depth(v) -> int:
        inner = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else None
        return 0 if inner is None else 1 + max(map(depth, inner), default=0)

    def whole(v) -> list:  # json_object: the whole value is free-form
        assert isinstance(v, dict), v
        return [v]

    def fields(v) -> list:  # the model: its free-form fields, once Pydantic accepts it
        Event.model_validate(v)
        return [v["payload"], v.get("extra")]

    for schema, parts in (({"type": "object"}, whole), (Event.model_json_schema(), fields)):
        regexes, checked, finished = RegexSet(texts, schema_regex(schema), [stop], SCHEMA_LIMITS), set(), 0
        for text in _random_outputs(regexes, stop, rng, 20, 300, 0.3, checked):
            finished += 1
            v = json.loads(text)
            assert all(depth(part) <= FREE_DEPTH for part in parts(v)), v
        assert finished >= 5 and len(checked) > 30, (schema, finished, len(checked))
