"""The forward pool: the most urgent waiting call first, errors to their callers, a clean shutdown."""

import threading
from concurrent.futures import CancelledError

import pytest

from embserve.forwards import ForwardPool


def test_waiting_calls_go_lowest_rank_first_then_oldest_first():
    pool = ForwardPool(1)
    gate, started = threading.Event(), threading.Event()
    order = []
    blocker = pool.submit(lambda: started.set() or gate.wait(10))  # holds the one worker while others queue
    started.wait(10)
    futures = [pool.submit(order.append, name, rank=rank)
               for name, rank in (("old run, group 2", 2), ("old run, group 3", 3), ("new run, group 0", 0),
                                  ("newer run, group 0", 0), ("new run, group 2", 2))]
    assert pool.waiting == 5
    gate.set()
    for future in [blocker, *futures]:
        future.result(timeout=10)
    assert order == ["new run, group 0", "newer run, group 0", "old run, group 2", "new run, group 2",
                     "old run, group 3"]
    pool.shutdown()


def test_each_worker_runs_the_initializer_and_calls_run_at_once():
    seen = []
    pool = ForwardPool(2, initializer=lambda tag: seen.append((tag, threading.current_thread().name)),
                       initargs=("ready",), name="fwd")
    meet = threading.Barrier(2, timeout=10)
    both = [pool.submit(meet.wait), pool.submit(meet.wait)]  # only two workers at once get past it
    assert sorted(f.result(timeout=10) for f in both) == [0, 1]
    assert sorted(seen) == [("ready", "fwd-0"), ("ready", "fwd-1")]
    pool.shutdown()


def test_an_error_reaches_its_caller_and_the_worker_goes_on():
    pool = ForwardPool(1)
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=10)
    assert pool.submit(lambda: 42).result(timeout=10) == 42
    pool.shutdown()


def test_shutdown_cancels_what_waits_lets_the_running_call_finish_and_refuses_more():
    pool = ForwardPool(1)
    gate, started = threading.Event(), threading.Event()
    running = pool.submit(lambda: started.set() or gate.wait(10))
    started.wait(10)
    waiting = pool.submit(lambda: "never")
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    with pytest.raises(CancelledError):
        waiting.result(timeout=10)
    gate.set()
    stopper.join(10)
    assert running.result(timeout=10) is True
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None)


def test_a_cancelled_call_is_skipped():
    pool = ForwardPool(1)
    gate = threading.Event()
    blocker = pool.submit(gate.wait)
    ran = []
    skipped = pool.submit(ran.append, "ran")
    assert skipped.cancel()
    gate.set()
    blocker.result(timeout=10)
    assert pool.submit(lambda: "after").result(timeout=10) == "after" and ran == []
    pool.shutdown()


def test_a_pool_needs_a_worker():
    with pytest.raises(ValueError):
        ForwardPool(0)


def test_a_steady_stream_of_new_runs_does_not_starve_an_old_runs_last_group():
    """Each call queues a new two-group run, for ever; the old run's group of rank 3 still gets its turn,
    because new work ranks from the pool's clock, which runs on."""
    pool = ForwardPool(1)
    gate, started = threading.Event(), threading.Event()
    blocker = pool.submit(lambda: started.set() or gate.wait(10))
    started.wait(10)
    order = []
    old_last = pool.submit(order.append, "old run, group 3", rank=3)
    stream_left = [40]

    def new_run_group(name):
        order.append(name)
        if stream_left[0] > 0:
            stream_left[0] -= 1
            pool.submit(new_run_group, "new", rank=0)
            pool.submit(new_run_group, "new", rank=1)

    pool.submit(new_run_group, "new", rank=0)
    gate.set()
    blocker.result(timeout=10)
    old_last.result(timeout=10)
    assert order.index("old run, group 3") < 10, order[:12]
    pool.shutdown()


def test_a_worker_that_cannot_start_fails_the_pool_at_once():
    def broken(_):
        raise OSError("no threads for you")

    with pytest.raises(RuntimeError, match="failed to start") as failure:
        ForwardPool(2, initializer=broken, initargs=(1,))
    assert isinstance(failure.value.__cause__, OSError)
