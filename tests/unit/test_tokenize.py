"""Tokenization over the real bundled tokenizer: special tokens, limits, truncation, token-id checks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from embserve.api.errors import InputTooLong, InvalidRequest
from embserve.engine.tokenize import SpecialTokens, Tokenizer, probe_special_tokens
from tests.texts import mixed_texts


@pytest.fixture(scope="module")
def hf(bundled_model):
    return bundled_model.tokenizer


@pytest.fixture(scope="module")
def tok(bundled_model) -> Tokenizer:
    return Tokenizer(bundled_model.tokenizer, bundled_model.max_length, bundled_model.vocab_size)


def _long_text(hf, tokens: int) -> str:
    """A text of exactly `tokens` content tokens (one token per repeated word)."""
    text = " ".join(["hello"] * tokens)
    assert len(hf(text, add_special_tokens=False)["input_ids"]) == tokens
    return text


def test_special_tokens_are_probed_as_cls_and_sep(hf, tok):
    assert probe_special_tokens(hf) == SpecialTokens(head=(101,), tail=(102,))
    assert hf.convert_ids_to_tokens([101, 102]) == ["[CLS]", "[SEP]"]
    assert tok.special == SpecialTokens(head=(101,), tail=(102,))


def test_content_ids_have_no_special_tokens(tok, hf):
    [ids] = tok.content_ids(["hello world"])
    assert ids == hf("hello world", add_special_tokens=False)["input_ids"]
    assert 101 not in ids and 102 not in ids


def test_content_ids_of_no_texts_is_empty(tok):
    assert tok.content_ids([]) == []


def test_finish_matches_the_tokenizer_with_special_tokens(tok, hf):
    texts = mixed_texts(12, seed=3) + ["hello", "naïve café — 東京 🙂", "a\tb\nc"]
    contents = tok.content_ids(texts)
    for i, (text, content) in enumerate(zip(texts, contents)):
        expected = hf(text, truncation=True, max_length=tok.max_length)["input_ids"]
        assert tok.finish(content, i, truncate=True) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=80))
def test_finish_matches_the_tokenizer_on_arbitrary_short_text(tok, hf, text):
    [content] = tok.content_ids([text])
    assert tok.finish(content, 0, truncate=False) == hf(text)["input_ids"]


def test_content_ids_in_one_call_match_one_call_each(tok):
    texts = mixed_texts(8, seed=5)
    assert tok.content_ids(texts) == [tok.content_ids([t])[0] for t in texts]


def test_over_long_input_raises_input_too_long_naming_limit_and_length(tok, hf):
    content = tok.content_ids([_long_text(hf, 300)])[0]
    with pytest.raises(InputTooLong) as info:
        tok.finish(content, 7, truncate=False)
    err = info.value
    assert "input[7]" in err.message
    assert "302 tokens" in err.message  # 300 content tokens + [CLS] + [SEP]
    assert "256" in err.message
    assert "truncate" in err.message
    assert err.param == "input" and err.code == "context_length_exceeded" and err.status == 400


def test_input_at_exactly_the_limit_is_accepted(tok, hf):
    content = tok.content_ids([_long_text(hf, 254)])[0]
    out = tok.finish(content, 0, truncate=False)
    assert len(out) == 256 == tok.max_length
    with pytest.raises(InputTooLong, match="257 tokens"):
        tok.finish(content + content[:1], 0, truncate=False)


def test_truncate_cuts_to_exactly_max_length_keeping_the_tail_special_token(tok, hf):
    text = _long_text(hf, 300) + " world"
    content = tok.content_ids([text])[0]
    out = tok.finish(content, 0, truncate=True)
    assert len(out) == tok.max_length
    assert out[0] == 101 and out[-1] == 102
    assert out[1:-1] == content[:254], "keeps the head of the text, drops its end"
    assert out == hf(text, truncation=True, max_length=tok.max_length)["input_ids"]


def test_truncate_leaves_short_inputs_untouched(tok):
    assert tok.finish([7592, 2088], 0, truncate=True) == [101, 7592, 2088, 102]


def test_smaller_max_length_truncates_to_it(bundled_model):
    small = Tokenizer(bundled_model.tokenizer, 8, bundled_model.vocab_size)
    out = small.finish(list(range(1000, 1020)), 0, truncate=True)
    assert out == [101, *range(1000, 1006), 102]
    with pytest.raises(InputTooLong, match="22 tokens.*maximum of 8"):
        small.finish(list(range(1000, 1020)), 0, truncate=False)


def test_max_length_without_room_for_text_is_refused(bundled_model):
    with pytest.raises(ValueError, match="no room"):
        Tokenizer(bundled_model.tokenizer, 2, bundled_model.vocab_size)


@pytest.mark.parametrize("bad", [-1, 30522, 10**12])
def test_check_ids_rejects_ids_outside_the_vocabulary(tok, bad):
    with pytest.raises(InvalidRequest) as info:
        tok.check_ids([101, bad, 102], 3)
    err = info.value
    assert err.param == "input" and err.code == "invalid_token_id"
    assert "input[3]" in err.message and str(bad) in err.message and "30522" in err.message


def test_check_ids_accepts_the_vocabulary_bounds(tok):
    assert tok.vocab_size == 30522
    tok.check_ids([0, 1, 30521], 0)


def test_check_ids_error_tells_tiktoken_clients_to_send_text(tok):
    with pytest.raises(InvalidRequest) as info:
        tok.check_ids([100257, 9906], 0)
    message = info.value.message
    assert "token id 100257" in message and "30522" in message
    assert "OpenAIEmbeddings" in message and "check_embedding_ctx_length=False" in message


TEXTS_FOR_IDS = ["The cat sits on the mat.", "hello", "naïve café — 東京 🙂", "a\tb\nc"]


@pytest.mark.parametrize("text", TEXTS_FOR_IDS)
def test_ids_as_the_tokenizer_gives_them_are_kept_as_given(tok, hf, text):
    ids = hf(text)["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102
    assert tok.finish(ids, 0, truncate=False) == ids
    [content] = tok.content_ids([text])
    assert tok.finish(ids, 0, truncate=False) == tok.finish(content, 0, truncate=False)


@pytest.mark.parametrize("text", TEXTS_FOR_IDS)
def test_ids_without_special_tokens_still_get_them(tok, hf, text):
    bare = hf(text, add_special_tokens=False)["input_ids"]
    assert tok.finish(bare, 0, truncate=False) == hf(text)["input_ids"]


def test_ids_with_only_one_special_token_get_both_added(tok):
    assert tok.finish([101, 7592], 0, truncate=False) == [101, 101, 7592, 102]
    assert tok.finish([7592, 102], 0, truncate=False) == [101, 7592, 102, 102]


def test_ids_of_the_empty_text_are_kept(tok, hf):
    assert hf("")["input_ids"] == [101, 102]
    assert tok.finish([101, 102], 0, truncate=False) == [101, 102]


def test_a_text_that_spells_out_special_tokens_gets_them_added_as_the_tokenizer_does(tok, hf):
    text = "[CLS] hello [SEP]"
    [content] = tok.content_ids([text])
    assert content == [101, 7592, 102]
    assert tok.finish(content, 0, truncate=False) == hf(text)["input_ids"] == [101, 101, 7592, 102, 102]


def test_ids_with_special_tokens_are_limited_and_truncated_like_their_text(tok, hf):
    text = _long_text(hf, 300) + " world"
    full = hf(text)["input_ids"]
    with pytest.raises(InputTooLong, match=f"{len(full)} tokens"):
        tok.finish(full, 0, truncate=False)
    assert tok.finish(full, 0, truncate=True) == hf(text, truncation=True, max_length=tok.max_length)["input_ids"]
    at_limit = hf(_long_text(hf, 254))["input_ids"]
    assert tok.finish(at_limit, 0, truncate=False) == at_limit


def test_has_special_tokens_needs_both_ends(tok):
    assert tok.has_special_tokens([101, 102]) and tok.has_special_tokens([101, 5, 102])
    assert not tok.has_special_tokens([101]) and not tok.has_special_tokens([102])
    assert not tok.has_special_tokens([]) and not tok.has_special_tokens([5, 6])
