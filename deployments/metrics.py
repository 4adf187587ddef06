"""The metrics actor (one per application, named, restarted by Ray if it dies) and the sources' shipper."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from embserve.prometheus import render
from embserve.stats import Accumulator, Aggregate, Event, process_memory

log = logging.getLogger("ray.serve")

NAMESPACE = "embserve"
FLUSH_INTERVAL_S = 0.5


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class MetricsActor:
    def __init__(self) -> None:
        self.aggregate = Aggregate()

    def record(self, source_id: str, kind: str, model: str | None, events: list[Event],
               gauges: dict[str, float] | None = None, memory: dict[str, Any] | None = None) -> None:
        self.aggregate.record(source_id, kind, model, events, gauges, memory)

    def snapshot(self) -> dict[str, Any]:
        return self.aggregate.snapshot()

    def prometheus(self) -> bytes:
        return render(self.aggregate)

    def reset(self) -> None:
        self.aggregate.reset()


def actor_name(app_name: str) -> str:
    return f"embserve-metrics-{app_name}"


def get_metrics_actor(app_name: str):
    """The application's metrics actor, created on first use (detached: it outlives any one replica)."""
    return MetricsActor.options(
        name=actor_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


class MetricsShipper:
    """Sends a source's events to the actor every FLUSH_INTERVAL_S, never on a request's path.

    A failed send drops those events and looks the actor up again next time: serving never waits on,
    or fails with, the metrics actor.
    """

    def __init__(self, app_name: str, source: Accumulator, gauges: Any = None) -> None:
        self.app_name = app_name
        self.source = source
        self.gauges = gauges
        self._actor = None
        self._task: asyncio.Task | None = None
        self._ticks = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()

    async def flush(self) -> None:
        events = self.source.take()
        gauges = self.gauges() if self.gauges is not None else None
        self._ticks += 1
        # Memory every few seconds, which is also a heartbeat so that idle sources stay listed.
        memory = process_memory() if self._ticks % 4 == 1 else None
        if not events and memory is None and not gauges:
            return
        try:
            if self._actor is None:
                self._actor = get_metrics_actor(self.app_name)
            await self._actor.record.remote(self.source.source_id, self.source.kind, self.source.model,
                                            events, gauges, memory)
        except Exception as exc:  # the actor is down or restarting: drop these events, keep serving
            log.warning("metrics actor unreachable (%s); this report is dropped", type(exc).__name__)
            self._actor = None
