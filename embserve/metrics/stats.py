"""Counters and histograms: what replicas and ingresses observe, merged into one view of the service.

Sources (replicas, ingresses) keep timestamped events locally and ship them to the metrics actor off the hot
path; the actor merges them with `Aggregate`, twice over: since the last reset (`/v1/performance`) and since
the actor started (the Prometheus counters, which only go up). Plain Python, testable without Ray.
"""

from __future__ import annotations

import bisect
import os
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embserve.metrics.events import Admitted, Answered, Forward, Responded

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INPUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RECENT = 4096  # samples kept per histogram for percentiles
WINDOW_S = 60.0  # throughput window
GONE_S = 30.0  # a source silent this long has gone


@dataclass
class Histogram:
    """Prometheus-style bucket counts plus the most recent samples for percentiles.

    A source keeps its last RECENT samples. A merged histogram keeps every source's samples, each weighted
    by how many observations one of them stands for (its source's count / samples kept), so that its
    percentiles are those of all the sources together, whichever order they were merged in.
    """

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    merged_values: list[np.ndarray] = field(default_factory=list)
    merged_weights: list[np.ndarray] = field(default_factory=list)
    merged_n: int = 0  # observations that came in by merge (the rest are this histogram's own)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1
        self.recent.append(value)

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept samples and how many observations each stands for."""
        own = np.fromiter(self.recent, dtype=np.float64, count=len(self.recent))
        weight = (self.n - self.merged_n) / len(own) if len(own) else 0.0
        return (np.concatenate([own, *self.merged_values]),
                np.concatenate([np.full(len(own), weight), *self.merged_weights]))

    def merge(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.n += other.n
        values, weights = other.samples()
        self.merged_values.append(values)
        self.merged_weights.append(weights)
        self.merged_n += other.n

    def percentiles(self, scale: float = 1.0) -> dict[str, float | None]:
        values, weights = self.samples()
        order = np.argsort(values, kind="stable")
        values, cumulative = values[order], np.cumsum(weights[order])

        def pick(q: float) -> float | None:
            # The first sample whose cumulative weight passes q of the whole: with unit weights, the
            # sample at index int(q * len).
            i = min(len(values) - 1, int(np.searchsorted(cumulative, q * cumulative[-1], side="right")))
            return round(float(values[i]) * scale, 4)

        if not len(values):
            return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "count": self.n}
        return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99),
                "max": round(float(values[-1]) * scale, 4),
                "mean": round(self.total / self.n * scale, 4) if self.n else None, "count": self.n}


def _histograms() -> dict[str, Histogram]:
    return {
        "request_s": Histogram(SECONDS_BUCKETS),
        "queue_s": Histogram(SECONDS_BUCKETS),
        "tokenize_s": Histogram(SECONDS_BUCKETS),
        "forward_s": Histogram(SECONDS_BUCKETS),
        "batch_inputs": Histogram(INPUT_BUCKETS),
        "forward_inputs": Histogram(INPUT_BUCKETS),
        "batch_tokens": Histogram(TOKEN_BUCKETS),
    }


COUNTERS = ("requests", "inputs", "tokens", "padded_tokens", "batches", "forwards", "errors", "rerank_requests",
            "rerank_pairs")


@dataclass(slots=True)
class Event:
    """One observation, stamped when it happened, so that a reset can drop what came before it.

    `report` is one of the scheduler's `Admitted`, `Forward` or `Answered`, or the ingress's `Responded`;
    the aggregate tells them apart by their type. Not frozen: a frozen dataclass's constructor costs twice
    as much, and one is made per request and per forward on the serving path.
    """

    at: float
    report: Any


class UnknownEvent(TypeError):
    """A report of a type the aggregate does not count: a new report type needs a case in `SourceState.apply`."""


def process_memory() -> dict[str, Any]:
    """GPU memory where this process computes on a GPU, the process's resident memory otherwise.

    "Computes on a GPU" means CUDA is already initialised here. torch is looked up, never imported, and
    CUDA never initialised: the ingress has no torch at all, and under Ray 2.60 a `num_gpus: 0` process
    sees the node's cards, so asking torch whether a GPU is there would cost the ingress ~0.5 GB and
    seconds of a blocked loop, and would make a CPU replica report GPU 0's memory as its own.

    On a GPU, `peak_allocated_bytes` is the peak since the previous call: the peak is reset after reading
    it, so that each report carries its own interval's peak and the aggregate can keep the max since a reset.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"kind": "gpu", "allocated_bytes": torch.cuda.memory_allocated(device),
                "reserved_bytes": torch.cuda.memory_reserved(device), "total_bytes": total,
                "peak_allocated_bytes": peak}
    with open(f"/proc/{os.getpid()}/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"kind": "process", "rss_bytes": rss_pages * os.sysconf("SC_PAGE_SIZE")}


class Accumulator:
    """A source's observations since its last report; `take` hands them over. A replica's forward workers
    add from their own threads while the shipper takes on the loop: the lock keeps an event from landing
    in a list already taken."""

    def __init__(self, kind: str, model: str | None) -> None:
        self.kind = kind
        self.model = model
        self.source_id = f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def add(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def take(self) -> list[Event]:
        with self._lock:
            events, self.events = self.events, []
        return events


class ReplicaReporter(Accumulator):
    def __init__(self, model: str) -> None:
        super().__init__("replica", model)

    def record(self, report: Any) -> None:
        """One of the scheduler's reports (embserve.engine.scheduler's Admitted, Forward or Answered). Its type is
        checked where it is counted, in the metrics actor, not here on the serving path."""
        self.add(Event(time.time(), report))


class IngressReporter(Accumulator):
    def __init__(self) -> None:
        super().__init__("ingress", None)

    def record_request(self, status: int, seconds: float, error_kind: str | None = None) -> None:
        self.add(Event(time.time(), Responded(status, seconds, error_kind)))


@dataclass
class SourceState:
    kind: str
    model: str | None
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=_histograms)
    window: deque = field(default_factory=deque)
    gauges: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    peak_allocated_bytes: int = 0  # the highest GPU peak reported since the last reset
    profile: dict[str, Any] | None = None
    profile_seen: float = 0.0
    last_seen: float = 0.0

    def add_error(self, kind: str, n: int = 1) -> None:
        self.counters["errors"] += n
        self.errors[kind] = self.errors.get(kind, 0) + n

    def apply(self, event: Event) -> None:
        """Count one event, by the type of its report; a type with no case here raises `UnknownEvent`."""
        c = self.counters
        match event.report:
            case Admitted() as report:  # one @serve.batch call
                c["batches"] += 1
                c["requests"] += report.requests
                if report.task == "rerank":  # a reranker's requests, each pair one input
                    c["rerank_requests"] += report.requests
                    c["rerank_pairs"] += report.inputs
                self.histograms["batch_inputs"].observe(report.inputs)
                self.histograms["tokenize_s"].observe(report.tokenize_s)
                self.window.append((event.at, report.requests, 0, 0))
            case Forward() as report:
                c["forwards"] += 1
                c["inputs"] += report.inputs
                c["tokens"] += report.tokens
                c["padded_tokens"] += report.padded_tokens
                self.histograms["forward_s"].observe(report.seconds)
                self.histograms["forward_inputs"].observe(report.inputs)
                self.histograms["batch_tokens"].observe(report.padded_tokens)
                self.window.append((event.at, 0, report.inputs, report.tokens))
            case Answered() as report:
                self.histograms["queue_s"].observe(report.queue_s)
                if report.error is not None:
                    self.add_error(report.error)
            case Responded() as report:
                self.statuses[str(report.status)] = self.statuses.get(str(report.status), 0) + 1
                self.histograms["request_s"].observe(report.seconds)
                if report.error_kind is not None:
                    self.add_error(report.error_kind)
            case other:
                raise UnknownEvent(f"no metric counts a {type(other).__module__}.{type(other).__qualname__} "
                                   "report; add a case for it in embserve.metrics.stats.SourceState.apply")

    def trim_window(self, now: float) -> None:
        while self.window and self.window[0][0] < now - WINDOW_S:
            self.window.popleft()

    def set_memory(self, memory: dict[str, Any]) -> None:
        self.memory = memory
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, memory.get("peak_allocated_bytes", 0))

    def memory_view(self) -> dict[str, Any]:
        """The latest memory report, with the GPU peak since the last reset in place of the report's own."""
        if "peak_allocated_bytes" not in self.memory:
            return dict(self.memory)
        total = self.memory.get("total_bytes")
        return {**self.memory, "peak_allocated_bytes": self.peak_allocated_bytes,
                "peak_fraction": round(self.peak_allocated_bytes / total, 4) if total else None}


def _summary(counters: dict[str, int], errors: dict[str, int], hists: dict[str, Histogram],
             window: list[tuple[float, int, int, int]], now: float) -> dict[str, Any]:
    recent = [w for w in window if w[0] >= now - WINDOW_S]
    span = max(1.0, now - min(w[0] for w in recent)) if recent else WINDOW_S
    return {
        "totals": {k: counters.get(k, 0) for k in COUNTERS},
        "padding_efficiency": round(counters["tokens"] / counters["padded_tokens"], 4)
        if counters.get("padded_tokens") else None,
        "throughput": {"window_s": round(span, 1),
                       "requests_per_s": round(sum(w[1] for w in recent) / span, 2),
                       "inputs_per_s": round(sum(w[2] for w in recent) / span, 2),
                       "tokens_per_s": round(sum(w[3] for w in recent) / span, 2)},
        "latency_ms": {"request": hists["request_s"].percentiles(1000), "queue": hists["queue_s"].percentiles(1000),
                       "tokenize": hists["tokenize_s"].percentiles(1000), "forward": hists["forward_s"].percentiles(1000)},
        "batch_inputs": hists["batch_inputs"].percentiles(),
        "forward_inputs": hists["forward_inputs"].percentiles(),
        "batch_tokens": hists["batch_tokens"].percentiles(),
        "errors": dict(errors),
    }


class Aggregate:
    """The metrics actor's state: every source's figures since the last reset (`sources`, what
    `/v1/performance` shows and a reset zeroes) and every model's since the actor started (`lifetime`, what
    Prometheus scrapes: counters must only go up, so a reset never touches them)."""

    def __init__(self) -> None:
        self.sources: dict[str, SourceState] = {}
        # Keyed by (kind, model), not by source: a replica that goes away leaves its counts in its model's.
        self.lifetime: dict[tuple[str, str | None], SourceState] = {}
        self.started_at = time.time()
        # Nothing is dropped until the first reset: what sources saw before this actor existed counts.
        self.reset_at = 0.0

    def record(self, source_id: str, kind: str, model: str | None, events: list[Event],
               gauges: dict[str, float] | None = None, memory: dict[str, Any] | None = None,
               now: float | None = None, *, profile: dict[str, Any] | None = None) -> None:
        """Merge a source's report. Events observed before the last reset are dropped from the figures since
        the reset, so a reset is exact even for reports that were on their way when it happened; the
        lifetime figures count every event. `memory` and `profile` come with each heartbeat and replace the
        previous ones. An event of a type nobody counts raises `UnknownEvent`."""
        now = time.time() if now is None else now
        state = self.sources.setdefault(source_id, SourceState(kind, model))
        lifetime = self.lifetime.setdefault((kind, model), SourceState(kind, model))
        for event in events:
            lifetime.apply(event)
            if event.at >= self.reset_at:
                state.apply(event)
        state.trim_window(now)
        lifetime.trim_window(now)
        state.last_seen = now
        if gauges:
            state.gauges.update(gauges)
        if memory is not None:
            state.set_memory(memory)
        if profile is not None:
            state.profile, state.profile_seen = profile, now

    def reset(self, now: float | None = None) -> None:
        # Keep who is there (their memory, gauges and profile); zero what they counted, GPU peaks included.
        # A source silent for GONE_S has gone (a live one reports every 2 s at least): after a reset it has
        # nothing left to count, so it is forgotten, and a renamed or removed model leaves no series behind
        # in /v1/performance or the Prometheus gauges. The lifetime counts stay as they are.
        now = time.time() if now is None else now
        self.sources = {sid: SourceState(s.kind, s.model, memory=s.memory, last_seen=s.last_seen,
                                         gauges=dict(s.gauges), profile=s.profile, profile_seen=s.profile_seen)
                        for sid, s in self.sources.items() if now - s.last_seen < GONE_S}
        self.reset_at = now

    def models(self) -> list[str]:
        """The models whose replicas have reported since the last reset."""
        return sorted({s.model for s in self.sources.values() if s.kind == "replica" and s.model})

    def counted_models(self) -> list[str]:
        """The models whose replicas have reported since the actor started."""
        return sorted({model for kind, model in self.lifetime if kind == "replica" and model})

    def since_start(self, kind: str, model: str | None = None) -> SourceState:
        """What `kind` sources (of `model`) counted since the actor started; never reset."""
        return self.lifetime.get((kind, model)) or SourceState(kind, model)

    def combined(self, kinds: tuple[str, ...], model: str | None = None) -> SourceState:
        out = SourceState("all", model)
        for s in self.sources.values():
            if s.kind in kinds and (model is None or s.model == model):
                for k, v in s.counters.items():
                    out.counters[k] = out.counters.get(k, 0) + v
                for k, v in s.errors.items():
                    out.errors[k] = out.errors.get(k, 0) + v
                for k, v in s.statuses.items():
                    out.statuses[k] = out.statuses.get(k, 0) + v
                for k, h in s.histograms.items():
                    out.histograms[k].merge(h)
                out.window.extend(s.window)
                for k, v in s.gauges.items():
                    out.gauges[k] = out.gauges.get(k, 0) + v
        return out

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        replicas = self.combined(("replica",))
        ingress = self.combined(("ingress",))
        everything = self.combined(("replica", "ingress"))
        view = _summary(replicas.counters, ingress.errors, everything.histograms, list(replicas.window), now)
        # Failed HTTP requests, counted once where the client saw them (replica-side failures included).
        view["totals"]["errors"] = ingress.counters["errors"]
        view["since_reset_s"] = round(now - (self.reset_at or self.started_at), 3)
        view["http"] = {"requests_by_status": dict(ingress.statuses)}
        view["error_rate"] = round(error_rate(ingress.statuses), 4)
        view["queue_size"] = replicas.gauges.get("queue_size", 0)
        view["memory"] = self.memory()
        view["profile"] = self.profiles()
        view["models"] = {}
        for m in self.models():
            state = self.combined(("replica",), m)
            view["models"][m] = _summary(state.counters, state.errors, state.histograms, list(state.window), now)
        view["replicas"] = []
        for sid, s in sorted(self.sources.items()):
            if s.kind != "replica":
                continue
            entry = _summary(s.counters, s.errors, s.histograms, list(s.window), now)
            entry.update(id=sid, model=s.model, memory=s.memory_view(), queue_size=s.gauges.get("queue_size", 0),
                         last_seen_s_ago=round(now - s.last_seen, 3), profile=s.profile)
            view["replicas"].append(entry)
        return view

    def profiles(self) -> dict[str, dict[str, Any]]:
        """Each model's hardware profile: that of the replica whose profile came in last."""
        latest: dict[str, SourceState] = {}
        for s in self.sources.values():
            if s.kind == "replica" and s.model and s.profile is not None:
                if s.model not in latest or s.profile_seen >= latest[s.model].profile_seen:
                    latest[s.model] = s
        return {m: s.profile for m, s in sorted(latest.items())}

    def memory(self) -> dict[str, Any]:
        """Every source's latest memory report, summed by kind ("gpu", "process")."""
        return _sum_memory([s.memory_view() for s in self.sources.values() if s.memory])


def error_rate(statuses: dict[str, int]) -> float:
    """Failed (status >= 400) over all embedding requests the ingress answered; 0.0 when there were none.
    The one definition: `/v1/performance` shows it rounded, Prometheus's `embserve_error_rate` as it is."""
    answered = sum(statuses.values())
    failed = sum(n for status, n in statuses.items() if int(status) >= 400)
    return failed / answered if answered else 0.0


def _sum_memory(memories: list[dict[str, Any]]) -> dict[str, Any]:
    """Byte counts add up over sources; a peak fraction is the highest of them (it is per card)."""
    out: dict[str, Any] = {}
    for mem in memories:
        key = mem.get("kind", "process")
        bucket = out.setdefault(key, {})
        for k, v in mem.items():
            if k == "peak_fraction":
                if v is not None:
                    bucket[k] = max(bucket.get(k, 0.0), v)
            elif k != "kind":
                bucket[k] = bucket.get(k, 0) + v
    return out
