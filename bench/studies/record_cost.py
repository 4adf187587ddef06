"""What one metrics event costs on the serving path: the sources' record calls, in-process, in ns per event.

    python -m bench record-cost
    PYTHONPATH=PATH/TO/another/checkout python -m bench.studies.record_cost   # the same calls on another tree

The replica records one event per admission, per forward and per answered request, from its forward
threads; the ingress one per HTTP request. Each case makes 200,000 calls, 7 times; it prints the best and
the median time per call. Run it alone on the machine: other load moves the medians, not the ordering.
"""

from __future__ import annotations

import argparse
import timeit

from embserve.metrics.events import Admitted, Answered, Forward
from embserve.metrics.stats import IngressReporter, ReplicaReporter

CALLS = 200_000
ROUNDS = 7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the cases and their counts are fixed, so that runs compare."""


def run(args: argparse.Namespace) -> None:
    replica, ingress = ReplicaReporter("m"), IngressReporter()
    admitted, forward, answered = Admitted(2, 5, 0.001), Forward(5, 100, 120, 0.02), Answered(0.002, None)
    cases = {
        "replica.record(Admitted)": (replica, lambda: replica.record(admitted)),
        "replica.record(Forward)": (replica, lambda: replica.record(forward)),
        "replica.record(Answered)": (replica, lambda: replica.record(answered)),
        "ingress.record_request": (ingress, lambda: ingress.record_request(200, 0.01, None)),
    }
    for name, (source, call) in cases.items():
        times = []
        for _ in range(ROUNDS):
            source.take()  # each round starts from an empty list, as a shipper leaves it every 0.5 s
            times.append(timeit.timeit(call, number=CALLS) / CALLS * 1e9)
        source.take()
        times.sort()
        print(f"{name:26s} best {times[0]:6.0f} ns   median {times[ROUNDS // 2]:6.0f} ns")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("record-cost", argv)


if __name__ == "__main__":
    raise SystemExit(main())
