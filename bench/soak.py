"""A soak: the shipped service (`embserve serve serve_config.yaml`) under a steady closed loop, with the
replica's memory sampled as it goes. A replica whose memory keeps growing under steady load leaks; one that levels off
after warm-up does not.

    python -m bench soak --minutes 10 --clients 16      # the replica's RSS every 10 s, growth from minute 2

It prints the growth between `--from-minute` (after warm-up) and the end, and writes build/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.common import MODEL, ROOT, offline_env, stop_on_signals, write_json
from bench.corpus import load_or_build
from bench.load import EmbeddingsClient, Workload, closed_loop
from bench.service import DEFAULT_CONFIG, Layout, embserve_serve


def replica_rss() -> int:
    """Resident bytes of this benchmark's embedding replica(s)."""
    total = 0
    for pid, role in procs.descendants().items():
        if role == "replica":
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
    return total


async def soak(base_url: str, texts: list[str], clients: int, seconds: float, every_s: float) -> dict[str, Any]:
    client = EmbeddingsClient(base_url, MODEL)
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()

    async def sampler() -> None:
        while True:
            samples.append((round(time.monotonic() - t0, 1), replica_rss()))
            await asyncio.sleep(every_s)

    task = asyncio.create_task(sampler())
    result = await closed_loop(client, Workload("mixed", texts), clients, seconds, warmup_s=0.0)
    task.cancel()
    samples.append((round(time.monotonic() - t0, 1), replica_rss()))
    return {"texts_per_s": round(result.texts_per_s, 1), "errors": result.errors, "rss": samples}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--from-minute", type=float, default=2.0, help="growth is measured from here")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "soak.json")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the serve config (default: the "
                        "checkout's serve_config.yaml)")


def run(args: argparse.Namespace) -> None:
    offline_env()
    stop_on_signals()
    texts = load_or_build(None, 0).mixed(2000, 0)
    with embserve_serve(Layout(config=args.config.resolve()), args.port) as base_url:
        report = asyncio.run(soak(base_url, texts, args.clients, args.minutes * 60, args.every))
    rss = report["rss"]
    start = min(rss, key=lambda s: abs(s[0] - args.from_minute * 60))
    growth = (rss[-1][1] - start[1]) / start[1] if start[1] else float("nan")
    # RSS saws up and down by a few percent as the allocator takes and returns memory: compare the means
    # of the first and last two minutes after warm-up too, which a single low or high sample cannot sway.
    first = [v for t, v in rss if start[0] <= t < start[0] + 120]
    last = [v for t, v in rss if t >= rss[-1][0] - 120]
    window_growth = (sum(last) / len(last)) / (sum(first) / len(first)) - 1 if first and last else float("nan")
    report.update(clients=args.clients, minutes=args.minutes, from_s=start[0], growth=round(growth, 4),
                  window_growth=round(window_growth, 4))
    write_json(args.out, report)
    print(f"replica RSS {start[1] / 2**20:.0f} MiB at {start[0]:.0f} s -> {rss[-1][1] / 2**20:.0f} MiB at "
          f"{rss[-1][0]:.0f} s: {growth * 100:+.1f}%; mean of the last two minutes against the two after "
          f"warm-up: {window_growth * 100:+.1f}% ({len(rss)} samples; {args.out})")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("soak", argv)


if __name__ == "__main__":
    raise SystemExit(main())
