"""Output encoding: `dimensions` truncation with re-normalization, base64 float32, response bodies."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from embserve.api.contracts import ModelInfo
from embserve.api.encode import apply_dimensions, to_base64
from embserve.api.errors import InvalidRequest
from embserve.api.responses import embeddings_body, model_card


def _unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_dimensions_keeps_the_first_n_and_renormalizes():
    vectors = _unit_rows(3, 16)
    out = apply_dimensions(vectors, 5)
    assert out.shape == (3, 5) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    # Same direction as the first 5 components.
    expected = vectors[:, :5] / np.linalg.norm(vectors[:, :5], axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.flags.c_contiguous


def test_dimensions_without_normalize_only_cuts():
    vectors = _unit_rows(2, 8)
    np.testing.assert_array_equal(apply_dimensions(vectors, 3, normalize=False), vectors[:, :3])


@pytest.mark.parametrize("dimensions", [None, 16])
def test_no_dimensions_or_full_dimensions_leave_vectors_as_they_are(dimensions):
    vectors = _unit_rows(2, 16)
    assert apply_dimensions(vectors, dimensions) is vectors


@pytest.mark.parametrize("dimensions", [0, -1, 17, 10_000])
def test_out_of_range_dimensions_is_invalid_request_on_param_dimensions(dimensions):
    with pytest.raises(InvalidRequest) as info:
        apply_dimensions(_unit_rows(1, 16), dimensions)
    assert info.value.param == "dimensions"
    assert info.value.status == 400
    assert "16" in info.value.message and str(dimensions) in info.value.message


def test_dimensions_of_a_zero_vector_stay_finite():
    out = apply_dimensions(np.zeros((1, 8), dtype=np.float32), 4)
    assert np.all(np.isfinite(out)) and not out.any()


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e6, 1e6, width=32)))
def test_base64_round_trips_as_little_endian_float32(vector):
    encoded = to_base64(vector)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_array_equal(decoded, vector)


def test_base64_converts_other_dtypes_and_byte_orders_to_little_endian_float32():
    vector = np.array([1.0, -2.5, 3.25], dtype=">f8")
    raw = base64.b64decode(to_base64(vector))
    assert len(raw) == 3 * 4
    assert raw[:4] == np.array(1.0, dtype="<f4").tobytes()
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"), [1.0, -2.5, 3.25])


def test_base64_of_a_strided_view_encodes_only_its_elements():
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    column = matrix[:, 1]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(to_base64(column)), dtype="<f4"), [1, 5, 9])


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings_body_is_openai_shaped_in_either_format(encoding_format):
    vectors = _unit_rows(2, 4)
    body = json.loads(embeddings_body(vectors, "mini", 11, encoding_format))
    assert body["object"] == "list" and body["model"] == "mini"
    assert body["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    for row, item in zip(vectors, body["data"]):
        if encoding_format == "base64":
            got = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
            np.testing.assert_array_equal(got, row)
        else:
            # float32 values survive the JSON round trip exactly.
            np.testing.assert_array_equal(np.asarray(item["embedding"], dtype=np.float32), row)


def test_model_card_lists_task_dimensions_limit_and_aliases():
    info = ModelInfo(name="mini", aliases=("small", "m"), dimensions=384, max_length=256, vocab_size=30522,
                     pooling="mean", device="cpu", dtype="float32")
    assert model_card(info, created=123) == {
        "id": "mini", "object": "model", "created": 123, "owned_by": "embserve", "task": "embed", "dimensions": 384,
        "max_input_tokens": 256, "aliases": ["small", "m"],
    }
    reranker = ModelInfo(name="r", aliases=(), dimensions=1, max_length=512, vocab_size=30522, pooling="none",
                         device="cpu", dtype="float32", task="rerank", activation="sigmoid")
    assert model_card(reranker, created=1)["task"] == "rerank"
    assert model_card(reranker, created=1)["dimensions"] is None  # a score, not a vector


def test_embeddings_body_takes_any_float_rows_and_keeps_their_float32_values():
    """A strided view and float64 rows: the body holds each value as the float32 it is served as."""
    wide = np.random.default_rng(3).standard_normal((3, 8))
    body = json.loads(embeddings_body(wide[:, ::2], "mini", 3, "float"))
    got = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, wide[:, ::2].astype(np.float32))
