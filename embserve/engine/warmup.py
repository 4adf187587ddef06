"""A replica's first forwards, run before it reports healthy, so that no request pays for lazy init."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embserve.engine.forward_cost import ForwardCost, fit_forward_cost

if TYPE_CHECKING:
    from embserve.engine.model import EmbeddingModel

log = logging.getLogger(__name__)

# On a CPU the large warm-up forward is capped at this many padded tokens: about a quarter second on one
# core for a MiniLM-sized model, and the first real forward's cost (allocator, oneDNN's kernel choice)
# is mostly paid by the first call of each shape class, not by its size.
CPU_WARM_UP_TOKENS = 1024
MID_LENGTH = 128  # a typical passage, and at most half the model's maximum


@dataclass(frozen=True)
class WarmUp:
    """The (inputs, longest) shapes warmed up, how long they took, and whether one ran out of GPU memory;
    where timed, each shape's (padded tokens, seconds) once warm."""

    shapes: tuple[tuple[int, int], ...]
    seconds: float
    out_of_memory: bool = False
    timings: tuple[tuple[int, float], ...] = ()

    @property
    def cost(self) -> ForwardCost | None:
        """A forward's fixed and per-token cost, from the timings (None untimed, or where they give none)."""
        return fit_forward_cost(list(self.timings))


def warm_up_shapes(max_batch_tokens: int, max_batch_size: int, max_length: int, device: str) -> list[tuple[int, int]]:
    """A lone short query (1×8), then the largest group the budget allows at a mid length: the shapes
    that the first requests meet. On a CPU the large one is capped at CPU_WARM_UP_TOKENS."""
    short = min(8, max_length)
    mid = max(short, min(MID_LENGTH, max_length // 2))
    tokens = max_batch_tokens if device == "cuda" else min(max_batch_tokens, CPU_WARM_UP_TOKENS)
    inputs = max(1, min(max_batch_size, tokens // mid))
    shapes = [(1, short)]
    if (inputs, mid) != (1, short):
        shapes.append((inputs, mid))
    return shapes


def warm_up(model: EmbeddingModel, shapes: list[tuple[int, int]], timed: bool = False) -> WarmUp:
    """Runs one forward per shape. A group of several inputs has its last one a token shorter, so that the
    masked attention path warms up beside the unmasked one (a group of equal lengths runs without a mask).
    `timed`: each shape runs a second time, timed to its end, for the cost line a GPU replica plans with
    (the first run of a shape pays for lazy initialisation). Out of GPU memory here is not fatal: the
    scheduler finds the card's real budget on the first requests."""
    import torch

    token = 1000 % model.vocab_size  # any real token: the forward's cost does not depend on which
    t0 = time.perf_counter()
    out_of_memory = False
    timings: list[tuple[int, float]] = []
    for inputs, longest in shapes:
        group = [[token] * longest for _ in range(inputs)]
        if inputs > 1 and longest > 1:
            group[-1] = group[-1][:-1]
        try:
            model.forward(group)
            if timed:
                timings.append((inputs * longest, _timed_forward(model, group)))
        except torch.cuda.OutOfMemoryError:  # no `as`: its traceback holds the forward's activations
            out_of_memory = True
            break
    if out_of_memory:
        from embserve.engine.scheduler import release_gpu_cache

        release_gpu_cache()
    if model.device == "cuda":
        torch.cuda.synchronize()  # the kernels have run, not only been queued
    return WarmUp(tuple(shapes), time.perf_counter() - t0, out_of_memory, tuple(timings))


def _timed_forward(model: EmbeddingModel, group: list[list[int]]) -> float:
    import torch

    if model.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.forward(group)  # its vectors come back to the host: the forward has ended
    return time.perf_counter() - t0
