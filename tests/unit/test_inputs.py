"""Request inputs to one shape, and every check that happens before tokenization."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from embserve.api.errors import InvalidRequest, PayloadTooLarge
from embserve.api.inputs import Limits, NormalizedInput, check_text, normalize_input
from embserve.api.protocol import EmbeddingRequest

LIMITS = Limits(max_inputs=4, max_chars=50)


def _normalize(value, limits: Limits = LIMITS) -> NormalizedInput:
    return normalize_input(EmbeddingRequest(input=value, model="m"), limits)


@pytest.mark.parametrize(
    ("value", "texts", "token_ids"),
    [
        ("hello", ["hello"], None),
        (["a", "b c"], ["a", "b c"], None),
        ([101, 7592, 102], None, [[101, 7592, 102]]),
        ([[1, 2], [3]], None, [[1, 2], [3]]),
        ([0], None, [[0]]),
    ],
    ids=["string", "list-of-strings", "token-ids", "list-of-token-id-lists", "single-token-zero"],
)
def test_every_input_shape_normalizes_to_texts_or_token_id_lists(value, texts, token_ids):
    out = _normalize(value)
    assert out.texts == texts
    assert out.token_ids == token_ids
    assert len(out) == len(texts if texts is not None else token_ids)


def test_normalized_lists_are_copies_not_the_request_lists():
    request = EmbeddingRequest(input=[[1, 2]], model="m")
    out = normalize_input(request, LIMITS)
    out.token_ids[0].append(9)
    assert request.input == [[1, 2]]


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("", "empty_input"),
        ("   \n\t ", "empty_input"),
        (["ok", " "], "empty_input"),
        ("nul\x00inside", "invalid_text"),
        ("lone \ud800 surrogate", "invalid_text"),
        ("x" * 51, "input_too_large"),
    ],
    ids=["empty", "whitespace", "whitespace-in-list", "nul", "lone-surrogate", "too-many-chars"],
)
def test_bad_text_is_invalid_request_on_param_input(value, code):
    with pytest.raises(InvalidRequest) as info:
        _normalize(value)
    assert info.value.param == "input"
    assert info.value.code == code
    assert info.value.status == 400


def test_bad_text_message_names_its_position():
    with pytest.raises(InvalidRequest, match=r"input\[2\]"):
        _normalize(["a", "b", ""])


def test_text_at_the_char_limit_is_accepted():
    assert _normalize("x" * 50).texts == ["x" * 50]


def test_too_many_char_message_names_both_counts():
    with pytest.raises(InvalidRequest, match="51 characters.*50"):
        check_text("y" * 51, 0, 50)


@pytest.mark.parametrize("value", [["t"] * 5, [[1]] * 5], ids=["texts", "token-id-lists"])
def test_too_many_inputs_is_payload_too_large(value):
    with pytest.raises(PayloadTooLarge) as info:
        _normalize(value)
    assert info.value.status == 413
    assert info.value.param == "input"
    assert info.value.code == "too_many_inputs"
    assert "5 inputs" in info.value.message and "4" in info.value.message


def test_input_count_at_the_limit_is_accepted():
    assert len(_normalize(["t"] * 4)) == 4


def test_token_ids_count_as_one_input_however_long():
    assert len(_normalize(list(range(100)))) == 1


def test_too_many_inputs_is_checked_before_the_texts():
    with pytest.raises(PayloadTooLarge):
        _normalize(["", "", "", "", ""])


def test_normalized_input_of_nothing_has_length_zero():
    assert len(NormalizedInput(texts=None, token_ids=None)) == 0


# Validated requests: normalize_input either gives a well-shaped result or one of our errors.
_awkward = st.sampled_from(["\ud800", "\udfff", "\x00", " ", "\n", "x" * 45])
text_st = st.one_of(
    st.text(max_size=60),
    st.builds(lambda a, odd, b: a + odd + b, st.text(max_size=10), _awkward, st.text(max_size=10)),
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    text_st,
    st.lists(text_st, min_size=1, max_size=6),
    st.lists(st.integers(-5, 40_000), min_size=1, max_size=6),
    st.lists(st.lists(st.integers(-5, 40_000), min_size=1, max_size=4), min_size=1, max_size=6),
))
def test_validated_input_normalizes_or_raises_a_request_error(value):
    request = EmbeddingRequest(input=value, model="m")
    try:
        out = normalize_input(request, LIMITS)
    except (InvalidRequest, PayloadTooLarge) as err:
        assert err.param == "input"
        return
    assert (out.texts is None) != (out.token_ids is None)
    if out.texts is not None:
        assert all(isinstance(t, str) and t.strip() and len(t) <= LIMITS.max_chars for t in out.texts)
        for t in out.texts:
            t.encode("utf-8")  # no lone surrogates get through
            assert "\x00" not in t
    else:
        assert all(ids and all(type(i) is int for i in ids) for ids in out.token_ids)
    assert 1 <= len(out) <= LIMITS.max_inputs


def test_check_text_accepts_ordinary_unicode():
    check_text("naïve café — 東京 🙂", 0, 100)
