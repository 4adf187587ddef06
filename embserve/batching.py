"""Batch planning as plain data: which inputs go into which forward, given only their token lengths.

No torch, no Ray, no clock: each function maps lengths to index plans so that it can be tested with
hypothesis in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
) -> Plan:
    """Split inputs into forward groups.

    With `group_by_length`, inputs are sorted longest first and each group holds lengths within
    `tolerance` of its longest (shortest >= longest x (1 - tolerance)). Without it, groups follow
    arrival order. Either way a group's padded size stays within `max_batch_tokens`; an input that
    alone exceeds the budget forms a group of its own (its length was already checked against the
    model's maximum). Groups smaller than `min_group_size` are then merged into a neighbour where the
    budget allows.
    """
    if max_batch_tokens < 1:
        raise ValueError("max_batch_tokens must be positive")
    order = list(range(len(lengths)))
    if group_by_length:
        order.sort(key=lambda i: -lengths[i])
    groups: Plan = []
    current: list[int] = []
    longest = 0
    shortest = 0
    for i in order:
        n = lengths[i]
        new_longest = max(longest, n)
        new_shortest = min(shortest, n) if current else n
        fits_budget = (len(current) + 1) * new_longest <= max_batch_tokens
        fits_tolerance = not group_by_length or new_shortest >= new_longest * (1.0 - tolerance)
        if current and (not fits_budget or not fits_tolerance):
            groups.append(current)
            current, new_longest, new_shortest = [], n, n
        current.append(i)
        longest, shortest = new_longest, new_shortest
    if current:
        groups.append(current)
    if min_group_size > 1:
        groups = merge_small_groups(lengths, groups, min_group_size, max_batch_tokens)
    return groups


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
