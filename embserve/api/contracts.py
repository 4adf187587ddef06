"""What the ingress and a replica send each other: a request's inputs (`EmbedJob`, `RerankJob`), its answer
(`EmbedResult`), and what a served model is (`ModelInfo`). Torch-free, so that the ingress never imports torch.
The replica never changes them: what it knows about a job (when it came, whether its caller left) it keeps
beside it (`embserve.engine.scheduler.Arrival`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embserve.api.errors import EmbservError


@dataclass
class EmbedJob:
    """One HTTP request's inputs, as the ingress normalized them."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    truncate: bool = False
    prompt_name: str | None = None  # a prompt of the model's; None: its default prompt, if it has one

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])

    @property
    def chars(self) -> int:
        """Characters to tokenize at admission."""
        return sum(map(len, self.texts or ()))


@dataclass
class EmbedResult:
    """A request's answer: its vectors, or the error that is its answer (errors travel as values)."""

    vectors: np.ndarray | None
    prompt_tokens: int = 0
    error: EmbservError | None = None
    queue_s: float = 0.0
    tokenize_s: float = 0.0
    forward_s: float = 0.0


@dataclass
class RerankJob:
    """One rerank request: its query and documents, each pair one input of the replica's scheduler."""

    query: str
    documents: list[str]
    truncate: bool = False
    field: str = "documents"  # what the route calls the documents (TEI: "texts"), for error messages

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def chars(self) -> int:
        """Characters to tokenize at admission: the query once, and each document."""
        return len(self.query) + sum(map(len, self.documents))


@dataclass(frozen=True)
class ModelInfo:
    """What a served model is, as the ingress needs it: torch-free, so the ingress never imports torch."""

    name: str
    aliases: tuple[str, ...]
    dimensions: int
    max_length: int
    vocab_size: int
    pooling: str
    device: str
    dtype: str
    prompts: tuple[str, ...] = ()  # the names a request's prompt_name may take
    default_prompt_name: str | None = None
    task: str = "embed"  # "rerank": a cross-encoder (embserve/engine/rerank.py), served at /v1/rerank
    activation: str | None = None  # a cross-encoder's activation on its logit (embserve.engine.rerank.ACTIVATIONS)
