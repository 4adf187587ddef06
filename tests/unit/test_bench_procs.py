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
    """The replica's loop, a forward worker and a helper as the replica names them; a thread the loop starts
    after it was named takes its name, and counts as a helper (the loop is the oldest of that name); threads
    of other names are left out."""
    import threading

    from bench import procs
    from embserve.engine import scheduler
    from embserve.engine.scheduler import name_os_thread

    assert (procs.FORWARD_THREAD, procs.LOOP_THREAD, procs.HELPER_THREAD) == (
        scheduler.FORWARD_THREAD, scheduler.LOOP_THREAD, scheduler.HELPER_THREAD)
    assert len(f"{scheduler.HELPER_THREAD}_99") <= 15  # the OS keeps 15 characters of a name
    started, done = threading.Barrier(6), threading.Event()
    tids: dict[str, int] = {}

    def thread(role: str, name: str | None, child: bool = False) -> None:
        if name is not None:
            name_os_thread(name)
        tids[role] = threading.get_native_id()
        if child:  # started by the named loop: it takes the loop's name
            threading.Thread(target=thread, args=("started by the loop", None)).start()
        started.wait()
        done.wait()

    threads = [threading.Thread(target=thread, args=args) for args in (
        ("loop", scheduler.LOOP_THREAD, True), ("worker", f"{scheduler.FORWARD_THREAD}0"),
        ("helper", f"{scheduler.HELPER_THREAD}_0"), ("other", "ray::IDLE"))]
    for t in threads:
        t.start()
    started.wait()
    try:
        found = {tid: kind for tid, (kind, _) in procs.replica_thread_ticks(os.getpid()).items()}
        assert found == {tids["loop"]: "loop", tids["worker"]: "forward workers", tids["helper"]: "helpers",
                         tids["started by the loop"]: "helpers"}, (found, tids)
    finally:
        done.set()
        for t in threads:
            t.join()


def test_the_replicas_runtime_threads_are_what_its_loop_and_workers_did_not_use():
    from bench.procs import replica_split

    tick = os.sysconf("SC_CLK_TCK")
    def snapshot(at: float, loop: int, workers: tuple[int, int], helper: int) -> CpuSnapshot:
        threads = {1: ("loop", loop), 2: ("forward workers", workers[0]), 3: ("forward workers", workers[1]),
                   4: ("helpers", helper)}
        return CpuSnapshot(at=at, system_ticks=0, per_pid={}, replica_threads=threads)

    before = snapshot(0.0, 0, (0, tick), 0)
    after = snapshot(2.0, tick // 2, (tick // 10, tick + tick // 10), tick // 5)
    # 1.5 cores in the replica over 2 s: the loop 0.25, the two workers 0.05 each, a helper 0.1, the rest 1.05.
    assert replica_split(before, after, 1.5) == {"loop": 0.25, "forward workers": 0.1, "helpers": 0.1,
                                                 "runtime threads": 1.05}
    assert replica_split(before, CpuSnapshot(at=2.0, system_ticks=0, per_pid={}), 1.5) is None
    # A replica from before the loop was named: its forward workers alone say nothing of the rest.
    workers_only = {tid: thread for tid, thread in after.replica_threads.items() if thread[0] != "loop"}
    assert replica_split(before, CpuSnapshot(at=2.0, system_ticks=0, per_pid={}, replica_threads=workers_only),
                         1.5) is None
