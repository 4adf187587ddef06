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
