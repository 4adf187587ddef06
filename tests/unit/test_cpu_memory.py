"""What keeps a CPU replica's memory flat: a bounded oneDNN primitive cache and periodic heap trims."""

import ctypes

import pytest

from embserve.engine.cpu_memory import ONEDNN_CACHE_ENTRIES, HeapTrimmer, bound_primitive_cache


def test_the_primitive_cache_is_bounded_unless_the_user_set_it():
    environ: dict[str, str] = {}
    assert bound_primitive_cache(environ) is True
    assert environ == {"LRU_CACHE_CAPACITY": str(ONEDNN_CACHE_ENTRIES)}
    mine = {"LRU_CACHE_CAPACITY": "1024"}
    assert bound_primitive_cache(mine) is False and mine == {"LRU_CACHE_CAPACITY": "1024"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_once_per_interval():
    calls: list[int] = []
    clock = Clock()
    heap = HeapTrimmer(interval_s=5.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    assert heap.maybe_trim() is False  # not yet 5 s since it was made
    clock.now += 5.0
    assert heap.maybe_trim() is True and calls == [0]
    clock.now += 4.9
    assert heap.maybe_trim() is False
    clock.now += 0.2
    assert heap.maybe_trim() is True and heap.trims == 2


def test_without_glibc_it_never_trims():
    clock = Clock()
    heap = HeapTrimmer(interval_s=0.0, trim=None, clock=clock)
    clock.now += 10
    assert heap.maybe_trim() is False and heap.trims == 0


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="not glibc")
def test_glibcs_own_trim_runs():
    heap = HeapTrimmer(interval_s=0.0)
    assert heap.trim is not None and heap.maybe_trim() is True


def assert_trims_after_a_forward(model) -> None:
    """A CPU model, on either runtime, trims the heap after a forward once its interval has passed."""
    heap, interval = model.heap, model.heap.interval_s
    heap.interval_s = 0.0  # every forward trims
    try:
        before = heap.trims
        model.forward([[101, 7592, 102], [101, 102]])
        assert heap.trims == before + 1
    finally:
        heap.interval_s = interval


def test_a_cpu_model_trims_after_its_forwards(bundled_model):
    assert_trims_after_a_forward(bundled_model)
