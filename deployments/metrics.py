"""The metrics actor (one per application, named, restarted by Ray if it dies) and the sources' shipper."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from embserve.metrics.prometheus import render
from embserve.metrics.stats import Accumulator, Aggregate, Event, process_memory

log = logging.getLogger("ray.serve")

NAMESPACE = "embserve"
FLUSH_INTERVAL_S = 0.5


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class MetricsActor:
    def __init__(self) -> None:
        self.aggregate = Aggregate()

    def record(self, source_id: str, kind: str, model: str | None, events: list[Event],
               gauges: dict[str, float] | None = None, memory: dict[str, Any] | None = None, *,
               profile: dict[str, Any] | None = None) -> None:
        self.aggregate.record(source_id, kind, model, events, gauges, memory, profile=profile)

    def ready(self) -> bool:
        """A cheap call that answers once the actor is up."""
        return True

    def snapshot(self) -> dict[str, Any]:
        return self.aggregate.snapshot()

    def prometheus(self) -> bytes:
        return render(self.aggregate)

    def reset(self) -> None:
        self.aggregate.reset()


def actor_name(app_name: str) -> str:
    return f"embserve-metrics-{app_name}"


def head_node_id() -> str | None:
    """The id of the cluster's head node (the one with Ray's head-node resource), None where none is alive."""
    return next((node["NodeID"] for node in ray.nodes()
                 if node["Alive"] and "node:__internal_head__" in node["Resources"]), None)


def get_metrics_actor(app_name: str):
    """The application's metrics actor, created on first use (detached: it outlives any one replica), on the
    head node where it can: wherever the first replica to start happened to run, it would keep an idle GPU
    node from being removed, and lose its figures when that node went."""
    try:
        return ray.get_actor(actor_name(app_name), namespace=NAMESPACE)
    except ValueError:  # not created yet: look for the head node only then
        pass
    head = head_node_id()
    placement = NodeAffinitySchedulingStrategy(head, soft=True) if head else "DEFAULT"
    return MetricsActor.options(
        name=actor_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        scheduling_strategy=placement,
    ).remote()


async def ensure_metrics_actor(app_name: str, timeout_s: float = 30.0) -> bool:
    """Get or create the application's metrics actor and wait until it answers, so that it exists as soon
    as the application is deployed. Replicas and the ingress await this in their (async) constructors.

    Returns whether the actor answered; a failure is logged, never raised: serving does not wait on the
    metrics actor, and the shippers look it up again on their next report.
    """
    try:
        await asyncio.wait_for(get_metrics_actor(app_name).ready.remote(), timeout_s)
        return True
    except Exception as exc:  # the metrics actor must never stop a replica from starting
        log.warning("metrics actor not up after %.0fs (%s: %s); replicas will retry when they report",
                    timeout_s, type(exc).__name__, exc)
        return False


class MetricsShipper:
    """Sends a source's events to the actor every FLUSH_INTERVAL_S, never on a request's path.

    A failed send drops those events and looks the actor up again next time: serving never waits on,
    or fails with, the metrics actor.

    `gauges` is a zero-argument callable returning the source's gauges, sent every report. `profile` (the
    replica's hardware profile) is a dict or a zero-argument callable returning one; it goes with every
    heartbeat (the memory report, every 4th tick), so that a restarted actor learns it again.
    """

    def __init__(self, app_name: str, source: Accumulator, gauges: Callable[[], dict[str, float]] | None = None,
                 profile: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> None:
        self.app_name = app_name
        self.source = source
        self.gauges = gauges
        self.profile = profile
        self._actor = None
        self._task: asyncio.Task | None = None
        self._ticks = 0

    def start(self) -> bool:
        """Start reporting on the running event loop; returns whether it is running.

        Call it from the replica's constructor: Serve runs constructors, sync or async, on the replica's
        event loop. Where no loop is running it does nothing and returns False, and a later call from a
        request starts it. Calling it again once started does nothing.
        """
        if self._task is not None and not self._task.done():
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._task = loop.create_task(self._loop())
        return True

    def _profile(self) -> dict[str, Any] | None:
        return self.profile() if callable(self.profile) else self.profile

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except Exception:  # a failing gauge or profile callable must not end reporting for good
                log.exception("metrics report failed; the next one goes on")

    async def flush(self) -> None:
        events = self.source.take()
        gauges = self.gauges() if self.gauges is not None else None
        self._ticks += 1
        # Memory every few seconds, which is also a heartbeat so that idle sources stay listed.
        memory = process_memory() if self._ticks % 4 == 1 else None
        profile = self._profile() if memory is not None else None
        if not events and memory is None and not gauges:
            return
        try:
            if self._actor is None:
                self._actor = get_metrics_actor(self.app_name)
            await self._actor.record.remote(self.source.source_id, self.source.kind, self.source.model,
                                            events, gauges, memory, profile=profile)
        except ray.exceptions.RayTaskError as exc:  # the actor is up but refused the report: a bug, say so
            log.error("metrics actor refused a report, which is dropped: %s", exc)
        except Exception as exc:  # the actor is down or restarting: drop these events, keep serving
            log.warning("metrics actor unreachable (%s); this report is dropped", type(exc).__name__)
            self._actor = None


class ReplicaRayMetrics:
    """A replica's forwards in Ray's own metrics pipeline (Prometheus via the Ray dashboard agent, Grafana),
    beside what the metrics actor aggregates."""

    def __init__(self, model: str) -> None:
        from ray.serve import metrics

        self.inputs = metrics.Counter("embserve_replica_inputs", "Inputs embedded by this replica.",
                                      tag_keys=("model",))
        self.padded = metrics.Counter("embserve_replica_padded_tokens", "Tokens sent to the model.",
                                      tag_keys=("model",))
        self.seconds = metrics.Histogram("embserve_replica_forward_seconds", "Forward time per batch.",
                                         boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
                                         tag_keys=("model",))
        for metric in (self.inputs, self.padded, self.seconds):
            metric.set_default_tags({"model": model})

    def forward(self, event: Any) -> None:
        """One forward's `embserve.metrics.events.Forward` report."""
        self.inputs.inc(event.inputs)
        self.padded.inc(event.padded_tokens)
        self.seconds.observe(event.seconds)
