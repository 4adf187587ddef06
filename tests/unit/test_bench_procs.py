"""bench.procs: where a replica's forward workers spend a window, from two snapshots of their schedstat."""

import os

from bench.procs import CpuSnapshot, cpu_usage, forward_states


def snapshot(at: float, threads: dict[int, tuple[int, int]], idle_ticks: int = 0) -> CpuSnapshot:
    return CpuSnapshot(at=at, system_ticks=0, per_pid={}, idle_ticks=idle_ticks, forward_threads=threads)


def test_a_window_splits_into_running_waiting_for_a_cpu_and_asleep_per_worker():
    before = snapshot(10.0, {1: (0, 0), 2: (5_000_000_000, 1_000_000_000), 3: (0, 0)})
    after = snapshot(12.0, {1: (1_200_000_000, 600_000_000), 2: (6_000_000_000, 1_800_000_000), 4: (9, 9)})
    # Workers 1 and 2 are in both: (0.6, 0.3) and (0.5, 0.4) of the 2 s; 3 ended and 4 began inside it.
    assert forward_states(before, after) == {"workers": 2, "running": 0.55, "waiting_for_cpu": 0.35, "asleep": 0.1}


def test_no_forward_worker_seen_twice_is_no_answer_and_idle_comes_from_the_machine():
    assert forward_states(snapshot(0.0, {}), snapshot(1.0, {1: (1, 1)})) is None
    usage = cpu_usage(snapshot(0.0, {}, idle_ticks=100), snapshot(2.0, {}, idle_ticks=100 + 50))
    assert usage.forward is None and abs(usage.idle - 50 / os.sysconf("SC_CLK_TCK") / 2) < 1e-9


def test_a_replicas_named_threads_are_told_apart_by_their_os_names():
    """A forward worker and the replica's loop as the replica names them; other threads are left out."""
    import threading

    from bench.procs import LOOP_THREAD, replica_thread_ticks
    from deployments.embedder import LOOP_THREAD as REPLICA_LOOP_THREAD
    from embserve.engine.scheduler import name_os_thread

    assert LOOP_THREAD == REPLICA_LOOP_THREAD
    named, done = threading.Barrier(3), threading.Event()

    def thread(name: str) -> None:
        name_os_thread(name)
        named.wait()
        done.wait()

    threads = [threading.Thread(target=thread, args=(name,)) for name in ("forward-0", LOOP_THREAD)]
    for t in threads:
        t.start()
    named.wait()
    try:
        found = replica_thread_ticks(os.getpid())
        assert sorted(kind for kind, _ in found.values()) == ["forward workers", "loop"]
        assert set(found) == {t.native_id for t in threads}
    finally:
        done.set()
        for t in threads:
            t.join()


def test_the_replicas_runtime_threads_are_what_its_loop_and_workers_did_not_use():
    from bench.procs import replica_split

    tick = os.sysconf("SC_CLK_TCK")
    def snapshot(at: float, loop: int, workers: tuple[int, int]) -> CpuSnapshot:
        threads = {1: ("loop", loop), 2: ("forward workers", workers[0]), 3: ("forward workers", workers[1])}
        return CpuSnapshot(at=at, system_ticks=0, per_pid={}, replica_threads=threads)

    before, after = snapshot(0.0, 0, (0, tick)), snapshot(2.0, tick // 2, (tick // 10, tick + tick // 10))
    # 1.5 cores in the replica over 2 s: the loop 0.25, the two workers 0.05 each, the rest 1.15.
    assert replica_split(before, after, 1.5) == {"loop": 0.25, "forward workers": 0.1, "runtime threads": 1.15}
    assert replica_split(before, CpuSnapshot(at=2.0, system_ticks=0, per_pid={}), 1.5) is None
    # A replica from before the loop was named: its forward workers alone say nothing of the rest.
    workers_only = {tid: thread for tid, thread in after.replica_threads.items() if thread[0] != "loop"}
    assert replica_split(before, CpuSnapshot(at=2.0, system_ticks=0, per_pid={}, replica_threads=workers_only),
                         1.5) is None
