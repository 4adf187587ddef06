"""How long one plan takes (embserve/engine/batching.py next_group) at 64 to 512 pending inputs, on the benchmark's
mixed texts as the bundled tokenizer counts them, with a CPU replica's settings and a GPU replica's. The
planner runs under the queue lock before each forward, so on a GPU the card waits for it.

    python -m bench planner [--out build/bench-planner.json]

Beside it, the plain O(n x window) dynamic programme that the planner replaced, for comparison (the unit
tests hold both to the same costs), and `cheapest_group`, the choice a GPU replica with a cost line makes
(next_group with oldest_first=False).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_json
from embserve.engine.batching import cheapest_group, next_group

# (name, settings): a CPU replica's defaults, and a GPU replica's on a 24 GB+ card (tier 256 inputs, the
# MiniLM budget such a card gets, and a forward's fixed cost worth 512 or 8192 tokens; with tolerance
# 1.0 the cost alone decides, which makes the window of candidate starts the widest).
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("cpu", {"max_batch_tokens": 8192, "max_inputs": 32, "tolerance": 0.2, "group_cost_tokens": 32}),
    ("gpu", {"max_batch_tokens": 65536, "max_inputs": 256, "tolerance": 0.2, "group_cost_tokens": 512}),
    ("gpu_soft", {"max_batch_tokens": 65536, "max_inputs": 256, "tolerance": 1.0, "group_cost_tokens": 8192}),
)
WINDOWS = (64, 256, 512)


def plain_next_group(lengths: list[int], *, max_batch_tokens: int, max_inputs: int, tolerance: float,
                     group_cost_tokens: int) -> list[int]:
    """The planner before: for each group end, numpy over its window of starts (one Python step per input)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ordered = np.array([lengths[i] for i in order], dtype=np.int64)
    n = len(order)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        longest = int(ordered[j - 1])
        lo = int(np.searchsorted(ordered[:j], longest * (1.0 - tolerance), side="left"))
        lo = max(lo, j - min(max_inputs, max(1, max_batch_tokens // max(longest, 1))))
        costs = best[lo:j] + (j - np.arange(lo, j)) * longest + group_cost_tokens
        k = int(np.argmin(costs))
        best[j], start[j] = costs[k], lo + k
    j, groups = n, []
    while j > 0:
        i = int(start[j])
        groups.append([order[t] for t in range(i, j)])
        j = i
    return next(g for g in groups if 0 in g)


def token_lengths(n: int, seed: int) -> list[int]:
    """Token lengths of `n` mixed benchmark texts (queries, passages, long documents cut at the maximum)."""
    from transformers import AutoTokenizer

    from bench.corpus import load_or_build
    from embserve.engine.model import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("bundled"))
    texts = load_or_build(None).mixed(n, seed=seed)
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]


def best_ms(fn: Any, lengths: list[int], settings: dict[str, Any], repeats: int) -> float:
    fn(lengths, **settings)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(lengths, **settings)
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("build/bench-planner.json"))


def run(args: argparse.Namespace) -> None:
    pool = token_lengths(2048, seed=5)
    rng = random.Random(7)
    rows = []
    for name, settings in CASES:
        for n in WINDOWS:
            lengths = rng.sample(pool, n)
            row = {"case": name, "inputs": n, **settings,
                   "next_group_ms": best_ms(next_group, lengths, settings, args.repeats),
                   "cheapest_group_ms": best_ms(cheapest_group, lengths, settings, args.repeats),
                   "plain_dp_ms": best_ms(plain_next_group, lengths, settings, max(3, args.repeats // 4))}
            rows.append(row)
            print(f"{name:9s} {n:4d} inputs: next_group {row['next_group_ms']:7.3f} ms, "
                  f"cheapest_group {row['cheapest_group_ms']:7.3f} ms, plain DP {row['plain_dp_ms']:7.3f} ms",
                  flush=True)
    write_json(args.out, rows)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("planner", argv)


if __name__ == "__main__":
    raise SystemExit(main())
