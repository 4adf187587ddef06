"""A simulated GPU for the replica's scheduler: a model whose forward costs a known time (2 ms fixed + 1 us per
padded token by default) on a device of its own, where queued forwards run one after another as on a CUDA
stream while the host goes on. It measures how busy the scheduler keeps a card, without a card:

    python -m bench simulated-gpu [--clients 256] [--seconds 5] [--out build/bench-simulated-gpu.json]

256 closed-loop clients of one text each, each text drawn at random from 2048 mixed texts, are admitted the
way a replica's @serve.batch does (whatever arrived since the last admission, up to admit_batch_size
inputs, in one call), and answered as soon as their own input is done. The clients send the texts' token
ids (an input OpenAI's API takes): the engine is what is measured, and the tokenizer costs ~0.4 ms a mixed
text on one core, more than the simulated card takes for it (`--raw-texts` sends the texts instead).
Reported: the device's busy share over the run, texts/s, and their ratio to the offline limit (the same
texts sorted by length and queued back to back in groups of max_batch_size, the best of 3 passes); and for
both, the device's time per text split into its line's fixed and per-token parts, its time beyond the line
and its idle time (`per_input`), so that a gap to the limit shows where it comes from.
The scheduler gets the device's cost line as a GPU replica's warm-up measures it: the line through two timed
forwards, one of 1 x 8 tokens and one of max_batch_size x 128 (`--no-cost-line`: none, so the pipelined
worker takes each next group at once, as it did before it had one).
The unit tests (tests/unit/test_scheduler.py) use the same device, without timing thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_json

DIM = 4


class SimulatedGpu:
    """A "model" for embserve.engine.scheduler.Scheduler: the bundled model's tokenizer, and forwards that take
    `fixed_s + per_token_s x padded tokens` on one device thread. `launch` queues a forward and returns at
    once (embserve.engine.gpu_pipeline.Launcher); `forward` waits for it. Each vector names its input (length,
    first and last token) so that a test can tell whose it is. `gate`, where given, holds every forward
    until it is set."""

    device = "simulated"

    def __init__(self, fixed_s: float = 0.002, per_token_s: float = 1e-6, gate: threading.Event | None = None,
                 max_length: int = 256) -> None:
        from transformers import AutoTokenizer

        from embserve.api.contracts import ModelInfo
        from embserve.engine.model import resolve_source

        self.fixed_s, self.per_token_s, self.gate = fixed_s, per_token_s, gate
        self.max_length = max_length
        self._hf = AutoTokenizer.from_pretrained(resolve_source("bundled"))
        self.info = ModelInfo(name="simulated", aliases=(), dimensions=4, max_length=max_length,
                              vocab_size=len(self._hf), pooling="none", device=self.device, dtype="float32")
        self._device = ThreadPoolExecutor(1, thread_name_prefix="simulated-gpu")
        self._lock = threading.Lock()
        self.launches: list[tuple[float, int]] = []  # (when, inputs), in launch order
        self.runs: list[tuple[float, float, int]] = []  # (start, end, inputs) on the device, in run order

    def request_tokenizer(self) -> Any:
        from embserve.engine.tokenize import Tokenizer

        return Tokenizer(self._hf, self.max_length, len(self._hf))

    def launch(self, sequences: list[list[int]]) -> Future:
        with self._lock:
            self.launches.append((time.perf_counter(), len(sequences)))
        return _Pending(self._device.submit(self._compute, [list(s) for s in sequences]))

    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        return self.launch(sequences).result()

    def _compute(self, sequences: list[list[int]]) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait()
        start = time.perf_counter()
        padded = len(sequences) * max(map(len, sequences))
        time.sleep(self.fixed_s + self.per_token_s * padded)
        vectors = np.array([[len(s), s[0], s[-1], 1.0] for s in sequences], dtype=np.float32)
        with self._lock:
            self.runs.append((start, time.perf_counter(), len(sequences)))
        return vectors

    def busy_share(self, since: float, until: float) -> float:
        """The share of [since, until] the device spent computing."""
        with self._lock:
            busy = sum(max(0.0, min(end, until) - max(start, since)) for start, end, _ in self.runs)
        return busy / (until - since)

    def close(self) -> None:
        self._device.shutdown(wait=True)


class _Pending:
    def __init__(self, future: Future) -> None:
        self.future = future

    def result(self) -> np.ndarray:
        return self.future.result()


def measured_cost(device: SimulatedGpu, max_batch_size: int) -> Any:
    """The device's cost line, fitted as embserve.engine.warmup does on a card: a lone short input and a full group
    at a mid length, each timed once warm."""
    from embserve.engine.forward_cost import fit_forward_cost

    timings = []
    for inputs, length in ((1, 8), (max_batch_size, 128)):
        group = [[1] * length] * inputs
        device.forward(group)
        t0 = time.perf_counter()
        device.forward(group)
        timings.append((inputs * length, time.perf_counter() - t0))
    return fit_forward_cost(timings)


def offline_limit(device: SimulatedGpu, ids: list[list[int]], group: int,
                  passes: int = 3) -> tuple[float, dict[str, float]]:
    """Texts/s with every text known at once: sorted by length, queued back to back in groups of `group`,
    the best of `passes` (a limit: a pass that met other work on the host is not it); and what its
    forwards held and cost per input (`per_input`)."""
    ordered = sorted(ids, key=len)
    groups = [ordered[i:i + group] for i in range(0, len(ordered), group)]
    best = (0.0, 0.0)
    for _ in range(passes):
        t0 = time.perf_counter()
        pending = [device.launch(g) for g in groups]
        for p in pending:
            p.result()
        t1 = time.perf_counter()
        best = max(best, (len(ordered) / (t1 - t0), device.busy_share(t0, t1)))
    padded = sum(len(g) * len(g[-1]) for g in groups)
    return best[0], per_input(len(ordered), len(groups), padded, sum(map(len, ordered)), device, *best)


def per_input(inputs: int, forwards: int, padded: int, tokens: int, device: SimulatedGpu, texts_per_s: float,
              busy: float) -> dict[str, float]:
    """What a run's forwards held per input, and the device's time per text it served, split: the fixed
    part of its line (forwards per input), the per-token part (padded tokens per input), the device's time
    beyond its line (sleep's overshoot: the device thread woken late on a busy host) and its idle time.
    The four add up to 1 / texts_per_s; the difference between a served run and the offline one is the gap
    to the limit, part by part."""
    us = 1e6 / texts_per_s
    fixed = device.fixed_s * 1e6 * forwards / inputs
    token = device.per_token_s * 1e6 * padded / inputs
    return {"inputs_per_forward": round(inputs / forwards, 1), "tokens_per_input": round(tokens / inputs, 1),
            "padded_tokens_per_input": round(padded / inputs, 1), "fixed_us_per_input": round(fixed, 1),
            "token_us_per_input": round(token, 1), "overshoot_us_per_input": round(busy * us - fixed - token, 1),
            "idle_us_per_input": round((1 - busy) * us, 1)}


async def closed_loop(scheduler: Any, texts: list[Any], clients: int, seconds: float,
                      admit_size: int) -> dict[str, Any]:
    """`clients` callers of one text (a string, or its token ids) each; an admitter hands what arrived to the
    scheduler in one call, as @serve.batch does."""
    from embserve.api.contracts import EmbedJob

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def admitter() -> None:
        while True:
            jobs = [await queue.get()]
            while not queue.empty() and len(jobs) < admit_size:
                jobs.append(queue.get_nowait())
            scheduler.admit([job for job, _ in jobs],
                            [lambda r, f=f: loop.call_soon_threadsafe(f.set_result, r) for _, f in jobs])

    async def client(k: int) -> None:
        # Each text drawn at random, not a fixed cycle of the client's own: with a cycle, clients whose few
        # texts are short would come back more often whenever short texts are served first, and texts/s would
        # reward a planner for serving short texts rather than for padding less.
        draw = random.Random(k)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            future = loop.create_future()
            text = texts[draw.randrange(len(texts))]
            job = EmbedJob(texts=[text], truncate=True) if isinstance(text, str) else EmbedJob(token_ids=[text], truncate=True)
            queue.put_nowait((job, future))
            result = await future
            assert result.error is None, result.error
            latencies.append(time.perf_counter() - t0)

    task = asyncio.create_task(admitter())
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    task.cancel()
    ms = sorted(x * 1000 for x in latencies)
    return {"clients": clients, "seconds": round(elapsed, 2), "texts": len(ms),
            "texts_per_s": round(len(ms) / elapsed, 1), "p50_ms": round(ms[len(ms) // 2], 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from bench.corpus import load_or_build
    from embserve.engine.scheduler import ForwardLayout, Scheduler
    from embserve.metrics.events import Forward
    from embserve.settings import BatchingConfig

    device = SimulatedGpu(args.fixed_ms / 1000, args.per_token_us / 1e6)
    cfg = BatchingConfig(max_batch_size=args.max_batch_size, max_batch_tokens=args.budget,
                         group_cost_tokens=round(args.fixed_ms * 1000 / args.per_token_us))
    seen: list[Any] = []
    cost = None if args.no_cost_line else measured_cost(device, args.max_batch_size)
    scheduler = Scheduler(device, ForwardLayout(1, 1), config=lambda: cfg, max_batch_tokens=args.budget,
                          report=seen.append, tolerance_wall=False, pipelined=not args.serial, forward_cost=cost)
    texts = load_or_build(None).mixed(args.texts, seed=3)
    tokenizer = scheduler.tokenizer
    ids = [tokenizer.finish(c, i, True) for i, c in enumerate(tokenizer.content_ids(texts))]
    limit, offline = offline_limit(device, ids, args.max_batch_size)
    # What a client sends: the ids without the special tokens the replica adds itself.
    inputs: list[Any] = texts if args.raw_texts else [list(ids) for ids in tokenizer.content_ids(texts)]
    asyncio.run(closed_loop(scheduler, inputs, args.clients, 1.0, args.max_batch_size))  # warm
    first = len(seen)
    t0 = time.perf_counter()
    point = asyncio.run(closed_loop(scheduler, inputs, args.clients, args.seconds, args.max_batch_size))
    t1 = time.perf_counter()
    forwards = [f for f in seen[first:] if isinstance(f, Forward)]
    scheduler.close()
    device.close()
    busy = device.busy_share(t0 + 0.2, t1 - 0.2)
    served = per_input(sum(f.inputs for f in forwards), len(forwards), sum(f.padded_tokens for f in forwards),
                       sum(f.tokens for f in forwards), device, point["texts_per_s"], busy) if forwards else {}
    point.update(busy_share=round(busy, 3),
                 offline_texts_per_s=round(limit, 1), ratio_to_offline=round(point["texts_per_s"] / limit, 3),
                 inputs_per_forward=round(statistics.fmean(f.inputs for f in forwards), 1) if forwards else 0.0,
                 forwards=len(forwards), served=served, offline=offline, pipelined=not args.serial,
                 cost_line=cost.describe() if cost is not None else None, raw_texts=args.raw_texts,
                 fixed_ms=args.fixed_ms, per_token_us=args.per_token_us, max_batch_size=args.max_batch_size,
                 budget=args.budget)
    return point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--fixed-ms", type=float, default=2.0)
    parser.add_argument("--per-token-us", type=float, default=1.0)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--budget", type=int, default=65536, help="max_batch_tokens")
    parser.add_argument("--serial", action="store_true", help="the one-group-at-a-time worker, for comparison")
    parser.add_argument("--no-cost-line", action="store_true",
                        help="give the scheduler no cost line: the next group is taken at once, not just in time")
    parser.add_argument("--raw-texts", action="store_true", help="send texts, tokenized by the scheduler")
    parser.add_argument("--out", type=Path, default=Path("build/bench-simulated-gpu.json"))


def run(args: argparse.Namespace) -> None:
    point = measure(args)
    print(json.dumps(point, indent=1))
    write_json(args.out, point)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("simulated-gpu", argv)


if __name__ == "__main__":
    raise SystemExit(main())
