"""Batch planning as plain data: which inputs go into which forward, given only their token lengths.

No torch, no Ray, no clock (numpy only): each function maps lengths to index plans so that it can be tested with
hypothesis in milliseconds.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embserve.settings import CPU_GROUP_COST_TOKENS

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
    group_cost_tokens: int = CPU_GROUP_COST_TOKENS,
    max_inputs: int | None = None,
) -> Plan:
    """Split inputs into forward groups of at most `max_inputs` inputs (None: as many as the budget allows).

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
    if max_inputs is not None and max_inputs < 1:
        raise ValueError("max_inputs must be positive")
    cap = max_inputs or len(lengths) or 1
    if group_by_length:
        groups = _partition_sorted(lengths, max_batch_tokens, tolerance, group_cost_tokens, cap)
    else:
        groups = _split_in_order(lengths, max_batch_tokens, cap)
    if min_group_size > 1:
        groups = merge_small_groups(lengths, groups, min_group_size, max_batch_tokens, cap)
    return groups


def _split_in_order(lengths: Sequence[int], max_batch_tokens: int, max_inputs: int) -> Plan:
    groups: Plan = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) == max_inputs or (len(current) + 1) * max(longest, n) > max_batch_tokens):
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def _partition_sorted(lengths: Sequence[int], max_batch_tokens: int, tolerance: float, group_cost: int,
                      max_inputs: int) -> Plan:
    """Optimal contiguous partition of the length-sorted inputs, in O(n): numpy sorts and finds each
    group end's earliest allowed start, then one pass of dynamic programming with a monotone queue.

    A group [i, j) of the sorted inputs costs (j - i) x L + group_cost, L its longest (sorted[j - 1]), so
    best[j] = j x L + group_cost + min(best[i] - i x L) over the allowed starts i, a window [lo_j, j)
    whose ends only move right. For one L that is a sliding-window minimum (a queue of candidates whose
    values rise from front to back); when L grows, a later candidate's value falls more than an earlier
    one's, so a dropped candidate stays dropped and the queue is only filtered again. Among equal costs
    the earliest start wins.
    """
    n = len(lengths)
    if n == 0:
        return []
    keys = np.asarray(lengths, dtype=np.int64)
    order_np = np.argsort(keys, kind="stable")
    ordered = keys[order_np]
    lowest = _earliest_starts(ordered, max_batch_tokens, tolerance, max_inputs)
    longest = ordered.tolist()
    best = [0] * (n + 1)
    start = [0] * (n + 1)
    queue: collections.deque[int] = collections.deque()
    current = None
    for j in range(1, n + 1):
        length = longest[j - 1]
        if length != current:
            current = length
            if len(queue) > 1:  # refilter: keep a candidate only where no later one is cheaper now
                kept: list[int] = []
                floor = None
                for i in reversed(queue):
                    value = best[i] - i * length
                    if floor is None or value <= floor:
                        kept.append(i)
                        floor = value
                queue = collections.deque(reversed(kept))
        i = j - 1
        value = best[i] - i * length
        while queue and best[queue[-1]] - queue[-1] * length > value:
            queue.pop()
        queue.append(i)
        low = lowest[j - 1]
        while queue[0] < low:
            queue.popleft()
        first = queue[0]
        best[j] = best[first] + (j - first) * length + group_cost
        start[j] = first
    return _groups_ending_at(start, order_np.tolist())


def _earliest_starts(ordered: np.ndarray, max_batch_tokens: int, tolerance: float, max_inputs: int) -> list[int]:
    """The earliest start each group end j (index j - 1) may have in the sorted lengths: within the tolerance
    of its longest, and within the budget and max_inputs (at least one input, which may alone exceed the
    budget)."""
    tolerated = np.searchsorted(ordered, ordered * (1.0 - tolerance), side="left")
    most = np.minimum(max_inputs, np.maximum(1, max_batch_tokens // np.maximum(ordered, 1)))
    ends = np.arange(1, len(ordered) + 1)
    return np.maximum(tolerated, ends - most).tolist()


def _groups_ending_at(start: list[int], order: list[int]) -> Plan:
    """The plan that the dynamic programme chose, walked back from the last input: `start[j]` begins the
    group that ends at j; groups hold the inputs' original indices, shortest group first."""
    groups: Plan = []
    j = len(start) - 1
    while j > 0:
        i = start[j]
        groups.append(order[i:j])
        j = i
    return groups[::-1]


def merge_small_groups(lengths: Sequence[int], groups: Plan, min_size: int, max_batch_tokens: int,
                       max_inputs: int | None = None) -> Plan:
    """Fold groups smaller than `min_size` into the neighbour that pads least, within the budget and
    `max_inputs`."""
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
                    fits = max_inputs is None or len(merged[j]) + len(group) <= max_inputs
                    if fits and cost <= max_batch_tokens and (best is None or cost < best[1]):
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


def next_group(lengths: Sequence[int], *, max_batch_tokens: int, max_inputs: int | None = None,
               oldest_first: bool = True, **plan: object) -> list[int]:
    """The one place a forward's size is decided: the group to run next from inputs queued in arrival
    order, at most `max_batch_tokens` padded tokens and `max_inputs` inputs (the `max_batch_size` setting).

    `oldest_first`: of the plan over all of them (`plan_batches`, same other arguments), the group that holds
    the oldest input, index 0: taking it first serves inputs in arrival order, while its companions are
    whatever pads least beside it. Otherwise the group that costs least per input (`cheapest_group`), for a
    device whose forward's fixed cost is large and known, where what stays pending waits for company; the
    caller bounds how long an input may be passed over by asking for the oldest first again."""
    if not lengths:
        return []
    by_length = bool(plan.pop("group_by_length", True))
    if not oldest_first and by_length:
        return cheapest_group(lengths, max_batch_tokens=max_batch_tokens, max_inputs=max_inputs, **plan)  # type: ignore[arg-type]
    groups = plan_batches(lengths, max_batch_tokens=max_batch_tokens, max_inputs=max_inputs,
                          group_by_length=by_length, **plan)  # type: ignore[arg-type]
    return next(group for group in groups if 0 in group)


def cheapest_group(lengths: Sequence[int], *, max_batch_tokens: int, max_inputs: int | None = None,
                   tolerance: float = 0.2, group_cost_tokens: int = CPU_GROUP_COST_TOKENS,
                   min_group_size: int = 1) -> list[int]:
    """Of every group the length plan allows (a run of the inputs sorted by length, within `tolerance` of its
    longest, `max_batch_tokens` and `max_inputs`; at least `min_group_size` inputs where any run has that
    many), the one whose forward costs least per input: (group_cost_tokens + its padding) / its inputs, the
    padding being what the forward computes beyond the inputs' own tokens. Among equal costs, the shortest
    lengths first. O(n log n) in numpy.

    For a group ending at sorted input j (its longest, L), the cost per input of starting at i is
    L + (group_cost - (S[j] - S[i])) / (j - i), S the prefix sums: minus the slope from the point
    (i, S[i]) to (j, S[j] - group_cost). S is convex (the lengths are sorted), so that slope rises to its
    highest and then falls, flat only at the top (two equal slopes in a row lie on a line under every
    point); a binary search on whether the next start is no better finds the best start for every end at
    once.
    """
    n = len(lengths)
    if n == 0:
        return []
    cap = max_inputs or n
    keys = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    sums = np.concatenate(([0], np.cumsum(ordered)))
    ends = np.arange(1, n + 1)  # j: the group is sorted[i:j]
    lo = np.asarray(_earliest_starts(ordered, max_batch_tokens, tolerance, cap), dtype=np.int64)
    hi = ends - 1
    if min_group_size > 1 and (lo <= ends - min_group_size).any():
        usable = lo <= ends - min_group_size
        ends, lo, hi = ends[usable], lo[usable], (ends - min_group_size)[usable]
    target = sums[ends] - group_cost_tokens  # (j, S[j] - cost): the point each start's slope runs to
    a, b = lo.copy(), hi.copy()
    while (a < b).any():
        mid = (a + b) // 2
        nxt = np.minimum(mid + 1, hi)
        # cost per input at mid is no more than at mid + 1 (fractions compared by cross-multiplying)
        done = (sums[mid] - target) * (ends - nxt) <= (sums[nxt] - target) * (ends - mid)
        searching = a < b
        b = np.where(searching & done, mid, b)
        a = np.where(searching & ~done, mid + 1, a)
    inputs = ends - a
    waste = group_cost_tokens + inputs * ordered[ends - 1] - (sums[ends] - sums[a])
    best = int(np.argmin(waste / inputs))
    return order[a[best]:ends[best]].tolist()
