"""A load generator for any OpenAI-compatible embeddings endpoint: closed loop (fixed concurrency) and open
loop (Poisson arrivals), one text or several per request.

One asyncio loop and one pool of keep-alive connections (bench/http_client.py, a minimal HTTP/1.1 client)
drive every simulated client. On a small box the generator shares the cores with the server it measures,
so its CPU is taken from the server's: at 32 clients of one short text against embserve it spends about
0.2 ms of CPU per request, where httpx.AsyncClient spent 3.3-6.5 ms (`python -m bench.client_cost`,
docs/benchmarks.md). The report still says next to every figure that the cores are shared.
Only requests that complete inside the measured window count; warm-up requests and those still in
flight when the window closes are awaited but not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from bench import http_client as http

# The server's own timing headers (embserve sets them; other servers simply do not).
TIMING_HEADERS = {"ingress_ms": "x-embserve-total-ms", "queue_ms": "x-embserve-queue-ms",
                  "tokenize_ms": "x-embserve-tokenize-ms", "forward_ms": "x-embserve-inference-ms"}

Hook = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Workload:
    """What the simulated clients send: texts drawn in a seeded order, `per_request` of them per call."""

    name: str
    texts: list[str]
    per_request: int = 1
    truncate: bool | None = None
    seed: int = 0

    def requests(self):
        """An endless, deterministic stream of inputs (a str, or a list when per_request > 1)."""
        rng = random.Random(self.seed)
        order = list(range(len(self.texts)))
        while True:
            rng.shuffle(order)
            for start in range(0, len(order) - self.per_request + 1, self.per_request):
                chunk = [self.texts[i] for i in order[start : start + self.per_request]]
                yield chunk[0] if self.per_request == 1 else chunk


@dataclass
class Sample:
    start: float
    end: float
    texts: int
    tokens: int
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadResult:
    """One measured point. Latencies are in milliseconds."""

    workload: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    window_s: float
    requests: int
    texts: int
    tokens: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    server_ms: dict[str, float]
    dropped: int = 0  # open loop: arrivals not sent because too many were outstanding
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.window_s if self.window_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.window_s if self.window_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out.update(texts_per_s=round(self.texts_per_s, 2), tokens_per_s=round(self.tokens_per_s, 1),
                   requests_per_s=round(self.requests_per_s, 2))
        return out

    def line(self) -> str:
        load = f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"
        lat = self.latency_ms
        return (f"{self.workload:<10} {load:<11} {self.texts_per_s:8.1f} texts/s {self.tokens_per_s:9.0f} tok/s  "
                f"p50 {lat.get('p50', float('nan')):7.1f}  p95 {lat.get('p95', float('nan')):7.1f}  "
                f"p99 {lat.get('p99', float('nan')):7.1f} ms  errors {self.error_count}")


def summarize(samples: list[Sample], window: tuple[float, float], workload: str, mode: str,
              concurrency: int | None = None, rate: float | None = None, dropped: int = 0) -> LoadResult:
    t0, t1 = window
    inside = [s for s in samples if t0 <= s.end <= t1]
    ok = [s for s in inside if s.error is None]
    errors: dict[str, int] = {}
    for s in inside:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    latency = np.array([(s.end - s.start) * 1000 for s in ok])
    pct = ({"p50": float(np.percentile(latency, 50)), "p95": float(np.percentile(latency, 95)),
            "p99": float(np.percentile(latency, 99)), "mean": float(latency.mean()),
            "max": float(latency.max())} if len(latency) else {})
    server = {}
    for key in TIMING_HEADERS:
        values = [s.timings[key] for s in ok if key in s.timings]
        if values:
            server[key] = float(np.mean(values))
    return LoadResult(workload=workload, mode=mode, concurrency=concurrency, rate=rate, window_s=t1 - t0,
                      requests=len(ok), texts=sum(s.texts for s in ok), tokens=sum(s.tokens for s in ok),
                      errors=errors, latency_ms={k: round(v, 2) for k, v in pct.items()},
                      server_ms={k: round(v, 2) for k, v in server.items()}, dropped=dropped)


class EmbeddingsClient:
    """One pooled HTTP client for `{base_url}/embeddings` (base_url as the OpenAI SDK takes it, e.g. .../v1).

    Transport errors come back as `bench.http_client.HTTPError` (from `get_json`/`post_json`, and as the error
    name in an `embed` Sample)."""

    def __init__(self, base_url: str, model: str, connections: int = 128, api_key: str | None = None,
                 encoding_format: str = "base64", timeout_s: float = 120.0) -> None:
        self.model = model
        self.encoding_format = encoding_format
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.http = http.Client(base_url, connections=connections, headers=headers, timeout_s=timeout_s)

    async def __aenter__(self) -> "EmbeddingsClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.http.aclose()

    async def embed(self, inputs: str | list[str], truncate: bool | None = None) -> Sample:
        body: dict[str, Any] = {"model": self.model, "input": inputs, "encoding_format": self.encoding_format}
        if truncate is not None:
            body["truncate"] = truncate
        n = 1 if isinstance(inputs, str) else len(inputs)
        start = time.perf_counter()
        try:
            response = await self.http.post("/embeddings", orjson.dumps(body))
        except http.HTTPError as exc:
            return Sample(start, time.perf_counter(), n, 0, error=type(exc).__name__)
        end = time.perf_counter()
        if response.status != 200:
            return Sample(start, end, n, 0, error=f"http_{response.status}")
        try:
            tokens = int(response.json().get("usage", {}).get("prompt_tokens", 0))
        except orjson.JSONDecodeError as exc:
            return Sample(start, end, n, 0, error=type(exc).__name__)
        timings = {}
        for key, header in TIMING_HEADERS.items():
            value = response.headers.get(header)
            if value is not None:
                timings[key] = float(value)
        return Sample(start, end, n, tokens, timings=timings)

    async def get_json(self, path: str) -> Any:
        return (await self.http.get(path)).raise_for_status().json()

    async def post_json(self, path: str, body: Any = None) -> Any:
        return (await self.http.post(path, orjson.dumps(body or {}))).raise_for_status().json()


async def _ticker(bar: Any, samples: list[Sample], stop: asyncio.Event, t_start: float) -> None:
    """Moves a tqdm bar once a second (cheaper than one update per request)."""
    shown = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        elapsed = int(time.perf_counter() - t_start)
        if elapsed > shown:
            bar.update(min(elapsed, bar.total) - shown)
            shown = min(elapsed, bar.total)
        done = len(samples)
        bar.set_postfix(req=done, err=sum(s.error is not None for s in samples[-200:]), refresh=False)


async def _window(warmup_s: float, duration_s: float, on_window_start: Hook | None,
                  on_window_end: Hook | None, t_start: float) -> tuple[float, float, Any, Any]:
    """Sleeps through warm-up and the window, calling the hooks at its edges (the load keeps running)."""
    await asyncio.sleep(max(0.0, t_start + warmup_s - time.perf_counter()))
    started = await on_window_start() if on_window_start else None
    t0 = time.perf_counter()
    await asyncio.sleep(duration_s)
    t1 = time.perf_counter()
    ended = await on_window_end() if on_window_end else None
    return t0, t1, started, ended


def _progress(desc: str | None, total_s: float):
    if desc is None:
        return None
    from tqdm import tqdm

    return tqdm(total=int(round(total_s)), desc=desc, unit="s", leave=False, dynamic_ncols=True)


async def closed_loop(client: EmbeddingsClient, workload: Workload, concurrency: int, duration_s: float,
                      warmup_s: float = 2.0, on_window_start: Hook | None = None,
                      on_window_end: Hook | None = None, progress: str | None = None) -> LoadResult:
    """`concurrency` clients, each sending its next request as soon as the last one answers."""
    stream = workload.requests()
    samples: list[Sample] = []
    stop = asyncio.Event()

    async def client_loop() -> None:
        while not stop.is_set():
            sample = await client.embed(next(stream), workload.truncate)
            samples.append(sample)
            if sample.error is not None and sample.error.startswith(("Connect", "http_5")):
                await asyncio.sleep(0.05)  # do not spin on a refused connection or a full queue

    t_start = time.perf_counter()
    bar = _progress(progress, warmup_s + duration_s)
    tasks = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
    ticker = asyncio.create_task(_ticker(bar, samples, stop, t_start)) if bar is not None else None
    try:
        t0, t1, _, ended = await _window(warmup_s, duration_s, on_window_start, on_window_end, t_start)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ticker is not None:
            await ticker
            bar.close()
    result = summarize(samples, (t0, t1), workload.name, "closed", concurrency=concurrency)
    result.extra["window_end"] = ended
    return result


async def open_loop(client: EmbeddingsClient, workload: Workload, rate: float, duration_s: float,
                    warmup_s: float = 2.0, max_outstanding: int = 512, seed: int = 0,
                    on_window_start: Hook | None = None, on_window_end: Hook | None = None,
                    progress: str | None = None) -> LoadResult:
    """Requests arrive as a Poisson process at `rate` per second, whether or not earlier ones answered."""
    stream = workload.requests()
    rng = random.Random(seed)
    samples: list[Sample] = []
    stop = asyncio.Event()
    outstanding: set[asyncio.Task] = set()
    dropped = 0

    async def one() -> None:
        samples.append(await client.embed(next(stream), workload.truncate))

    async def arrivals() -> None:
        nonlocal dropped
        next_at = time.perf_counter()
        while not stop.is_set():
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if len(outstanding) >= max_outstanding:
                dropped += 1
                continue
            task = asyncio.create_task(one())
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)

    t_start = time.perf_counter()
    bar = _progress(progress, warmup_s + duration_s)
    source = asyncio.create_task(arrivals())
    ticker = asyncio.create_task(_ticker(bar, samples, stop, t_start)) if bar is not None else None
    try:
        t0, t1, _, ended = await _window(warmup_s, duration_s, on_window_start, on_window_end, t_start)
    finally:
        stop.set()
        await asyncio.gather(source, return_exceptions=True)
        await asyncio.gather(*list(outstanding), return_exceptions=True)
        if ticker is not None:
            await ticker
            bar.close()
    result = summarize(samples, (t0, t1), workload.name, "open", rate=rate, dropped=dropped)
    result.extra["window_end"] = ended
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="as the OpenAI SDK takes it")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--kind", default="mixed", choices=("mixed", "queries", "passages", "documents"))
    parser.add_argument("--per-request", type=int, default=1, help="texts per request")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 32, 64])
    parser.add_argument("--rate", type=float, nargs="*", default=[], help="open loop: requests/s (Poisson)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truncate", action="store_true", help="send truncate=true (embserve extension)")
    parser.add_argument("--encoding-format", default="base64", choices=("base64", "float"))
    parser.add_argument("--json", action="store_true", help="print one JSON object per point")


def run(args: argparse.Namespace) -> None:
    from bench.corpus import load_or_build

    corpus = load_or_build(None, args.seed)
    texts = corpus.mixed(2000) if args.kind == "mixed" else corpus.kind(args.kind)
    workload = Workload(args.kind, texts, args.per_request, True if args.truncate else None, args.seed)
    points = [("closed", c) for c in args.concurrency] + [("open", r) for r in args.rate]

    async def go() -> None:
        most = max([c for m, c in points if m == "closed"] + [256])
        async with EmbeddingsClient(args.base_url, args.model, most + 8, args.api_key,
                                    args.encoding_format) as client:
            for mode, value in points:
                label = f"{mode} {value:g}"
                if mode == "closed":
                    result = await closed_loop(client, workload, int(value), args.duration, args.warmup,
                                               progress=label)
                else:
                    result = await open_loop(client, workload, value, args.duration, args.warmup,
                                             seed=args.seed, progress=label)
                print(json.dumps(result.to_dict()) if args.json else result.line(), flush=True)

    asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("load", argv)


if __name__ == "__main__":
    raise SystemExit(main())
