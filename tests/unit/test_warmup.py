"""The replica's warm-up: the shapes it picks from its budget, and that it runs exactly those."""

from __future__ import annotations

import pytest

from embserve.engine.warmup import CPU_WARM_UP_TOKENS, warm_up, warm_up_shapes


@pytest.mark.parametrize(("tokens", "size", "max_length", "device", "want"), [
    (8192, 32, 256, "cpu", [(1, 8), (8, 128)]),          # capped at CPU_WARM_UP_TOKENS on a CPU
    (81920, 256, 512, "cuda", [(1, 8), (256, 128)]),     # the largest group the budget and size allow
    (81920, 64, 512, "cuda", [(1, 8), (64, 128)]),
    (2048, 256, 512, "cuda", [(1, 8), (16, 128)]),       # a lowered budget: fewer inputs
    (8192, 32, 128, "cpu", [(1, 8), (16, 64)]),          # mid length is at most half the model's maximum
    (8192, 1, 256, "cpu", [(1, 8), (1, 128)]),
    (8192, 32, 8, "cpu", [(1, 8), (32, 8)]),
])
def test_warm_up_shapes_follow_the_budget(tokens, size, max_length, device, want):
    shapes = warm_up_shapes(tokens, size, max_length, device)
    assert shapes == want
    if device == "cpu":
        assert all(n * length <= CPU_WARM_UP_TOKENS for n, length in shapes)


def test_warm_up_runs_the_shapes_it_says_masked_and_unmasked(float32_model):
    ran: list[tuple[int, int, bool]] = []
    forward = float32_model.forward

    def record(seqs):
        ran.append((len(seqs), max(map(len, seqs)), len(set(map(len, seqs))) > 1))
        return forward(seqs)

    float32_model.forward = record
    try:
        shapes = warm_up_shapes(8192, 32, float32_model.max_length, "cpu")
        done = warm_up(float32_model, shapes)
    finally:
        del float32_model.forward
    assert [(n, longest) for n, longest, _ in ran] == shapes == list(done.shapes)
    assert [mixed for *_, mixed in ran] == [False, True]  # the large group also warms the masked path
    assert done.seconds > 0 and not done.out_of_memory


def test_a_timed_warm_up_fits_a_forwards_fixed_and_per_token_cost(float32_model):
    shapes = warm_up_shapes(8192, 32, float32_model.max_length, "cpu")
    done = warm_up(float32_model, shapes, timed=True)
    assert [tokens for tokens, _ in done.timings] == [n * length for n, length in shapes]
    assert all(seconds > 0 for _, seconds in done.timings)
    untimed = warm_up(float32_model, shapes)
    assert untimed.timings == () and untimed.cost is None
