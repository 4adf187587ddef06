"""Prometheus text exposition of the aggregated figures (prometheus_client's own format and types).

Counters and histograms count since the metrics actor started and only go up: `POST /v1/performance/reset`
does not touch them (Prometheus would read a drop as a restart, and `rate()` would be wrong around it).
Gauges say what is true now, some of it since the last reset, as `/v1/performance` does.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from embserve.metrics.stats import Aggregate, Histogram, SourceState, error_rate


def _histogram(name: str, doc: str, hist: Histogram | dict[str, Histogram]) -> HistogramMetricFamily:
    """One histogram, or one per model (labelled `model`) from a dict of them."""
    series = {(m,): h for m, h in hist.items()} if isinstance(hist, dict) else {(): hist}
    family = HistogramMetricFamily(name, doc, labels=["model"] if isinstance(hist, dict) else [])
    for values, h in series.items():
        running = 0
        buckets = []
        for bound, count in zip([*map(str, h.buckets), "+Inf"], h.counts):
            running += count
            buckets.append((bound, running))
        family.add_metric(list(values), buckets, h.total)
    return family


class _AggregateCollector:
    def __init__(self, aggregate: Aggregate) -> None:
        self.aggregate = aggregate

    def collect(self):
        # What replicas count is labelled by model (one series per served model); what the ingress counts
        # (requests, their latency and errors) is not: it answers for every model at once.
        agg = self.aggregate
        counted = {m: agg.since_start("replica", m) for m in agg.counted_models()}
        ingress = agg.since_start("ingress")
        live = {m: agg.combined(("replica",), m) for m in agg.models()}  # since the last reset

        yield from _counters(counted, ingress)
        yield from _histograms(counted, ingress)
        yield from _gauges(agg, live)


def _counters(counted: dict[str, SourceState], ingress: SourceState):
    """Lifetime counts: they only go up (a reset of /v1/performance never touches them)."""
    requests = CounterMetricFamily("embserve_requests", "Embedding HTTP requests by status.", labels=["status"])
    for status, n in sorted(ingress.statuses.items()):
        requests.add_metric([status], n)
    yield requests
    for key, doc in (("inputs", "Inputs embedded."), ("tokens", "Real tokens embedded."),
                     ("padded_tokens", "Tokens sent to the model, padding included."),
                     ("batches", "Batches formed by @serve.batch."), ("forwards", "Model forwards."),
                     ("rerank_requests", "Rerank requests admitted by a reranker's replicas."),
                     ("rerank_pairs", "(query, document) pairs admitted for reranking.")):
        c = CounterMetricFamily(f"embserve_{key}", doc, labels=["model"])
        for m, state in counted.items():
            c.add_metric([m], state.counters.get(key, 0))
        yield c
    errors = CounterMetricFamily("embserve_errors", "Failed embedding requests by error kind.", labels=["kind"])
    for kind, n in sorted(ingress.errors.items()):
        errors.add_metric([kind], n)
    yield errors


def _histograms(counted: dict[str, SourceState], ingress: SourceState):
    def by_model(key: str) -> dict[str, Histogram]:
        return {m: state.histograms[key] for m, state in counted.items()}

    yield _histogram("embserve_request_duration_seconds", "End-to-end request latency at the ingress.",
                     ingress.histograms["request_s"])
    for stage in ("queue", "tokenize", "forward"):
        yield _histogram(f"embserve_{stage}_duration_seconds", f"Time spent in the {stage} stage.",
                         by_model(f"{stage}_s"))
    yield _histogram("embserve_batch_inputs", "Inputs per @serve.batch admission.", by_model("batch_inputs"))
    yield _histogram("embserve_forward_inputs", "Inputs per model forward.", by_model("forward_inputs"))
    yield _histogram("embserve_batch_tokens", "Padded tokens per forward.", by_model("batch_tokens"))


def _gauges(agg: Aggregate, live: dict[str, SourceState]):
    """What holds now, or since the last reset of /v1/performance."""
    eff = GaugeMetricFamily("embserve_padding_efficiency", "Real tokens / padded tokens since reset.",
                            labels=["model"])
    for m, state in live.items():
        padded = state.counters.get("padded_tokens", 0)
        eff.add_metric([m], state.counters.get("tokens", 0) / padded if padded else 1.0)
    yield eff
    rate = GaugeMetricFamily("embserve_error_rate", "Failed (status >= 400) / all embedding requests at the "
                             "ingress since reset; 0 with no requests.")
    rate.add_metric([], error_rate(agg.combined(("ingress",)).statuses))
    yield rate
    peak = agg.memory().get("gpu", {}).get("peak_fraction")
    if peak is not None:  # only where replicas run on a GPU
        gpu = GaugeMetricFamily("embserve_gpu_memory_peak_fraction",
                                "Highest GPU memory peak since reset as a fraction of the card, over replicas.")
        gpu.add_metric([], peak)
        yield gpu
    queue = GaugeMetricFamily("embserve_queue_size", "Requests waiting or running in embedding replicas.",
                              labels=["model"])
    for m, state in live.items():
        queue.add_metric([m], state.gauges.get("queue_size", 0))
    yield queue
    replicas = GaugeMetricFamily("embserve_replicas", "Embedding replicas reporting.", labels=["model"])
    per_model: dict[str, int] = {}
    for s in agg.sources.values():
        if s.kind == "replica":
            per_model[s.model or ""] = per_model.get(s.model or "", 0) + 1
    for model, n in sorted(per_model.items()):
        replicas.add_metric([model], n)
    yield replicas


def render(aggregate: Aggregate) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_AggregateCollector(aggregate))
    return generate_latest(registry)
