"""A forward's cost line from the warm-up's two timings, and what it bounds: plain numbers, no model."""

from __future__ import annotations

import pytest

from embserve.engine.forward_cost import ForwardCost, capped_budget, fit_forward_cost
from embserve.engine.hardware import Choice, Profile, forward_timing
from embserve.settings import CPU_GROUP_COST_TOKENS, GPU_GROUP_COST_TOKENS, Settings, default_group_cost_tokens


def test_two_timings_give_the_fixed_and_per_token_cost():
    cost = fit_forward_cost([(8, 0.002008), (32768, 0.034768)])  # 2 ms + 1 us per token
    assert cost.fixed_s == pytest.approx(0.002) and cost.per_token_s == pytest.approx(1e-6)
    assert cost.fixed_tokens == 2000
    assert cost.seconds(1000) == pytest.approx(0.003)
    assert cost.tokens_within(0.250) == 248000


@pytest.mark.parametrize("timings", [[], [(8, 0.01)], [(8, 0.02), (4096, 0.01)], [(8, 0.01), (8, 0.02)]])
def test_timings_that_give_no_rising_line_give_no_cost(timings):
    assert fit_forward_cost(timings) is None


def test_max_forward_ms_lowers_a_budget_to_what_ends_in_time_but_keeps_one_full_input():
    cost = ForwardCost(fixed_s=0.002, per_token_s=1e-5)  # 10 us per token: a large model on a small card
    budget, why = capped_budget(65536, cost, 250, floor=512)
    assert budget == 24800 and "max_forward_ms 250" in why
    assert capped_budget(65536, cost, 1, floor=512)[0] == 512  # never below one input of the maximum
    assert capped_budget(8192, cost, 250, floor=512) == (8192, None)  # already within
    assert capped_budget(65536, None, 250, floor=512) == (65536, None)  # nothing measured
    assert capped_budget(65536, cost, None, floor=512) == (65536, None)


def test_on_a_gpu_the_warm_up_sets_group_cost_makes_tolerance_a_preference_and_hands_on_its_line(clean_env):
    cost = ForwardCost(fixed_s=0.002, per_token_s=1e-5)
    profile = Profile()
    timing = forward_timing(Settings(), profile, Choice(65536, "auto: card"), cost, 250.0, 512, gpu=True)
    assert (timing.budget, timing.group_cost_tokens, timing.tolerance_wall) == (24800, 200, False)
    assert timing.cost == cost  # the pipelined worker's, to take each next group just in time
    shown = profile.as_dict()
    assert shown["max_batch_tokens"]["value"] == 24800 and "max_forward_ms" in shown["max_batch_tokens"]["source"]
    assert shown["group_cost_tokens"]["value"] == 200 and "preference" in shown["length_group_tolerance"]["source"]


def test_explicit_settings_keep_their_value_and_a_cpu_keeps_its_planner(clean_env):
    cost = ForwardCost(fixed_s=0.002, per_token_s=1e-5)
    given = Settings(max_batch_tokens=65536, length_group_tolerance=0.1)
    timing = forward_timing(given, Profile(), Choice(65536, "set: args"), cost, 250.0, 512, gpu=True)
    assert (timing.budget, timing.tolerance_wall) == (65536, True)
    cpu = forward_timing(Settings(), Profile(), Choice(8192, "auto: CPU default"), None, None, 256, gpu=False)
    # A CPU's workers take groups at once; its group cost is the CPU default.
    assert cpu == type(cpu)(8192, CPU_GROUP_COST_TOKENS, True) and cpu.cost is None
    set_cost = forward_timing(Settings(group_cost_tokens=96), Profile(), Choice(65536, "auto: card"), cost, 250.0,
                              512, gpu=True)
    assert set_cost.group_cost_tokens == 96  # a group cost that is set wins over the measured one


def test_a_gpu_that_measured_nothing_plans_with_the_gpu_default_group_cost(clean_env):
    profile = Profile()
    timing = forward_timing(Settings(), profile, Choice(65536, "auto: card"), None, 250.0, 512, gpu=True)
    assert timing.group_cost_tokens == GPU_GROUP_COST_TOKENS == default_group_cost_tokens("cuda")
    assert profile.as_dict()["group_cost_tokens"] == {"value": GPU_GROUP_COST_TOKENS, "source": "auto: GPU default"}
