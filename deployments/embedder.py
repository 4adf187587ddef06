"""The embedding replica: owns one model and its tokenizer, batches with @serve.batch, computes off the loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve
from ray.serve import metrics as ray_metrics

from embserve.coalesce import Coalescer
from embserve.engine import EmbedJob, EmbedResult, Engine, forward_layout
from embserve.errors import EmbservError
from embserve.forwards import ForwardPool
from embserve.hardware import (Choice, choose_batch_sizes, choose_device, choose_threads, cpu_cores, gpu_limits,
                               replica_profile)
from embserve.model import EmbeddingModel, ModelInfo
from embserve.settings import ModelSpec, Settings
from embserve.stats import ReplicaReporter
from deployments import serve_env
from deployments.metrics import MetricsShipper

log = logging.getLogger("ray.serve")


def _internal_error(exc: BaseException) -> EmbservError:
    log.error("a request failed in the replica", exc_info=exc)
    return EmbservError(f"internal error ({type(exc).__name__})")


def count_inputs(jobs: list[EmbedJob]) -> int:
    """`max_batch_size` counts inputs, not requests (Ray's batch_size_fn)."""
    return sum(job.weight for job in jobs)


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=30)
class Embedder:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.settings = settings
        device = choose_device(settings, torch.cuda.is_available())
        threads = choose_threads(settings, device.value, cpu_cores())
        self.model = EmbeddingModel(spec, device=device.value, dtype=settings.dtype, threads=threads.value)
        # The replica's threads, split among forwards that run at once from one queue (forward_layout).
        self.layout = forward_layout(self.model.device, torch.get_num_threads(), settings.forward_workers)
        if self.layout.threads != torch.get_num_threads():
            log.warning("%d torch threads for %d forward workers: running %d x %d", torch.get_num_threads(),
                        self.layout.workers, self.layout.workers, self.layout.threads_per_forward)
        # On a GPU the sizes come from the card and this model's config; forwards at once share the card.
        gpu = gpu_limits(self.model, settings.gpu_memory_fraction, self.layout.workers) if device.value == "cuda" else None
        batch_size, batch_tokens = choose_batch_sizes(settings, gpu)
        self.batching = settings.batching(batch_size.value, batch_tokens.value)
        self.engine = Engine(self.model, batch_tokens.value, settings.group_cost_tokens)
        dtype = Choice(self.model.info.dtype, getattr(self.model, "dtype_reason", f"set: {settings.source_of('dtype')}"))
        self.profile = replica_profile(settings, device=device, dtype=dtype, threads=threads, layout=self.layout,
                                       batch_size=batch_size, batch_tokens=batch_tokens)
        self._threads_seen: set[int] = set()  # torch threads per forward, as each forward worker sees them

        def set_threads(n: int) -> None:
            torch.set_num_threads(n)
            self._threads_seen.add(torch.get_num_threads())

        # Runs (tokenize, plan, hand results back) go on a thread each; every run's length groups go to the
        # forward workers, which take the most urgent group first: a lone run with many groups uses them
        # all, and a health check goes between two groups.
        self._worker = ThreadPoolExecutor(max_workers=self.layout.workers, thread_name_prefix="embed")
        self._forwards = ForwardPool(self.layout.workers, initializer=set_threads,
                                     initargs=(self.layout.threads_per_forward,))
        self._coalescer = Coalescer(self._run, size=lambda job: job.weight,
                                    max_size=lambda: self.batching.effective_max_batch_size,
                                    max_in_flight=lambda: self.layout.workers)
        self._apply_batching()
        self.reporter = ReplicaReporter(spec.name)
        self._ongoing = 0
        self._calls = 0  # Serve calls received: one per request, or one per group the ingress sent together
        # Ray's own metrics pipeline (Prometheus via the Ray dashboard agent, Grafana) sees these too.
        self._ray_inputs = ray_metrics.Counter("embserve_replica_inputs", "Inputs embedded by this replica.",
                                               tag_keys=("model",))
        self._ray_padded = ray_metrics.Counter("embserve_replica_padded_tokens", "Tokens sent to the model.",
                                               tag_keys=("model",))
        self._ray_forward = ray_metrics.Histogram("embserve_replica_forward_seconds", "Forward time per batch.",
                                                  boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
                                                  tag_keys=("model",))
        for metric in (self._ray_inputs, self._ray_padded, self._ray_forward):
            metric.set_default_tags({"model": spec.name})
        self.shipper = MetricsShipper(serve.get_replica_context().app_name, self.reporter,
                                      gauges=lambda: {"queue_size": self._ongoing}, profile=self.profile.as_dict)
        self.shipper.start()  # Serve runs constructors on the replica's loop
        for name, what in settings.shadowed().items():
            log.warning("setting %s=%r from %s shadows %s", name, getattr(settings, name), settings.source_of(name), what)
        log.info("embedder %s ready (max_length=%d): %s", spec.name, self.model.max_length, self.profile.summary())
        serve_env.flush_warnings_at_once()  # the line above, and warnings from now on, reach the log at once

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and whenever serve_config.yaml's user_config changes."""
        self.batching = self.batching.updated(user_config)
        self._apply_batching()
        live = self.batching.model_dump()
        live["max_wait_time_ms"] = live.pop("batch_wait_timeout_s") * 1000.0
        for warning in self.profile.retuned(self.settings, user_config or {}, live):
            log.warning(warning)
        log.info("embedder re-tuned by user_config: %s", self.profile.summary())
        serve_env.flush_warnings_at_once()

    def _apply_batching(self) -> None:
        self._batch.set_max_batch_size(self.batching.effective_max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.batching.effective_wait_s)

    def info(self) -> ModelInfo:
        return self.model.info

    def describe(self) -> dict[str, Any]:
        """This replica's process, live batching settings (what reconfigure last applied) and thread layout;
        `threads_per_forward` lists what the forward threads read back after setting it."""
        return {"pid": os.getpid(), "replica": serve.get_replica_context().replica_id.unique_id,
                "model": self.model.info.name, "batching": self.batching.model_dump(),
                "effective_wait_s": self.batching.effective_wait_s,
                "effective_max_batch_size": self.batching.effective_max_batch_size, "calls": self._calls,
                "torch_threads": self.layout.threads, "forward_workers": self.layout.workers,
                "threads_per_forward": sorted(self._threads_seen), "forwards_waiting": self._forwards.waiting,
                "profile": self.profile.as_dict()}

    async def check_health(self) -> None:
        """Serve's health check: the model must answer a one-token forward."""
        # Ahead of the queued groups: it waits for a forward worker to finish its group, not for the queue.
        await asyncio.wrap_future(self._forwards.submit(self.model.forward, [[0]], rank=-1))

    async def embed(self, job: EmbedJob) -> EmbedResult:
        self._calls += 1
        return await self._embed_one(job)

    async def embed_many(self, jobs: list[EmbedJob]) -> list[EmbedResult | EmbservError]:
        """Several requests in one call (the ingress's `ingress_calls_in_flight`): each is still batched,
        counted and failed on its own."""
        self._calls += 1
        outcomes = await asyncio.gather(*(self._embed_one(job) for job in jobs), return_exceptions=True)
        return [o if isinstance(o, (EmbedResult, EmbservError)) else _internal_error(o) for o in outcomes]

    async def _embed_one(self, job: EmbedJob) -> EmbedResult:
        # A request larger than a batch still fits one: it counts as a full batch.
        job.weight = max(1, min(len(job), self.batching.effective_max_batch_size))
        job.enqueued_at = time.time()
        self._ongoing += 1
        try:
            [result] = await (await self._batch(job))
            return result
        except asyncio.CancelledError:
            job.cancelled = True  # if it already sits in a coalesced run, that run skips it
            raise
        finally:
            self._ongoing -= 1

    # Ray forms batches (max_batch_size inputs, batch_wait_timeout_s); each request in one gets a future of
    # its own from the coalescer at once, so a batch never holds its requests back: whatever queues while
    # the model is busy goes into the next run together, and each request is answered when its own inputs
    # are done, not when its batch companions' are.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=count_inputs)
    async def _batch(self, jobs: list[EmbedJob]) -> list[asyncio.Future]:
        return [self._coalescer.add([job]) for job in jobs]

    async def _run(self, jobs: list[EmbedJob], deliver: Callable[[int, EmbedResult], None]) -> list[EmbedResult]:
        loop = asyncio.get_running_loop()
        # Each request is answered as soon as its own groups are computed, while the run goes on.
        run = functools.partial(self.engine.run, jobs, self.batching,
                                on_done=lambda j, result: loop.call_soon_threadsafe(deliver, j, result),
                                forwards=self._forwards)
        results, report = await loop.run_in_executor(self._worker, run)
        self.reporter.record_batch(report)
        if report.inputs:
            self._ray_inputs.inc(report.inputs)
            self._ray_padded.inc(report.padded_tokens)
            self._ray_forward.observe(report.forward_s)
        return results
