"""What happened, as the processes that serve report it to the metrics: an admission, a forward, a request's
end at the replica (`Answered`) and at the ingress (`Responded`). The aggregate dispatches on these types
(`embserve.metrics.stats`), so that renaming one is an error at once, never a metric that silently stays zero.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Admitted:
    """What one admission did (a @serve.batch call), for the metrics."""

    requests: int
    inputs: int
    tokenize_s: float
    task: str = "embed"  # the replica's model's: "rerank" counts its requests and pairs apart


@dataclass(frozen=True)
class Forward:
    """What one forward did, for the metrics."""

    inputs: int
    tokens: int
    padded_tokens: int
    seconds: float


@dataclass(frozen=True)
class Answered:
    """One request's end, for the metrics: how long its first input queued, and its error kind if any."""

    queue_s: float
    error: str | None


@dataclass(slots=True)
class Responded:
    """One HTTP request's end at the ingress: its status, how long it took, and its error kind if it failed."""

    status: int
    seconds: float
    error_kind: str | None = None
