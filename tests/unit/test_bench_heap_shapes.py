"""The heap-shapes study's verdict: growth from the second third of a run to the last, past warm-up."""

import ctypes

import pytest

from bench.studies.heap_shapes import live_heap_mib, third_growth


def test_a_run_that_levelled_off_after_warm_up_shows_no_growth():
    assert third_growth([100, 300, 500, 600, 600, 600, 600, 600, 600]) == 0.0


def test_a_run_still_rising_shows_its_growth_from_the_second_third_to_the_last():
    assert third_growth([100, 100, 100, 200, 200, 200, 300, 300, 300]) == pytest.approx(0.5)


def test_too_few_samples_give_no_verdict():
    assert third_growth([100, 200]) is None


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="not glibc 2.33+")
def test_the_live_heap_counts_a_block_held_until_it_is_freed():
    before = live_heap_mib()
    block = bytearray(64 * 2**20)
    held = live_heap_mib()
    del block
    assert held - before >= 63 and live_heap_mib() < held - 63
