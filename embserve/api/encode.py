"""Output encoding: `dimensions` (keep the first N, re-normalize) and OpenAI's base64 float32."""

from __future__ import annotations

import base64

import numpy as np

from embserve.api.errors import InvalidRequest


def apply_dimensions(vectors: np.ndarray, dimensions: int | None, normalize: bool = True) -> np.ndarray:
    if dimensions is None:
        return vectors
    full = vectors.shape[1]
    if not 1 <= dimensions <= full:
        raise InvalidRequest(
            f"dimensions must be between 1 and {full} for this model, got {dimensions}", param="dimensions"
        )
    if dimensions == full:
        return vectors
    cut = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(cut, axis=1, keepdims=True)
        cut = cut / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(cut, dtype=np.float32)


def to_base64(vector: np.ndarray) -> str:
    """Little-endian float32 bytes, base64: what OpenAI sends and its client decodes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
