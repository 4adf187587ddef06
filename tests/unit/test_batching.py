"""The batch planner as plain data: properties over random token lengths, plus examples of its knobs."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings, strategies as st

from embserve.engine.batching import cheapest_group, merge_small_groups, next_group, padded_size, plan_batches, plan_stats

lengths_st = st.lists(st.integers(min_value=1, max_value=512), min_size=0, max_size=120)
budget_st = st.integers(min_value=1, max_value=8192)
tolerance_st = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
cost_st = st.integers(min_value=0, max_value=1024)
fast = settings(max_examples=150, deadline=None)


def _flatten(plan: list[list[int]]) -> list[int]:
    return [i for group in plan for i in group]


@fast
@given(lengths_st, budget_st, st.booleans(), tolerance_st, st.integers(1, 8), cost_st)
def test_every_input_is_placed_exactly_once(lengths, budget, grouping, tolerance, min_group, cost):
    plan = plan_batches(lengths, max_batch_tokens=budget, group_by_length=grouping, tolerance=tolerance,
                        min_group_size=min_group, group_cost_tokens=cost)
    assert sorted(_flatten(plan)) == list(range(len(lengths)))
    assert all(plan), "no empty groups"


@fast
@given(lengths_st, budget_st, tolerance_st, cost_st)
def test_length_groups_hold_lengths_within_tolerance_of_their_longest(lengths, budget, tolerance, cost):
    plan = plan_batches(lengths, max_batch_tokens=budget, tolerance=tolerance, group_cost_tokens=cost)
    for group in plan:
        sizes = [lengths[i] for i in group]
        assert min(sizes) >= max(sizes) * (1.0 - tolerance)


@fast
@given(lengths_st, budget_st, st.booleans(), tolerance_st, st.integers(1, 8), cost_st)
def test_padded_size_stays_within_budget_unless_group_is_one_input(lengths, budget, grouping, tolerance,
                                                                    min_group, cost):
    plan = plan_batches(lengths, max_batch_tokens=budget, group_by_length=grouping, tolerance=tolerance,
                        min_group_size=min_group, group_cost_tokens=cost)
    for group in plan:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= budget
        assert padded_size(lengths, group) == len(group) * max(lengths[i] for i in group)


@fast
@given(lengths_st, budget_st)
def test_grouping_off_keeps_arrival_order(lengths, budget):
    plan = plan_batches(lengths, max_batch_tokens=budget, group_by_length=False)
    assert _flatten(plan) == list(range(len(lengths)))


@fast
@given(lengths_st, budget_st)
def test_grouping_off_fills_each_group_until_the_next_input_would_break_the_budget(lengths, budget):
    plan = plan_batches(lengths, max_batch_tokens=budget, group_by_length=False)
    for group, following in zip(plan, plan[1:]):
        grown = group + [following[0]]
        assert padded_size(lengths, grown) > budget


@fast
@given(lengths_st, budget_st, tolerance_st, st.integers(1, 10), cost_st, st.booleans())
def test_merging_small_groups_keeps_budget_and_never_adds_groups(lengths, budget, tolerance, min_group, cost,
                                                                  grouping):
    base = plan_batches(lengths, max_batch_tokens=budget, group_by_length=grouping, tolerance=tolerance,
                        group_cost_tokens=cost)
    merged = merge_small_groups(lengths, base, min_group, budget)
    assert len(merged) <= len(base)
    assert sorted(_flatten(merged)) == list(range(len(lengths)))
    for group in merged:
        assert len(group) == 1 or padded_size(lengths, group) <= budget
    # Merging only joins groups: every original group lies whole inside one merged group.
    where = {i: k for k, group in enumerate(merged) for i in group}
    for group in base:
        assert len({where[i] for i in group}) == 1


@fast
@given(lengths_st, budget_st, tolerance_st, st.integers(2, 10))
def test_merging_leaves_a_small_group_only_where_no_neighbour_has_room(lengths, budget, tolerance, min_group):
    base = plan_batches(lengths, max_batch_tokens=budget, tolerance=tolerance)
    merged = merge_small_groups(lengths, base, min_group, budget)
    for k, group in enumerate(merged):
        if len(group) < min_group:
            for j in (k - 1, k + 1):
                if 0 <= j < len(merged):
                    assert padded_size(lengths, merged[j] + group) > budget


@fast
@given(lengths_st, budget_st, st.booleans(), tolerance_st, st.integers(1, 8), cost_st, st.integers(1, 16))
def test_no_group_holds_more_than_max_inputs(lengths, budget, grouping, tolerance, min_group, cost, max_inputs):
    plan = plan_batches(lengths, max_batch_tokens=budget, group_by_length=grouping, tolerance=tolerance,
                        min_group_size=min_group, group_cost_tokens=cost, max_inputs=max_inputs)
    assert sorted(_flatten(plan)) == list(range(len(lengths)))
    assert all(1 <= len(group) <= max_inputs for group in plan)


@fast
@given(st.lists(st.integers(1, 512), min_size=1, max_size=120), budget_st, st.booleans(), tolerance_st,
       st.integers(1, 8))
def test_padding_efficiency_is_in_zero_one(lengths, budget, grouping, tolerance, min_group):
    plan = plan_batches(lengths, max_batch_tokens=budget, group_by_length=grouping, tolerance=tolerance,
                        min_group_size=min_group)
    stats = plan_stats(lengths, plan)
    assert 0.0 < stats.padding_efficiency <= 1.0
    assert stats.inputs == len(lengths)
    assert stats.tokens == sum(lengths)
    assert stats.groups == len(plan)
    assert stats.padded_tokens >= stats.tokens


def _brute_force_cost(lengths: list[int], budget: int, tolerance: float, cost: int,
                      max_inputs: int | None = None) -> int:
    """Cheapest valid partition of the sorted lengths into contiguous runs, by trying all cut sets."""
    s = sorted(lengths)
    n = len(s)
    best = None
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        total = 0
        for a, b in zip(bounds, bounds[1:]):
            run = s[a:b]
            if run[0] < run[-1] * (1.0 - tolerance) or (len(run) > 1 and len(run) * run[-1] > budget) or (
                    max_inputs is not None and len(run) > max_inputs):
                break
            total += len(run) * run[-1] + cost
        else:
            best = total if best is None else min(best, total)
    assert best is not None
    return best


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=9), st.integers(16, 400), tolerance_st,
       st.integers(0, 64))
def test_length_groups_are_the_cheapest_valid_partition(lengths, budget, tolerance, cost):
    plan = plan_batches(lengths, max_batch_tokens=budget, tolerance=tolerance, group_cost_tokens=cost)
    got = sum(padded_size(lengths, g) for g in plan) + cost * len(plan)
    assert got == _brute_force_cost(lengths, budget, tolerance, cost)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=9), st.integers(16, 400), tolerance_st,
       st.integers(0, 64), st.integers(1, 4))
def test_length_groups_are_the_cheapest_valid_partition_of_at_most_max_inputs(lengths, budget, tolerance, cost,
                                                                               max_inputs):
    plan = plan_batches(lengths, max_batch_tokens=budget, tolerance=tolerance, group_cost_tokens=cost,
                        max_inputs=max_inputs)
    got = sum(padded_size(lengths, g) for g in plan) + cost * len(plan)
    assert got == _brute_force_cost(lengths, budget, tolerance, cost, max_inputs)


def _reference_cost(lengths: list[int], budget: int, tolerance: float, cost: int, max_inputs: int) -> int:
    """The cheapest valid partition by the plain O(n x window) dynamic programme over the sorted lengths."""
    s = sorted(lengths)
    best = [0] + [None] * len(s)
    for j in range(1, len(s) + 1):
        longest = s[j - 1]
        options = [best[i] + (j - i) * longest + cost for i in range(j)
                   if s[i] >= longest * (1.0 - tolerance) and (j - i == 1 or (j - i) * longest <= budget)
                   and j - i <= max_inputs]
        best[j] = min(options)
    return best[-1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=200), st.integers(16, 16384), tolerance_st,
       st.integers(0, 4096), st.integers(1, 256))
def test_length_groups_cost_what_the_plain_dynamic_programme_finds_on_large_windows(lengths, budget, tolerance,
                                                                                   cost, max_inputs):
    plan = plan_batches(lengths, max_batch_tokens=budget, tolerance=tolerance, group_cost_tokens=cost,
                        max_inputs=max_inputs)
    got = sum(padded_size(lengths, g) for g in plan) + cost * len(plan)
    assert got == _reference_cost(lengths, budget, tolerance, cost, max_inputs)


def test_length_groups_come_out_shortest_first():
    lengths = [300, 12, 150, 11, 290, 149]
    plan = plan_batches(lengths, max_batch_tokens=8192, tolerance=0.1)
    assert plan == [[3, 1], [5, 2], [4, 0]]


def test_tolerance_decides_whether_near_lengths_share_a_forward():
    lengths = [90, 100]
    # 90 is within 20% of 100: one forward of 2 x 100 is cheaper than two forwards.
    assert plan_batches(lengths, max_batch_tokens=8192, tolerance=0.2, group_cost_tokens=32) == [[0, 1]]
    # With no tolerance only equal lengths may share a forward.
    assert plan_batches(lengths, max_batch_tokens=8192, tolerance=0.0, group_cost_tokens=32) == [[0], [1]]


def test_full_tolerance_still_splits_when_padding_costs_more_than_a_forward():
    lengths = [10, 10, 10, 100]
    plan = plan_batches(lengths, max_batch_tokens=8192, tolerance=1.0, group_cost_tokens=32)
    assert plan == [[0, 1, 2], [3]]
    stats = plan_stats(lengths, plan)
    assert stats.padded_tokens == 130 and stats.padding_efficiency == 1.0


def test_higher_group_cost_gives_fewer_fuller_forwards():
    lengths = [10, 10, 10, 100]
    plan = plan_batches(lengths, max_batch_tokens=8192, tolerance=1.0, group_cost_tokens=1000)
    assert plan == [[0, 1, 2, 3]]


def test_min_group_size_merges_small_groups_into_a_neighbour():
    lengths = [10, 10, 10, 100, 100, 100]
    split = plan_batches(lengths, max_batch_tokens=8192, tolerance=0.2)
    assert split == [[0, 1, 2], [3, 4, 5]]
    merged = plan_batches(lengths, max_batch_tokens=8192, tolerance=0.2, min_group_size=4)
    assert merged == [[0, 1, 2, 3, 4, 5]]
    assert plan_stats(lengths, merged).padding_efficiency < plan_stats(lengths, split).padding_efficiency


def test_min_group_size_does_not_merge_past_the_budget():
    lengths = [10, 10, 10, 100, 100, 100]
    plan = plan_batches(lengths, max_batch_tokens=500, tolerance=0.2, min_group_size=4)
    assert plan == [[0, 1, 2], [3, 4, 5]]


def test_small_group_joins_the_neighbour_that_pads_least():
    lengths = [10, 50, 52, 54]
    groups = [[0], [1], [2, 3]]
    # [0]+[1] pads to 2 x 50 = 100; [1]+[2,3] pads to 3 x 54 = 162: the single 10 goes left of [1].
    assert merge_small_groups(lengths, groups, 2, 8192) == [[0, 1], [2, 3]]


def test_input_longer_than_budget_gets_a_forward_of_its_own():
    lengths = [600, 20, 20]
    for grouping in (True, False):
        plan = plan_batches(lengths, max_batch_tokens=512, group_by_length=grouping, tolerance=1.0)
        assert [0] in plan
        assert sorted(_flatten(plan)) == [0, 1, 2]


def test_budget_splits_equal_lengths_into_the_fewest_groups_that_fit():
    plan = plan_batches([100] * 10, max_batch_tokens=400, tolerance=0.0, group_cost_tokens=32)
    assert len(plan) == 3
    assert all(len(g) <= 4 for g in plan)


def test_no_inputs_make_an_empty_plan_with_perfect_efficiency():
    assert plan_batches([], max_batch_tokens=100) == []
    assert plan_batches([], max_batch_tokens=100, group_by_length=False) == []
    stats = plan_stats([], [])
    assert stats.padded_tokens == 0 and stats.padding_efficiency == 1.0


@pytest.mark.parametrize("budget", [0, -5])
def test_non_positive_budget_is_refused(budget):
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1, 2], max_batch_tokens=budget)


# The group that costs least per input (a GPU replica with a cost line): any run of the sorted lengths the
# plan's limits allow, against every such run.

def _valid_runs(lengths: list[int], budget: int, tolerance: float, max_inputs: int | None) -> list[list[int]]:
    """Every run of the stably sorted inputs within the tolerance, the budget (or of one input) and max_inputs."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    runs = []
    for a in range(len(order)):
        for b in range(a + 1, len(order) + 1):
            run = order[a:b]
            longest = lengths[run[-1]]
            if lengths[run[0]] >= longest * (1.0 - tolerance) and (len(run) == 1 or len(run) * longest <= budget) and (
                    max_inputs is None or len(run) <= max_inputs):
                runs.append(run)
    return runs


def _cost_per_input(lengths: list[int], group: list[int], cost: int) -> float:
    return (cost + padded_size(lengths, group) - sum(lengths[i] for i in group)) / len(group)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 300), st.sampled_from([10, 50, 100])), min_size=1, max_size=40),
       st.integers(16, 4000), tolerance_st, st.one_of(st.integers(0, 64), st.integers(0, 5000)),
       st.one_of(st.none(), st.integers(1, 16)), st.integers(1, 6))
@example([1, 50, 100, 100], 8192, 1.0, 10, None, 1)  # the best start for the longest end is not its first
def test_the_cheapest_group_costs_no_more_per_input_than_any_group_the_limits_allow(lengths, budget, tolerance,
                                                                                   cost, max_inputs, min_group):
    group = cheapest_group(lengths, max_batch_tokens=budget, max_inputs=max_inputs, tolerance=tolerance,
                           group_cost_tokens=cost, min_group_size=min_group)
    runs = _valid_runs(lengths, budget, tolerance, max_inputs)
    large = [run for run in runs if len(run) >= min_group]
    assert sorted(group) in [sorted(run) for run in runs], "a run of the sorted lengths, within every limit"
    assert len(group) >= min_group or not large, "as large as min_group_size wherever a run allows it"
    best = min(_cost_per_input(lengths, run, cost) for run in (large or runs))
    assert _cost_per_input(lengths, group, cost) == pytest.approx(best, rel=1e-12, abs=1e-12)


@fast
@given(lengths_st, budget_st, tolerance_st, cost_st)
def test_next_group_takes_the_cheapest_group_unless_asked_for_the_oldest(lengths, budget, tolerance, cost):
    plan = {"max_batch_tokens": budget, "tolerance": tolerance, "group_cost_tokens": cost, "max_inputs": 64}
    assert next_group(lengths, oldest_first=False, **plan) == (cheapest_group(lengths, **plan) if lengths else [])
    oldest = next_group(lengths, **plan)
    assert not lengths or 0 in oldest
    # Without length grouping there is no length run to choose: the oldest input's group, in arrival order.
    assert next_group(lengths, oldest_first=False, group_by_length=False, **plan) == next_group(
        lengths, group_by_length=False, **plan)


def test_the_cheapest_group_leaves_the_oldest_input_when_others_pad_less():
    # One long input first, then three short ones of one length: the short ones cost a third of a forward's
    # fixed cost each (100 tokens) and pad nothing; the long one costs a whole forward alone (300), or pads
    # the short ones to its length beside it ((300 + 3 x 188) / 4 = 216).
    lengths = [200, 12, 12, 12]
    assert cheapest_group(lengths, max_batch_tokens=8192, tolerance=1.0, group_cost_tokens=300) == [1, 2, 3]
    assert 0 in next_group(lengths, max_batch_tokens=8192, tolerance=1.0, group_cost_tokens=300)
    # Where a forward's fixed cost is worth more than that padding, all four share one forward.
    assert cheapest_group(lengths, max_batch_tokens=8192, tolerance=1.0, group_cost_tokens=2000) == [1, 2, 3, 0]
    # A forward that costs nothing fixed: each input alone pads nothing, and the first shortest is as cheap.
    assert cheapest_group(lengths, max_batch_tokens=8192, tolerance=1.0, group_cost_tokens=0) == [1]


def test_the_cheapest_group_takes_in_arrival_order_among_equal_lengths_up_to_max_inputs():
    assert cheapest_group([50] * 10, max_batch_tokens=8192, max_inputs=4, group_cost_tokens=100) == [0, 1, 2, 3]
    assert cheapest_group([], max_batch_tokens=8192) == []
