"""The model replica (an embedding model, or a reranker's cross-encoder): owns one model and its scheduler;
@serve.batch admits requests into it."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from deployments.metrics import MetricsShipper, ReplicaRayMetrics
from embserve.api.calls import capacity_of, room_for
from embserve.api.contracts import EmbedJob, EmbedResult, ModelInfo
from embserve.api.errors import Overloaded
from embserve.engine.hardware import assigned_gpu_share, assigned_gpus, start_replica
from embserve.engine.layout import EMBEDDER_MIN_ONGOING_REQUESTS
from embserve.engine.scheduler import HELPER_THREAD, LOOP_THREAD, Arrival, Scheduler, name_os_thread
from embserve.launch import serve_env
from embserve.metrics.events import Forward
from embserve.metrics.stats import ReplicaReporter
from embserve.settings import ModelSpec, Settings

log = logging.getLogger("ray.serve")


# Admissions with more text than this are tokenized on a thread, so that the replica's loop (health checks,
# other admissions) never waits for one; smaller ones, about a millisecond, are tokenized in place.
INLINE_CHARS = 20_000


def _settle(future: asyncio.Future, result: EmbedResult) -> None:
    if not future.done():  # cancelled: its caller went away
        future.set_result(result)


def _futures_for(arrivals: list[Arrival]) -> tuple[list[asyncio.Future], list[Callable[[EmbedResult], None]]]:
    """A future on the running loop for each arrival's answer, and the reply that settles it from any thread."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in arrivals]
    return futures, [lambda result, f=f: loop.call_soon_threadsafe(_settle, f, result) for f in futures]


def count_inputs(arrivals: list[Arrival]) -> int:
    """An admission's size counts inputs, not requests (Ray's batch_size_fn)."""
    return sum(arrival.weight for arrival in arrivals)


# The builder gives each embedder its options (embserve.engine.layout.embedder_options); these are the floor.
@serve.deployment(max_ongoing_requests=EMBEDDER_MIN_ONGOING_REQUESTS, graceful_shutdown_timeout_s=30)
class Embedder:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.settings = settings
        start = start_replica(spec, settings, torch.cuda.is_available(), assigned_gpus(), assigned_gpu_share())
        self.model, self.layout, self.profile = start.model, start.layout, start.profile
        self.batching = settings.batching(start.batch_size, start.batch_tokens)
        self.reporter = ReplicaReporter(spec.name)
        self.ray_metrics = ReplicaRayMetrics(spec.name)
        self.scheduler = Scheduler(self.model, self.layout, config=lambda: self.batching,
                                   max_batch_tokens=start.batch_tokens, report=self._report,
                                   group_cost_tokens=start.group_cost_tokens, tolerance_wall=start.tolerance_wall,
                                   forward_cost=start.forward_cost)
        self._apply_batching()
        self._ongoing = 0
        self.shared = {"calls": 0, "requests": 0}  # shared calls from the ingress (embed_many), since the start
        self.lone_admissions = 0  # requests admitted alone, without Serve's batcher (_alone), since the start
        self.shipper = MetricsShipper(serve.get_replica_context().app_name, self.reporter,
                                      gauges=lambda: {"queue_size": self._ongoing}, profile=self.profile.as_dict)
        self.shipper.start()  # Serve runs constructors on the replica's loop
        for warning in start.warnings:
            log.warning(warning)
        if start.warm_up is not None:
            log.info("warm-up: %d forwards of shapes %s in %.2f s", len(start.warm_up.shapes),
                     list(start.warm_up.shapes), start.warm_up.seconds)
        log.info("embedder %s ready (max_length=%d): %s", spec.name, self.model.max_length, self.profile.summary())
        serve_env.flush_warnings_at_once()  # the line above, and warnings from now on, reach the log at once
        # Serve runs the constructor on the loop that runs this replica's methods: named last (a new thread
        # takes its creator's name), so that /proc and py-spy tell it from the runtime's threads (bench.procs
        # splits the replica's CPU by thread); the loop's own helper threads are named apart.
        self._helpers = ThreadPoolExecutor(thread_name_prefix=HELPER_THREAD,
                                           initializer=lambda: name_os_thread(threading.current_thread().name))
        name_os_thread(LOOP_THREAD)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and whenever serve_config.yaml's user_config changes."""
        self.batching = self.batching.updated(user_config)
        if "length_group_tolerance" in (user_config or {}):  # named: a wall again, as on a CPU
            self.scheduler.tolerance_wall = True
        self._apply_batching()
        for warning in self.profile.retuned(self.settings, user_config or {}, self.batching.model_dump()):
            log.warning(warning)
        log.info("embedder re-tuned by user_config: %s", self.profile.summary())
        serve_env.flush_warnings_at_once()

    def _apply_batching(self) -> None:
        self._admit.set_max_batch_size(self.batching.effective_admit_batch_size)
        self._admit.set_batch_wait_timeout_s(self.batching.effective_wait_s)

    def info(self) -> ModelInfo:
        return self.model.info

    def describe(self) -> dict[str, Any]:
        """This replica's process, live batching settings (what reconfigure last applied) and thread layout;
        `threads_per_forward` lists what the forward threads read back after setting it; the queue as it is now
        (`pending_inputs`), the requests admitted since the start (`admitted_requests`), of them those admitted
        alone without Serve's batcher (`lone_admissions`), and the shared calls from the ingress and the requests
        they carried (`shared_calls`)."""
        return {"pid": os.getpid(), "replica": serve.get_replica_context().replica_id.unique_id,
                "model": self.model.info.name, "batching": self.batching.model_dump(),
                "effective_wait_s": self.batching.effective_wait_s,
                "effective_admit_batch_size": self.batching.effective_admit_batch_size,
                "torch_threads": self.layout.threads, "forward_workers": self.layout.workers,
                "threads_per_forward": sorted(self.scheduler.threads_seen),
                "pending_inputs": self.scheduler.pending,
                "admitted_requests": self.scheduler.admitted, "lone_admissions": self.lone_admissions,
                "shared_calls": dict(self.shared),
                "profile": self.profile.as_dict()}

    async def check_health(self) -> None:
        """Serve's health check: the model must answer a one-token forward, on a thread of its own, so that
        it never waits behind the queue or a long forward."""
        await self._on_helper(self.model.forward, [[0]])

    async def _on_helper(self, fn: Callable[..., Any], *args: Any) -> Any:
        """asyncio.to_thread on the replica's named helper threads (the request's context goes with it)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._helpers, context.run, fn, *args)

    def shares_calls(self) -> bool:
        """Whether the ingress may send this deployment's requests in shared calls (embserve.api.calls): only where
        no Serve autoscaler reads its ongoing requests, which would count a shared call once. False where the
        deployment's config cannot be read."""
        return self._limits()[0]

    def _limits(self) -> tuple[bool, int | None]:
        config = getattr(serve.get_replica_context(), "_deployment_config", None)
        if config is None:
            return False, None
        return config.autoscaling_config is None, capacity_of(config.max_ongoing_requests, config.max_queued_requests)

    async def embed_many(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        """The requests of one shared call, each admitted as if it had come alone. What this replica holds stays
        within Serve's bounds counted in requests: beyond them the rest get the 503 that Serve's own refusal
        gives."""
        self.shared["calls"] += 1
        self.shared["requests"] += len(jobs)
        room = room_for(self._limits()[1], self._ongoing, len(jobs))
        self._ongoing += room  # at once, so that a call arriving meanwhile counts these too
        try:
            results = list(await asyncio.gather(*(self._answer(job) for job in jobs[:room])))
        finally:
            self._ongoing -= room
        refused = EmbedResult(None, error=Overloaded("the embedding replicas' queues are full; retry shortly"))
        return results + [refused] * (len(jobs) - room)

    async def embed(self, job: EmbedJob) -> EmbedResult:
        self._ongoing += 1
        try:
            return await self._answer(job)
        finally:
            self._ongoing -= 1

    async def _answer(self, job: EmbedJob) -> EmbedResult:
        # A request larger than a batch still fits one: it counts as a full batch.
        arrival = Arrival(job, weight=max(1, min(len(job), self.batching.effective_admit_batch_size)),
                          received=time.perf_counter())
        try:
            if self._alone(arrival):
                # Serve's batcher would form an admission of this request alone: it is admitted here, without
                # the batcher's hand-off, which cost a lone query 0.45 ms (docs/benchmarks.md).
                self.lone_admissions += 1
                (future,), replies = _futures_for([arrival])
                self.scheduler.admit([arrival], replies)
            else:
                future = await self._admit(arrival)
            result = await future
        except asyncio.CancelledError:
            arrival.cancelled = True  # its inputs still queued are dropped, never computed
            raise
        if result.error is not None:  # Serve's request context puts the request's id in the line
            log.info("answered %s: %s", type(result.error).__name__, result.error.message)
        return result

    def _alone(self, arrival: Arrival) -> bool:
        """Whether `arrival` is the only request this replica holds (nothing else pending, computing or waiting
        for an admission), admissions do not wait for company (max_wait_time_ms 0), and it is small enough to
        tokenize on the loop."""
        return self._ongoing == 1 and not self.batching.effective_wait_s and arrival.job.chars <= INLINE_CHARS

    # Ray forms admissions (admit_batch_size inputs, batch_wait_timeout_s); each request gets a future of its own
    # at once, so a batch never holds its requests back and Ray forms the next batch while these compute.
    # Its size and wait come from the settings at start and on every user_config (_apply_batching).
    @serve.batch(batch_size_fn=count_inputs)
    async def _admit(self, arrivals: list[Arrival]) -> list[asyncio.Future]:
        futures, replies = _futures_for(arrivals)
        if sum(arrival.job.chars for arrival in arrivals) > INLINE_CHARS:
            await self._on_helper(self.scheduler.admit, arrivals, replies)
        else:
            self.scheduler.admit(arrivals, replies)
        return futures

    def _report(self, event: object) -> None:
        """The scheduler's admissions, forwards and answers, from whichever thread they happened on."""
        self.reporter.record(event)
        if isinstance(event, Forward):
            self.ray_metrics.forward(event)
