"""Guided choices (``bora_kernels/serve/guided.py``) on their own: each token's text after other
text, and a guide that allows exactly the tokens that can still end in one of the choices,
checked against every token sequence that writes a choice. (``test_serve_engine.py`` checks the
engine's masking, ``test_serve_http.py`` the API's ``guided_choice``.)"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bora_kernels.serve.guided import ChoiceSet, TokenTexts, check_choices  # noqa: E402

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
