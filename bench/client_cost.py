"""What the load generator's HTTP client costs in CPU per request: bench.http_client against httpx, closed
loop, on the same server.

By default the server is a stand-in (uvicorn in a subprocess answering every POST as embserve answers one
short text: a base64 row of 384 floats, usage and the x-embserve-* headers), so that the measurement needs
no Ray and the client is the only thing that differs; `--base-url` points both arms at a running server
instead, `--embserve` starts the shipped one (`embserve serve serve_config.yaml`). The CPU is this process's own (getrusage), over each measured window only.

    python -m bench client-cost                      # 3 rounds of both arms, 32 clients, 8 s each
    python -m bench client-cost --base-url http://127.0.0.1:8100/v1
    python -m bench client-cost --embserve           # embserve's shipped defaults (starts a Ray)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import orjson

from bench.load import TIMING_HEADERS, EmbeddingsClient, Sample, Workload, closed_loop

_ROW = base64.b64encode(np.random.default_rng(0).standard_normal(384, dtype=np.float32).tobytes()).decode()
_BODY = orjson.dumps({"object": "list", "data": [{"object": "embedding", "embedding": _ROW, "index": 0}],
                      "model": "all-MiniLM-L6-v2", "usage": {"prompt_tokens": 9, "total_tokens": 9}})
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())] + [
    (name.encode(), b"1.25") for name in TIMING_HEADERS.values()]


_DELAY_S = float(os.environ.get("BENCH_STAND_IN_DELAY_MS", "0")) / 1000


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The stand-in server (ASGI, no framework, so that it takes as little of the shared cores as it can)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    if _DELAY_S:
        await asyncio.sleep(_DELAY_S)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


class HttpxEmbeddingsClient(EmbeddingsClient):
    """The load generator's client as it was before bench.http_client: httpx.AsyncClient, the same calls."""

    def __init__(self, base_url: str, model: str, connections: int = 128) -> None:
        super().__init__(base_url, model, connections)
        self.httpx = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers={"content-type": "application/json"}, timeout=120.0,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    async def __aexit__(self, *exc: Any) -> None:
        await self.httpx.aclose()
        await super().__aexit__(*exc)

    async def embed(self, inputs: str | list[str], truncate: bool | None = None) -> Sample:
        body = {"model": self.model, "input": inputs, "encoding_format": self.encoding_format}
        n = 1 if isinstance(inputs, str) else len(inputs)
        start = time.perf_counter()
        try:
            response = await self.httpx.post("/embeddings", content=json.dumps(body))
        except httpx.HTTPError as exc:
            return Sample(start, time.perf_counter(), n, 0, error=type(exc).__name__)
        end = time.perf_counter()
        if response.status_code != 200:
            return Sample(start, end, n, 0, error=f"http_{response.status_code}")
        tokens = int(response.json().get("usage", {}).get("prompt_tokens", 0))
        timings = {k: float(response.headers[h]) for k, h in TIMING_HEADERS.items() if h in response.headers}
        return Sample(start, end, n, tokens, timings=timings)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(arm: str, base_url: str, model: str, workload: Workload, clients: int,
                  seconds: float) -> dict[str, Any]:
    """One closed-loop window; the client's CPU over that window divided by the requests it completed."""
    marks: dict[str, float] = {}

    async def start() -> None:
        marks["cpu"] = _cpu_s()

    async def end() -> None:
        marks["cpu"] = _cpu_s() - marks["cpu"]

    kind = HttpxEmbeddingsClient if arm == "httpx" else EmbeddingsClient
    async with kind(base_url, model, clients + 8) as client:
        result = await closed_loop(client, workload, clients, seconds, 2.0, on_window_start=start,
                                   on_window_end=end)
    return {"arm": arm, "requests": result.requests, "requests_per_s": round(result.requests_per_s, 1),
            "texts_per_s": round(result.texts_per_s, 1), "errors": result.errors, "latency_ms": result.latency_ms,
            "client_cpu_cores": round(marks["cpu"] / result.window_s, 3),
            "client_cpu_ms_per_request": round(1000 * marks["cpu"] / max(result.requests, 1), 3)}


def stand_in(port: int, delay_ms: float = 0.0) -> subprocess.Popen:
    """The stand-in server on `port`, answering each request after `delay_ms` (a server's own latency)."""
    env = {**os.environ, "BENCH_STAND_IN_DELAY_MS": str(delay_ms)}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.client_cost:app", "--port", str(port),
                               "--log-level", "warning", "--no-access-log", "--http", "httptools"], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the stand-in server did not start")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--base-url", default=None, help="a running server (default: start the stand-in)")
    where.add_argument("--embserve", action="store_true",
                       help="start the shipped service with `embserve serve`, as bench.soak does (it starts a Ray)")
    parser.add_argument("--port", type=int, default=8100, help="with --embserve")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=100.0,
                        help="the stand-in's latency per request (100 ms: about 300 requests/s at 32 clients)")


def run(args: argparse.Namespace) -> None:
    from bench.corpus import load_or_build
    from bench.service import Layout, embserve_serve
    from embserve.launch.ports import free_port

    workload = Workload("queries", load_or_build(None, 0).kind("queries"))
    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if args.embserve:
            base_url = stack.enter_context(embserve_serve(Layout(), args.port))
        elif base_url is None:
            port = free_port()
            server = stand_in(port, args.delay_ms)
            stack.callback(server.wait)
            stack.callback(server.terminate)
            base_url = f"http://127.0.0.1:{port}/v1"
        for round_ in range(args.rounds):
            for arm in ("httpx", "bench.http_client"):
                point = asyncio.run(measure(arm, base_url, args.model, workload, args.clients, args.seconds))
                print(json.dumps({"round": round_, **point}), flush=True)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("client-cost", argv)


if __name__ == "__main__":
    raise SystemExit(main())
