"""OpenAI response bodies built straight from numpy arrays (no pydantic round trip on the hot path)."""

from __future__ import annotations

import json

import numpy as np

from embserve.encode import to_base64
from embserve.pipeline import ModelInfo


def embeddings_body(vectors: np.ndarray, model: str, prompt_tokens: int, encoding_format: str) -> bytes:
    if encoding_format == "base64":
        items = [to_base64(v) for v in vectors]
    else:
        items = vectors.astype(np.float64).tolist()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def model_card(info: ModelInfo, created: int) -> dict:
    return {"id": info.name, "object": "model", "created": created, "owned_by": "embserve",
            "dimensions": info.dimensions, "max_input_tokens": info.max_length, "aliases": list(info.aliases)}
