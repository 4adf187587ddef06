"""Batch planning as plain data: which inputs go into which forward, given only their token lengths.

No torch, no Ray, no clock (numpy only): each function maps lengths to index plans so that it can be tested with
hypothesis in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Plan = list[list[int]]


@dataclass(frozen=True)
class PlanStats:
    inputs: int
    tokens: int
    padded_tokens: int
    groups: int

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0


def padded_size(lengths: Sequence[int], group: Sequence[int]) -> int:
    """Tokens a forward of `group` actually computes: inputs x the longest input."""
    return len(group) * max(lengths[i] for i in group) if group else 0


def plan_batches(
    lengths: Sequence[int],
    *,
    max_batch_tokens: int,
    group_by_length: bool = True,
    tolerance: float = 0.2,
    min_group_size: int = 1,
    group_cost_tokens: int = 32,
) -> Plan:
    """Split inputs into forward groups.

    With `group_by_length`, groups are contiguous runs of the inputs sorted by length, each holding
    lengths within `tolerance` of its longest (shortest >= longest x (1 - tolerance)); among all such
    partitions it picks the one with the fewest padded tokens plus `group_cost_tokens` per forward
    (what a forward's fixed overhead is worth in tokens), so groups stay full without padding much.
    Without it, groups follow arrival order. Either way a group's padded size stays within
    `max_batch_tokens`; an input that alone exceeds the budget forms a group of its own (its length was
    already checked against the model's maximum). Groups smaller than `min_group_size` are then merged
    into a neighbour where the budget allows.
    """
    if max_batch_tokens < 1:
        raise ValueError("max_batch_tokens must be positive")
    if group_by_length:
        groups = _partition_sorted(lengths, max_batch_tokens, tolerance, group_cost_tokens)
    else:
        groups = _split_in_order(lengths, max_batch_tokens)
    if min_group_size > 1:
        groups = merge_small_groups(lengths, groups, min_group_size, max_batch_tokens)
    return groups


def _split_in_order(lengths: Sequence[int], max_batch_tokens: int) -> Plan:
    groups: Plan = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > max_batch_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def _partition_sorted(lengths: Sequence[int], max_batch_tokens: int, tolerance: float, group_cost: int) -> Plan:
    """Optimal contiguous partition of the length-sorted inputs (dynamic programming, O(n x window))."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = np.array([lengths[i] for i in order], dtype=np.int64)
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: cost of the first j sorted inputs
    start = np.zeros(n + 1, dtype=np.int64)  # start[j]: where the last group of that best plan begins
    for j in range(1, n + 1):
        longest = int(sorted_lengths[j - 1])
        lo = int(np.searchsorted(sorted_lengths[:j], longest * (1.0 - tolerance), side="left"))
        lo = max(lo, j - max(1, max_batch_tokens // max(longest, 1)))
        sizes = j - np.arange(lo, j)
        costs = best[lo:j] + sizes * longest + group_cost
        k = int(np.argmin(costs))
        best[j], start[j] = costs[k], lo + k
    groups: Plan = []
    j = n
    while j > 0:
        i = int(start[j])
        groups.append([order[t] for t in range(i, j)])
        j = i
    return groups[::-1]


def merge_small_groups(lengths: Sequence[int], groups: Plan, min_size: int, max_batch_tokens: int) -> Plan:
    """Fold groups smaller than `min_size` into the neighbour that pads least, within the budget."""
    merged = [list(g) for g in groups]
    changed = True
    while changed:
        changed = False
        for k, group in enumerate(merged):
            if len(group) >= min_size:
                continue
            best: tuple[int, int] | None = None
            for j in (k - 1, k + 1):
                if 0 <= j < len(merged):
                    cost = padded_size(lengths, merged[j] + group)
                    if cost <= max_batch_tokens and (best is None or cost < best[1]):
                        best = (j, cost)
            if best is not None:
                j = best[0]
                merged[j] = merged[j] + group if j < k else group + merged[j]
                del merged[k]
                changed = True
                break
    return merged


def plan_stats(lengths: Sequence[int], plan: Plan) -> PlanStats:
    return PlanStats(
        inputs=sum(len(g) for g in plan),
        tokens=sum(lengths[i] for g in plan for i in g),
        padded_tokens=sum(padded_size(lengths, g) for g in plan),
        groups=len(plan),
    )


def next_group(lengths: Sequence[int], **plan: object) -> list[int]:
    """The group to run next from inputs queued in arrival order: of the plan over all of them
    (`plan_batches`, same arguments), the group that holds the oldest input, index 0. Taking it first
    serves inputs in arrival order, while its companions are whatever pads least beside it."""
    if not lengths:
        return []
    return next(group for group in plan_batches(lengths, **plan) if 0 in group)  # type: ignore[arg-type]
