"""Measured points against a running server: the run modes, a closed or open loop per point with
/v1/performance and per-process CPU read over its window, and a one-line description of a point."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from bench import procs
from bench.common import MODEL
from bench.load import EmbeddingsClient, LoadResult, Workload, closed_loop, open_loop


@dataclass(frozen=True)
class Mode:
    """How long and how much a run measures."""

    name: str
    concurrencies: tuple[int, ...]
    duration_s: float
    warmup_s: float
    sweep: tuple[int, ...]  # max_batch_size values, full engine at SWEEP_CONCURRENCY
    offline_texts: int
    offline_batch_sizes: tuple[int, ...]
    offline_rounds: int  # passes over every (batch size, threads) pair; the best of each counts
    extras: bool  # multi-text, open loop and long documents
    profile_s: float  # 0: no py-spy
    torch_threads: int | None = None  # None: the shipped default (every core the replica sees)
    only: tuple[str, ...] | None = None  # bench.run's configurations to serve (None: all)

    def served(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """A configuration's Settings: the shipped defaults, with `overrides` and any --torch-threads."""
        return {**({"torch_threads": self.torch_threads} if self.torch_threads else {}), **overrides}


# Each configuration is an `embserve serve` of its own (about a minute to start on 2 cores): a smoke run serves
# the two that the headline compares, and no sweep.
QUICK = Mode("quick", (1, 32), 3.0, 1.0, (), 128, (32,), 1, extras=False, profile_s=0,
             only=("batching off", "full engine"))
FULL = Mode("full", (1, 4, 16, 32, 64), 8.0, 2.0, (1, 2, 4, 8, 16, 32, 64, 128), 256, (8, 32, 128), 2,
            extras=True, profile_s=12)


def perf_summary(perf: dict[str, Any] | None) -> dict[str, Any]:
    """What the server says about the window: padding and batch sizes (from GET /v1/performance)."""
    if not perf:
        return {}
    totals = perf.get("totals", {})
    batches, forwards = totals.get("batches") or 0, totals.get("forwards") or 0
    return {
        "padding_efficiency": perf.get("padding_efficiency"),
        "inputs": totals.get("inputs"), "batches": batches, "forwards": forwards,
        "inputs_per_batch": round(totals["inputs"] / batches, 2) if batches else None,
        "inputs_per_forward": round(totals["inputs"] / forwards, 2) if forwards else None,
        "forward_ms_p50": perf.get("latency_ms", {}).get("forward", {}).get("p50"),
        "queue_ms_p50": perf.get("latency_ms", {}).get("queue", {}).get("p50"),
        "server_errors": totals.get("errors"),
    }


class Bench:
    """Runs points against the deployed app; each point resets and reads /v1/performance at its window."""

    def __init__(self, base_url: str, mode: Mode, progress: bool, gate: procs.QuietGate) -> None:
        self.base_url = base_url
        self.mode = mode
        self.progress = progress
        self.gate = gate

    async def _point(self, workload: Workload, concurrency: int | None = None, rate: float | None = None,
                     label: str = "", duration_s: float | None = None, window_hooks: Any = None) -> dict[str, Any]:
        duration = duration_s or self.mode.duration_s
        snapshots: dict[str, Any] = {}
        async with EmbeddingsClient(self.base_url, MODEL, connections=(concurrency or 256) + 8) as client:
            async def start() -> None:
                await client.post_json("/performance/reset")
                snapshots["cpu"] = procs.cpu_snapshot()
                if window_hooks:
                    await window_hooks[0]()

            async def end() -> Any:
                cpu = procs.cpu_usage(snapshots["cpu"], procs.cpu_snapshot())
                snapshots["usage"] = cpu
                if window_hooks:
                    await window_hooks[1]()
                return await client.get_json("/performance")

            bar = label if self.progress else None
            if rate is None:
                result: LoadResult = await closed_loop(client, workload, concurrency, duration, self.mode.warmup_s,
                                                       on_window_start=start, on_window_end=end, progress=bar)
            else:
                result = await open_loop(client, workload, rate, duration, self.mode.warmup_s,
                                         on_window_start=start, on_window_end=end, progress=bar)
        point = result.to_dict()
        point["perf"] = perf_summary(point["extra"].pop("window_end", None))
        point["cpu"] = snapshots["usage"].to_dict() if "usage" in snapshots else None
        point.pop("extra", None)
        return point

    def point(self, workload: Workload, **kwargs: Any) -> dict[str, Any]:
        waited = self.gate.wait()
        point = asyncio.run(self._point(workload, **kwargs))
        point["waited_for_quiet_s"] = waited
        return point

    def warm(self, workload: Workload) -> None:
        """Unmeasured traffic right after a deploy: first forwards, connections, code paths."""
        async def go() -> None:
            async with EmbeddingsClient(self.base_url, MODEL, connections=24) as client:
                await closed_loop(client, workload, 16, 2.0, warmup_s=0.0)
        asyncio.run(go())


def describe_point(name: str, point: dict[str, Any], limit: float | None) -> str:
    """One line for the console: throughput, its ratio to `limit`, latency, padding, errors, other load."""
    lat = point["latency_ms"]
    load = f"c={point['concurrency']}" if point["mode"] == "closed" else f"{point['rate']:.1f} req/s"
    ratio = f"{point['texts_per_s'] / limit:5.2f}x offline" if limit else ""
    perf = point.get("perf") or {}
    pad = perf.get("padding_efficiency")
    cpu = point.get("cpu") or {}
    return (f"  {name:<22} {point['workload']:<9} {load:<13} {point['texts_per_s']:7.1f} texts/s {ratio}  "
            f"p50 {lat.get('p50', float('nan')):7.1f} p99 {lat.get('p99', float('nan')):7.1f} ms  "
            f"pad {pad if pad is not None else '-'}  in/fwd {perf.get('inputs_per_forward', '-')}  "
            f"err {sum(point['errors'].values())}  other load {cpu.get('foreign', 0):.2f} cores")


def measure_variant(bench: Bench, workloads: dict[str, Workload], label: str) -> dict[str, Any]:
    """What bench.ab and the studies compare: after a warm-up, 32 single-text clients of the mixed texts
    ("c32"), then one client of short queries ("single_query"), the latency a lone user sees."""
    bench.warm(workloads["mixed"])
    loaded = bench.point(workloads["mixed"], concurrency=32, label=f"{label[:30]} c=32")
    lone = bench.point(workloads["queries"], concurrency=1, label=f"{label[:30]} queries c=1")
    print(describe_point(label[:22], loaded, None), flush=True)
    print(describe_point(label[:22], lone, None), flush=True)
    return {"c32": loaded, "single_query": lone}
