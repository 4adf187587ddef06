"""OpenAI response bodies built straight from numpy arrays (no pydantic round trip on the hot path)."""

from __future__ import annotations

import numpy as np
import orjson

from embserve.encode import to_base64
from embserve.pipeline import ModelInfo


def embeddings_body(vectors: np.ndarray, model: str, prompt_tokens: int, encoding_format: str) -> bytes:
    """The body in one orjson pass over the float32 rows: each number is the shortest decimal that reads back
    as the same float32 (a tenth of the stdlib's time per vector, and a smaller body than float64's digits)."""
    if encoding_format == "base64":
        items: list = [to_base64(v) for v in vectors]
    else:
        items = list(np.ascontiguousarray(vectors, dtype=np.float32))
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def model_card(info: ModelInfo, created: int) -> dict:
    return {"id": info.name, "object": "model", "created": created, "owned_by": "embserve",
            "dimensions": info.dimensions, "max_input_tokens": info.max_length, "aliases": list(info.aliases)}
