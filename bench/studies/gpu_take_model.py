"""The pipelined GPU worker's closed loop as an event model: no clock, no threads, no host time, so what a
planner choice can reach at all is seen apart from the host's noise (bench/simulated_gpu.py runs the real
scheduler in real time on the same cost line).

    python -m bench gpu-take-model [--clients 128 256 512] [--seconds 4]

Modelled as Scheduler._pipeline runs it with a cost line: forwards cost fixed + per padded token and run one
after another; a group is taken when the launched work is due to end within the lead time (at once with
nothing launched) and launched at once; the oldest launched group is answered after the next launch, and
its clients send their next text at once (each drawn at random from the benchmark's 2048 mixed texts,
as bench/simulated_gpu.py's clients do). The group is chosen by embserve's own next_group: the oldest
input's ("oldest"), or the cheapest per input with the oldest's again once an input has waited
PASSED_OVER_TAKES takes ("cheapest"). `--answer-first` answers each group before the next take, as if its
clients were back at no cost: the card then idles for nothing, which no host does, so it bounds what a
larger pool of pending inputs could give. The offline limit is bench/simulated_gpu.py's: the texts sorted,
back to back in groups of max_batch_size.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import deque
from pathlib import Path
from typing import Any

from bench.common import write_json
from embserve.engine.batching import next_group
from embserve.engine.scheduler import PASSED_OVER_TAKES


def offline_per_s(lengths: list[int], fixed_s: float, per_token_s: float, group: int) -> float:
    ordered = sorted(lengths)
    seconds = sum(fixed_s + per_token_s * len(ordered[i:i + group]) * ordered[i:i + group][-1]
                  for i in range(0, len(ordered), group))
    return len(ordered) / seconds


def closed_loop(lengths: list[int], clients: int, choice: str, args: argparse.Namespace) -> dict[str, Any]:
    """`clients` closed-loop callers of one text each through the modelled worker, for `args.seconds`."""
    draws = [random.Random(k) for k in range(clients)]
    # (arrived, length, client, takes before it arrived), in arrival order
    pending = [(0.0, lengths[draws[k].randrange(len(lengths))], k, 0) for k in range(clients)]
    plan = {"max_batch_tokens": args.budget, "max_inputs": args.max_batch_size, "tolerance": 1.0,
            "group_cost_tokens": round(args.fixed_ms * 1000 / args.per_token_us)}
    fixed_s, per_token_s, lead_s = args.fixed_ms / 1e3, args.per_token_us / 1e6, args.lead_ms / 1e3
    now = device_free = 0.0
    inflight: deque[tuple[float, list[tuple[float, int, int, int]]]] = deque()
    takes = served = forwards = padded = 0
    waits: list[float] = []
    waited_takes = 0
    depth = 1 if args.answer_first else 2
    while now < args.seconds:
        if inflight:
            now = max(now, inflight[-1][0] - lead_s)
        overdue = choice == "oldest" or takes - pending[0][3] >= PASSED_OVER_TAKES
        group = next_group([p[1] for p in pending], oldest_first=overdue, **plan)
        chosen = set(group)
        taken = [pending[i] for i in group]
        pending = [p for i, p in enumerate(pending) if i not in chosen]
        waited_takes = max([waited_takes] + [takes - p[3] for p in taken])
        takes += 1
        longest = max(p[1] for p in taken)
        device_free = max(now, device_free) + fixed_s + per_token_s * len(taken) * longest
        inflight.append((device_free, taken))
        forwards += 1
        padded += len(taken) * longest
        if len(inflight) >= depth or not pending:
            end, done = inflight.popleft()
            now = max(now, end)
            for arrived, _, k, _ in done:
                waits.append(now - arrived)
                pending.append((now, lengths[draws[k].randrange(len(lengths))], k, takes))
            served += len(done)
    limit = offline_per_s(lengths, fixed_s, per_token_s, args.max_batch_size)
    ms = sorted(w * 1e3 for w in waits)
    return {"clients": clients, "choice": choice, "answer_first": args.answer_first,
            "ratio_to_offline": round(served / now / limit, 3), "inputs_per_forward": round(served / forwards, 1),
            "padded_tokens_per_input": round(padded / served, 1), "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(ms[int(len(ms) * 0.99)], 1), "max_ms": round(ms[-1], 1), "most_takes_waited": waited_takes}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--seconds", type=float, default=4.0, help="modelled seconds per point")
    parser.add_argument("--fixed-ms", type=float, default=2.3, help="the line bench simulated-gpu's card measures")
    parser.add_argument("--per-token-us", type=float, default=1.0)
    parser.add_argument("--lead-ms", type=float, default=0.5, help="the pipelined worker's LEAD_FLOOR_S")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--budget", type=int, default=65536)
    parser.add_argument("--answer-first", action="store_true", help="answer each group before the next take")
    parser.add_argument("--out", type=Path, default=Path("build/bench-gpu-take-model.json"))


def run(args: argparse.Namespace) -> None:
    from bench.planner import token_lengths

    lengths = token_lengths(2048, seed=3)
    rows = [closed_loop(lengths, clients, choice, args)
            for clients in args.clients for choice in ("oldest", "cheapest")]
    for row in rows:
        print(json.dumps(row), flush=True)
    write_json(args.out, rows)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("gpu-take-model", argv)


if __name__ == "__main__":
    raise SystemExit(main())
