"""Counters and histograms: what sources observe, and how the metrics actor merges and resets them."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embserve.metrics.events import Admitted, Answered, Forward, Responded
from embserve.metrics.stats import (
    COUNTERS,
    INPUT_BUCKETS,
    RECENT,
    SECONDS_BUCKETS,
    WINDOW_S,
    Aggregate,
    Event,
    Histogram,
    IngressReporter,
    ReplicaReporter,
    UnknownEvent,
    error_rate,
    process_memory,
)

ROOT = Path(__file__).resolve().parents[2]


def _reports(requests=1, inputs=4, tokens=100, padded=120, forwards=1, errors=None, queue=(0.002,),
             tokenize=0.001, forward=0.02) -> list:
    """What a replica's scheduler reports for one admission: the admission, its forwards (inputs and tokens
    spread over them), and an answer per request (queue times, then the errors)."""
    out: list = [Admitted(requests, inputs, tokenize)]
    for k in range(forwards):
        share = lambda total: total // forwards + (total % forwards if k == forwards - 1 else 0)  # noqa: E731
        out.append(Forward(share(inputs), share(tokens), share(padded), forward / forwards))
    out += [Answered(q, None) for q in queue]
    out += [Answered(0.0, kind) for kind, n in (errors or {}).items() for _ in range(n)]
    return out


def _batch(at, **kwargs) -> list[Event]:
    return [Event(at, r) for r in _reports(**kwargs)]


# Histogram


def test_histogram_puts_each_value_in_the_first_bucket_that_holds_it():
    h = Histogram((1.0, 5.0, 10.0))
    for v in (0.5, 1.0, 1.1, 5.0, 9.0, 10.0, 11.0, 1e9):
        h.observe(v)
    # Buckets are "less than or equal"; the last count is +Inf.
    assert h.counts == [2, 2, 2, 2]
    assert h.n == 8
    assert h.total == pytest.approx(0.5 + 1.0 + 1.1 + 5.0 + 9.0 + 10.0 + 11.0 + 1e9)


def test_histogram_percentiles_over_one_to_a_hundred():
    h = Histogram(SECONDS_BUCKETS)
    for v in range(1, 101):
        h.observe(float(v))
    assert h.percentiles() == {"p50": 51.0, "p95": 96.0, "p99": 100.0, "max": 100.0, "mean": 50.5, "count": 100}


def test_histogram_percentiles_scale_seconds_to_milliseconds():
    h = Histogram(SECONDS_BUCKETS)
    for v in (0.010, 0.020, 0.030):
        h.observe(v)
    p = h.percentiles(1000)
    assert (p["p50"], p["max"], p["mean"], p["count"]) == (20.0, 30.0, 20.0, 3)


def test_empty_histogram_has_no_percentiles():
    assert Histogram(INPUT_BUCKETS).percentiles() == {"p50": None, "p95": None, "p99": None, "max": None,
                                                     "mean": None, "count": 0}


def test_histogram_keeps_recent_samples_bounded_but_counts_all():
    h = Histogram(INPUT_BUCKETS)
    for v in range(RECENT + 100):
        h.observe(1 if v < 100 else 1000)
    assert h.n == RECENT + 100
    assert len(h.recent) == RECENT
    assert h.percentiles()["p50"] == 1000, "the oldest samples left the percentile window"
    assert h.percentiles()["mean"] == pytest.approx((100 + 1000 * RECENT) / (RECENT + 100), abs=1e-3)


def test_histogram_merge_adds_counts_sums_and_samples():
    a, b = Histogram((1.0, 2.0)), Histogram((1.0, 2.0))
    for v in (0.5, 1.5):
        a.observe(v)
    for v in (1.5, 3.0, 4.0):
        b.observe(v)
    a.merge(b)
    assert a.counts == [1, 2, 2]
    assert a.n == 5 and a.total == pytest.approx(10.5)
    values, weights = a.samples()
    assert sorted(values) == [0.5, 1.5, 1.5, 3.0, 4.0]
    assert list(weights) == [1.0] * 5, "every sample kept stands for one observation"
    assert b.n == 3 and list(b.recent) == [1.5, 3.0, 4.0], "the merged-in histogram is left as it was"


def _busy_and_idle() -> tuple[Histogram, Histogram]:
    """A busy source saw 3 * RECENT fast requests (it keeps RECENT samples), an idle one RECENT slow ones."""
    busy, idle = Histogram(SECONDS_BUCKETS), Histogram(SECONDS_BUCKETS)
    for _ in range(3 * RECENT):
        busy.observe(0.01)
    for _ in range(RECENT):
        idle.observe(1.0)
    return busy, idle


@pytest.mark.parametrize("order", ["busy_first", "idle_first"])
def test_merged_percentiles_weigh_each_source_by_what_it_observed_in_any_order(order):
    busy, idle = _busy_and_idle()
    merged = Histogram(SECONDS_BUCKETS)
    for h in ((busy, idle) if order == "busy_first" else (idle, busy)):
        merged.merge(h)
    # 75% of all observations took 10 ms, 25% took 1 s: the p50 is fast and the p95 slow, whichever merged
    # last (a merge into a bounded deque kept only the last source's samples).
    p = merged.percentiles()
    assert (p["p50"], p["p95"], p["p99"], p["max"], p["count"]) == (0.01, 1.0, 1.0, 1.0, 4 * RECENT)
    assert p["mean"] == pytest.approx(0.25 * 1.0 + 0.75 * 0.01, abs=1e-4)


def test_percentiles_of_a_merge_of_merges_match_a_flat_merge():
    busy, idle = _busy_and_idle()
    flat, inner, outer = Histogram(SECONDS_BUCKETS), Histogram(SECONDS_BUCKETS), Histogram(SECONDS_BUCKETS)
    flat.merge(busy)
    flat.merge(idle)
    inner.merge(busy)
    outer.merge(inner)
    outer.merge(idle)
    assert outer.percentiles() == flat.percentiles()


def test_merging_into_a_histogram_with_samples_of_its_own_keeps_their_weight():
    own, other = Histogram(SECONDS_BUCKETS), Histogram(SECONDS_BUCKETS)
    for _ in range(3):
        own.observe(0.01)
    other.observe(1.0)
    own.merge(other)
    p = own.percentiles()
    assert (p["p50"], p["p99"], p["count"]) == (0.01, 1.0, 4)


# Sources


def test_reporters_hand_over_their_events_once():
    replica, ingress = ReplicaReporter("mini"), IngressReporter()
    for report in _reports():
        replica.record(report)
    ingress.record_request(200, 0.05)
    ingress.record_request(400, 0.01, "InvalidRequest")
    admitted, forward, answered = replica.take()
    assert (type(admitted.report), type(forward.report), type(answered.report)) == (Admitted, Forward, Answered)
    assert admitted.report.inputs == forward.report.inputs == 4
    assert [e.report for e in ingress.take()] == [Responded(200, 0.05, None), Responded(400, 0.01, "InvalidRequest")]
    assert replica.take() == [] and ingress.take() == []
    assert (replica.kind, replica.model, ingress.kind, ingress.model) == ("replica", "mini", "ingress", None)


def test_each_reporter_has_its_own_source_id():
    reporters = [ReplicaReporter("m"), ReplicaReporter("m"), IngressReporter()]
    assert len({r.source_id for r in reporters}) == 3


def test_events_survive_pickling_to_the_metrics_actor():
    replica = ReplicaReporter("m")
    for report in _reports(errors={"InputTooLong": 1}):
        replica.record(report)
    events = pickle.loads(pickle.dumps(replica.take()))
    assert [e.report.error for e in events if isinstance(e.report, Answered)] == [None, "InputTooLong"]
    assert [e.report.padded_tokens for e in events if isinstance(e.report, Forward)] == [120]


def test_process_memory_reports_resident_bytes_or_gpu_memory():
    mem = process_memory()
    if mem["kind"] == "process":
        assert mem["rss_bytes"] > 1 << 20
    else:
        assert mem["kind"] == "gpu" and mem["total_bytes"] > 0


def test_the_ingress_metrics_path_never_imports_torch():
    # A fresh interpreter, as the ingress replica is: its modules and one metrics report (memory included).
    code = """
import asyncio, sys
import deployments.ingress
from deployments import metrics
from embserve.metrics.stats import IngressReporter

class Actor:
    class record:
        @staticmethod
        async def remote(*args, **kwargs):
            Actor.memory = args[5]

metrics.get_metrics_actor = lambda app: Actor
reporter = IngressReporter()
reporter.record_request(200, 0.01)
asyncio.run(metrics.MetricsShipper("app", reporter).flush())
assert Actor.memory["kind"] == "process", Actor.memory
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_process_that_never_initialised_cuda_reports_its_own_memory_on_a_gpu_host(monkeypatch):
    import torch

    # A CPU replica on a GPU node: torch sees the node's cards, but this process never computes on one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not torch.cuda.is_initialized()
    mem = process_memory()
    assert mem["kind"] == "process" and mem["rss_bytes"] > 1 << 20


# Aggregate


@pytest.fixture
def agg() -> Aggregate:
    return Aggregate()


def _at(agg: Aggregate, seconds: float) -> float:
    """A time `seconds` from now: after the aggregate was made or last reset."""
    return max(time.time(), agg.reset_at) + seconds


def test_totals_are_the_sum_of_two_replicas(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "mini", [*_batch(t, requests=2, inputs=4, tokens=100, padded=120),
                                         *_batch(t, requests=1, inputs=1, tokens=10, padded=10)],
               now=t)
    agg.record("r2", "replica", "mini", [*_batch(t, requests=3, inputs=6, tokens=90, padded=150,
                                                                   forwards=2, errors={"InputTooLong": 1})],
               now=t)
    snap = agg.snapshot(now=t)
    assert snap["totals"]["requests"] == 6
    assert snap["totals"]["inputs"] == 11
    assert snap["totals"]["tokens"] == 200
    assert snap["totals"]["padded_tokens"] == 280
    assert snap["totals"]["batches"] == 3
    assert snap["totals"]["forwards"] == 4
    assert snap["padding_efficiency"] == round(200 / 280, 4)
    per_replica = {r["id"]: r["totals"] for r in snap["replicas"]}
    assert set(per_replica) == {"r1", "r2"}
    for key in ("requests", "inputs", "tokens", "padded_tokens", "batches", "forwards"):
        assert snap["totals"][key] == per_replica["r1"][key] + per_replica["r2"][key]
    assert snap["batch_inputs"]["count"] == 3  # one per admission (@serve.batch call)
    assert snap["forward_inputs"]["count"] == 4  # inputs per forward, beside the admissions' sizes
    assert snap["latency_ms"]["queue"]["count"] == 4  # one per answer, the failed one included
    assert snap["latency_ms"]["forward"]["count"] == 4  # one per forward


def test_deltas_from_repeated_reports_accumulate(agg):
    t = _at(agg, 1)
    for _ in range(3):
        agg.record("r1", "replica", "mini", [*_batch(t, inputs=2, tokens=20, padded=20)], now=t)
    agg.record("r1", "replica", "mini", [], now=t)
    assert agg.snapshot(now=t)["totals"]["inputs"] == 6


def test_errors_are_counted_once_where_the_client_saw_them(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "mini", [*_batch(t, errors={"InputTooLong": 1})], now=t)
    agg.record("i1", "ingress", None, [Event(t, Responded(200, 0.01, None)),
                                       Event(t, Responded(400, 0.02, "InputTooLong")),
                                       Event(t, Responded(401, 0.001, "Unauthorized"))], now=t)
    agg.record("i2", "ingress", None, [Event(t, Responded(200, 0.03, None))], now=t)
    snap = agg.snapshot(now=t)
    assert snap["totals"]["errors"] == 2
    assert snap["errors"] == {"InputTooLong": 1, "Unauthorized": 1}
    assert snap["http"]["requests_by_status"] == {"200": 2, "400": 1, "401": 1}
    assert snap["latency_ms"]["request"]["count"] == 4
    assert snap["latency_ms"]["request"]["max"] == 30.0
    # The replica's own view keeps its own error count.
    assert snap["models"]["mini"]["errors"] == {"InputTooLong": 1}


def test_reset_zeroes_counters_but_keeps_sources_memory_and_gauges(agg):
    t = _at(agg, 1)
    mem = {"kind": "process", "rss_bytes": 1000}
    agg.record("r1", "replica", "mini", [*_batch(t)], gauges={"queue_size": 3}, memory=mem, now=t)
    agg.record("i1", "ingress", None, [Event(t, Responded(500, 0.1, "Unavailable"))], now=t)
    agg.reset()
    snap = agg.snapshot()
    assert snap["totals"] == dict.fromkeys(COUNTERS, 0)
    assert snap["errors"] == {} and snap["http"]["requests_by_status"] == {}
    assert snap["padding_efficiency"] is None
    assert snap["latency_ms"]["request"]["count"] == 0
    assert snap["throughput"]["inputs_per_s"] == 0
    assert [r["id"] for r in snap["replicas"]] == ["r1"]
    assert snap["memory"] == {"process": {"rss_bytes": 1000}}
    assert snap["queue_size"] == 3


def test_events_from_before_a_reset_are_dropped_even_when_they_arrive_after_it(agg):
    agg.reset()
    before, after = agg.reset_at - 0.5, agg.reset_at + 0.5
    agg.record("r1", "replica", "mini", [*_batch(before, inputs=7),
                                         *_batch(after, inputs=2)], now=after)
    assert agg.snapshot(now=after)["totals"]["inputs"] == 2


def test_events_from_before_the_aggregate_existed_count_until_the_first_reset():
    early = time.time() - 30  # a replica observed this before the metrics actor started
    agg = Aggregate()
    agg.record("r1", "replica", "mini", [*_batch(early, inputs=3)])
    assert agg.snapshot()["totals"]["inputs"] == 3
    agg.reset()
    agg.record("r1", "replica", "mini", [*_batch(early, inputs=3)])
    assert agg.snapshot()["totals"]["inputs"] == 0


def test_snapshot_has_every_documented_key(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "mini", [*_batch(t)], memory={"kind": "process", "rss_bytes": 5},
               now=t)
    snap = agg.snapshot(now=t)
    for key in ("totals", "padding_efficiency", "throughput", "latency_ms", "batch_inputs", "batch_tokens",
                "errors", "memory", "replicas", "models", "queue_size", "http", "since_reset_s"):
        assert key in snap
    for key in ("error_rate", "profile"):
        assert key in snap
    assert set(snap["totals"]) >= {"requests", "inputs", "tokens", "padded_tokens", "batches", "errors"}
    assert set(snap["latency_ms"]) == {"request", "queue", "tokenize", "forward"}
    for stage in snap["latency_ms"].values():
        assert {"p50", "p95", "p99"} <= set(stage)
    assert {"p50", "p95", "p99"} <= set(snap["batch_inputs"]) and {"p50", "p95", "p99"} <= set(snap["batch_tokens"])
    assert set(snap["throughput"]) == {"window_s", "requests_per_s", "inputs_per_s", "tokens_per_s"}
    assert snap["error_rate"] == 0.0 and snap["profile"] == {}
    [replica] = snap["replicas"]
    assert {"id", "model", "memory", "queue_size", "last_seen_s_ago", "totals", "profile"} <= set(replica)
    assert set(snap["models"]) == {"mini"}


def test_batch_histograms_count_inputs_and_padded_tokens(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "m", [*_batch(t, inputs=3, tokens=50, padded=64),
                                      *_batch(t, inputs=9, tokens=800, padded=900)], now=t)
    snap = agg.snapshot(now=t)
    assert snap["batch_inputs"]["max"] == 9 and snap["batch_inputs"]["count"] == 2
    assert snap["batch_tokens"]["max"] == 900 and snap["batch_tokens"]["p50"] == 900


def test_throughput_is_requests_inputs_and_tokens_over_the_window(agg):
    t0 = _at(agg, 10)
    agg.record("r1", "replica", "m", [*_batch(t0, requests=5, inputs=10, tokens=1000),
                                      *_batch(t0 + 5, requests=15, inputs=30, tokens=3000)],
               now=t0 + 5)
    snap = agg.snapshot(now=t0 + 10)
    assert snap["throughput"] == {"window_s": 10.0, "requests_per_s": 2.0, "inputs_per_s": 4.0,
                                  "tokens_per_s": 400.0}
    assert snap["models"]["m"]["throughput"]["requests_per_s"] == 2.0
    assert snap["replicas"][0]["throughput"]["requests_per_s"] == 2.0


def test_requests_per_s_adds_up_over_replicas_and_forgets_old_batches(agg):
    t0 = _at(agg, 1)
    agg.record("r1", "replica", "m", [*_batch(t0, requests=50)], now=t0)
    late = t0 + WINDOW_S + 20
    agg.record("r1", "replica", "m", [*_batch(late, requests=3)], now=late)
    agg.record("r2", "replica", "m", [*_batch(late, requests=5)], now=late)
    snap = agg.snapshot(now=late + 2)
    assert snap["throughput"]["requests_per_s"] == 4.0  # 8 requests over 2 s; the first 50 left the window
    assert snap["totals"]["requests"] == 58


def test_throughput_forgets_batches_older_than_the_window(agg):
    t0 = _at(agg, 1)
    agg.record("r1", "replica", "m", [*_batch(t0, inputs=100, tokens=100)], now=t0)
    late = t0 + WINDOW_S + 20
    agg.record("r1", "replica", "m", [*_batch(late, inputs=4, tokens=40)], now=late)
    snap = agg.snapshot(now=late + 1)
    assert snap["throughput"]["inputs_per_s"] == 4.0  # only the late batch, over a span of 1 s
    assert snap["totals"]["inputs"] == 104, "totals keep counting what left the window"


def test_models_are_summarized_apart(agg):
    t = _at(agg, 1)
    agg.record("a1", "replica", "alpha", [*_batch(t, inputs=2)], now=t)
    agg.record("a2", "replica", "alpha", [*_batch(t, inputs=3)], now=t)
    agg.record("b1", "replica", "beta", [*_batch(t, inputs=5)], now=t)
    snap = agg.snapshot(now=t)
    assert snap["models"]["alpha"]["totals"]["inputs"] == 5
    assert snap["models"]["beta"]["totals"]["inputs"] == 5
    assert snap["totals"]["inputs"] == 10
    assert [r["model"] for r in snap["replicas"]] == ["alpha", "alpha", "beta"]


def test_queue_sizes_and_memory_add_up_across_replicas(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "m", [], gauges={"queue_size": 2}, memory={"kind": "gpu", "allocated_bytes": 10,
                                                                          "total_bytes": 100}, now=t)
    agg.record("r2", "replica", "m", [], gauges={"queue_size": 5}, memory={"kind": "gpu", "allocated_bytes": 30,
                                                                          "total_bytes": 100}, now=t)
    agg.record("i1", "ingress", None, [], memory={"kind": "process", "rss_bytes": 7}, now=t)
    agg.record("r1", "replica", "m", [], gauges={"queue_size": 1}, now=t + 2)
    snap = agg.snapshot(now=t + 3)
    assert snap["queue_size"] == 6, "the latest gauge of each replica, summed"
    assert snap["memory"] == {"gpu": {"allocated_bytes": 40, "total_bytes": 200}, "process": {"rss_bytes": 7}}
    by_id = {r["id"]: r for r in snap["replicas"]}
    assert by_id["r1"]["queue_size"] == 1 and by_id["r2"]["queue_size"] == 5
    assert by_id["r1"]["last_seen_s_ago"] == 1.0 and by_id["r2"]["last_seen_s_ago"] == 3.0


# Error rate


def test_error_rate_is_failed_over_all_requests_at_the_ingress(agg):
    t = _at(agg, 1)
    # A replica's own error counts do not enter the rate: the ingress answers every request once.
    agg.record("r1", "replica", "mini", [*_batch(t, errors={"InputTooLong": 1})], now=t)
    agg.record("i1", "ingress", None, [Event(t, Responded(200, 0.01, None)),
                                       Event(t, Responded(200, 0.01, None)),
                                       Event(t, Responded(400, 0.01, "InputTooLong")),
                                       Event(t, Responded(503, 0.01, "Unavailable"))], now=t)
    agg.record("i2", "ingress", None, [Event(t, Responded(200, 0.01, None)),
                                       Event(t, Responded(404, 0.01, "ModelNotFound")),
                                       Event(t, Responded(413, 0.01, None)),
                                       Event(t, Responded(201, 0.01, None))], now=t)
    assert agg.snapshot(now=t)["error_rate"] == 0.5  # 400, 503, 404, 413 of 8


def test_error_rate_is_zero_with_no_requests_and_after_a_reset(agg):
    assert agg.snapshot()["error_rate"] == 0.0
    t = _at(agg, 1)
    agg.record("i1", "ingress", None, [Event(t, Responded(500, 0.01, "Internal")),
                                       Event(t, Responded(200, 0.01, None)),
                                       Event(t, Responded(200, 0.01, None))], now=t)
    assert agg.snapshot(now=t)["error_rate"] == round(1 / 3, 4)
    agg.reset()
    assert agg.snapshot()["error_rate"] == 0.0
    t = _at(agg, 1)
    agg.record("i1", "ingress", None, [Event(t, Responded(429, 0.01, "Overloaded"))], now=t)
    assert agg.snapshot(now=t)["error_rate"] == 1.0


# GPU memory peaks


def _gpu(allocated: int, peak: int, total: int = 1000) -> dict:
    return {"kind": "gpu", "allocated_bytes": allocated, "reserved_bytes": allocated, "total_bytes": total,
            "peak_allocated_bytes": peak}


def test_gpu_peak_is_the_highest_report_since_reset_per_replica(agg):
    t = _at(agg, 1)
    for peak in (300, 700, 200):  # each report carries the peak of its own interval
        agg.record("r1", "replica", "m", [], memory=_gpu(100, peak), now=t)
    agg.record("r2", "replica", "m", [], memory=_gpu(50, 100, total=2000), now=t)
    snap = agg.snapshot(now=t)
    by_id = {r["id"]: r["memory"] for r in snap["replicas"]}
    assert by_id["r1"] == {**_gpu(100, 700), "peak_fraction": 0.7}
    assert by_id["r2"] == {**_gpu(50, 100, total=2000), "peak_fraction": 0.05}
    gpu = snap["memory"]["gpu"]
    assert gpu["peak_fraction"] == 0.7, "the highest fraction of any replica's card"
    assert gpu["peak_allocated_bytes"] == 800 and gpu["total_bytes"] == 3000 and gpu["allocated_bytes"] == 150


def test_reset_zeroes_gpu_peaks_but_keeps_the_card(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "m", [], memory=_gpu(100, 900), now=t)
    agg.reset()
    mem = agg.snapshot()["replicas"][0]["memory"]
    assert (mem["peak_allocated_bytes"], mem["peak_fraction"], mem["total_bytes"]) == (0, 0.0, 1000)
    agg.record("r1", "replica", "m", [], memory=_gpu(100, 400), now=_at(agg, 1))
    assert agg.snapshot()["memory"]["gpu"]["peak_fraction"] == 0.4


def test_without_a_gpu_memory_has_no_peak(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "m", [], memory={"kind": "process", "rss_bytes": 10}, now=t)
    snap = agg.snapshot(now=t)
    assert snap["memory"] == {"process": {"rss_bytes": 10}}
    assert snap["replicas"][0]["memory"] == {"kind": "process", "rss_bytes": 10}


def test_process_memory_reports_a_peak_only_on_a_gpu():
    mem = process_memory()
    assert ("peak_allocated_bytes" in mem) == (mem["kind"] == "gpu")
    if mem["kind"] == "gpu":
        assert mem["peak_allocated_bytes"] >= mem["allocated_bytes"] - 1 and mem["total_bytes"] > 0


# Hardware profiles


def _profile(device: str = "cpu", workers: int = 1) -> dict:
    return {"device": device, "dtype": "float32", "forward_workers": workers, "threads": 4,
            "max_batch_size": 64, "max_batch_tokens": 8192,
            "sources": {"device": "auto", "dtype": "default", "forward_workers": "setting"}}


def test_snapshot_shows_each_replicas_profile_and_the_latest_per_model(agg):
    t = _at(agg, 1)
    agg.record("a1", "replica", "alpha", [], memory={"kind": "process", "rss_bytes": 1},
               profile=_profile(workers=1), now=t)
    agg.record("a2", "replica", "alpha", [], profile=_profile(workers=2), now=t + 1)
    agg.record("b1", "replica", "beta", [], profile=_profile("cuda"), now=t)
    agg.record("b2", "replica", "beta", [], now=t + 2)  # no profile yet
    agg.record("i1", "ingress", None, [], now=t)
    snap = agg.snapshot(now=t + 2)
    assert snap["profile"] == {"alpha": _profile(workers=2), "beta": _profile("cuda")}
    by_id = {r["id"]: r["profile"] for r in snap["replicas"]}
    assert by_id == {"a1": _profile(workers=1), "a2": _profile(workers=2), "b1": _profile("cuda"), "b2": None}


def test_a_heartbeat_without_a_profile_keeps_the_last_one_and_reset_keeps_profiles(agg):
    t = _at(agg, 1)
    agg.record("a1", "replica", "alpha", [], profile=_profile(), now=t)
    agg.record("a1", "replica", "alpha", [*_batch(t)], now=t + 1)
    agg.reset()
    snap = agg.snapshot()
    assert snap["profile"] == {"alpha": _profile()}
    assert snap["replicas"][0]["profile"] == _profile()
    assert snap["totals"]["requests"] == 0


# The shipper (no Ray: the actor is a stand-in)


class _FakeActor:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.fail = fail
        self.record = self._method(self.calls)
        self.ready = self._method([])

    def _method(self, calls: list):
        actor = self

        class Method:
            @staticmethod
            async def remote(*args, **kwargs):
                if actor.fail:
                    raise ConnectionError("actor down")
                calls.append((args, kwargs))
                return True

        return Method


@pytest.fixture
def fake_actor(monkeypatch) -> _FakeActor:
    from deployments import metrics

    actor = _FakeActor()
    monkeypatch.setattr(metrics, "get_metrics_actor", lambda app_name: actor)
    monkeypatch.setattr(metrics, "process_memory", lambda: {"kind": "process", "rss_bytes": 1})
    return actor


def test_shipper_start_without_a_running_loop_does_nothing():
    from deployments.metrics import MetricsShipper

    shipper = MetricsShipper("app", ReplicaReporter("m"))
    assert shipper.start() is False and shipper._task is None


def test_shipper_start_in_a_loop_starts_once():
    import asyncio

    from deployments.metrics import MetricsShipper

    async def main():
        shipper = MetricsShipper("app", ReplicaReporter("m"))
        assert shipper.start() is True
        task = shipper._task
        assert shipper.start() is True and shipper._task is task
        task.cancel()

    asyncio.run(main())


@pytest.mark.parametrize("as_callable", [False, True])
def test_shipper_sends_the_profile_with_every_heartbeat(fake_actor, as_callable):
    import asyncio

    from deployments.metrics import MetricsShipper

    profile = _profile()
    reporter = ReplicaReporter("m")
    shipper = MetricsShipper("app", reporter, gauges=lambda: {"queue_size": 0},
                             profile=(lambda: profile) if as_callable else profile)

    async def main():
        for _ in range(5):
            reporter.record(_reports()[0])
            await shipper.flush()

    asyncio.run(main())
    sent = [(args[5], kwargs["profile"]) for args, kwargs in fake_actor.calls]
    assert len(sent) == 5
    # Ticks 1 and 5 are heartbeats: memory and profile go together, and only then.
    assert [(mem is not None, prof) for mem, prof in sent] == [(True, profile), (False, None), (False, None),
                                                              (False, None), (True, profile)]


def test_ensure_metrics_actor_waits_for_an_answer_and_never_raises(monkeypatch):
    import asyncio

    from deployments import metrics

    up, down = _FakeActor(), _FakeActor(fail=True)
    monkeypatch.setattr(metrics, "get_metrics_actor", lambda app_name: up)
    assert asyncio.run(metrics.ensure_metrics_actor("app")) is True
    monkeypatch.setattr(metrics, "get_metrics_actor", lambda app_name: down)
    assert asyncio.run(metrics.ensure_metrics_actor("app")) is False


def test_a_reset_forgets_sources_that_have_gone_silent(agg):
    t = _at(agg, 1)
    agg.record("old", "replica", "renamed-away", _batch(t), now=t)
    agg.record("live", "replica", "mini", _batch(t), now=t + 100)
    agg.reset(now=t + 101)  # "old" last reported 101 s ago, "live" 1 s ago
    snap = agg.snapshot(now=t + 101)
    assert [r["id"] for r in snap["replicas"]] == ["live"]
    assert set(snap["models"]) == {"mini"}


def test_events_added_from_forward_threads_while_the_shipper_takes_are_all_handed_over():
    import threading

    replica = ReplicaReporter("m")
    taken: list = []
    stop = threading.Event()

    def shipper() -> None:
        while not stop.is_set():
            taken.extend(replica.take())

    def worker() -> None:
        for report in _reports() * 2000:
            replica.record(report)

    ship = threading.Thread(target=shipper)
    ship.start()
    workers = [threading.Thread(target=worker) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    ship.join()
    taken.extend(replica.take())
    assert len(taken) == 3 * 2000 * len(_reports())


# Events are counted by the type of their report


@pytest.mark.parametrize("report, counted", [
    (Admitted(requests=3, inputs=7, tokenize_s=0.002), {"batches": 1, "requests": 3}),
    (Admitted(requests=2, inputs=5, tokenize_s=0.002, task="rerank"),
     {"batches": 1, "requests": 2, "rerank_requests": 2, "rerank_pairs": 5}),
    (Forward(inputs=4, tokens=30, padded_tokens=40, seconds=0.01),
     {"forwards": 1, "inputs": 4, "tokens": 30, "padded_tokens": 40}),
    (Answered(queue_s=0.003, error=None), {}),
    (Answered(queue_s=0.0, error="InputTooLong"), {"errors": 1}),
    (Responded(200, 0.02), {}),
    (Responded(413, 0.001, "InputTooLong"), {"errors": 1}),
], ids=lambda v: type(v).__name__ if not isinstance(v, dict) else "")
def test_each_report_type_lands_in_its_own_counters_and_histograms(report, counted):
    kind = "ingress" if isinstance(report, Responded) else "replica"
    agg = Aggregate()
    agg.record("s1", kind, None if kind == "ingress" else "m", [Event(time.time(), report)])
    state = agg.sources["s1"]
    assert state.counters == {**dict.fromkeys(COUNTERS, 0), **counted}
    observed = {name for name, h in state.histograms.items() if h.n}
    assert observed == {Admitted: {"batch_inputs", "tokenize_s"}, Answered: {"queue_s"}, Responded: {"request_s"},
                        Forward: {"forward_s", "forward_inputs", "batch_tokens"}}[type(report)]
    if isinstance(report, Responded):
        assert state.statuses == {str(report.status): 1}


def test_a_report_is_counted_by_its_class_whatever_its_name():
    class ForwardV2(Forward):  # a renamed or extended report still counts where its class says
        pass

    agg = Aggregate()
    agg.record("r1", "replica", "m", [Event(time.time(), ForwardV2(inputs=3, tokens=9, padded_tokens=12,
                                                                   seconds=0.01))])
    assert agg.snapshot()["totals"]["inputs"] == 3


def test_an_unknown_report_type_fails_loudly_instead_of_counting_nothing():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Forward:  # the right name but not the scheduler's class: a name counts for nothing
        inputs: int

    agg = Aggregate()
    with pytest.raises(UnknownEvent, match="Forward"):
        agg.record("r1", "replica", "m", [Event(time.time(), Forward(inputs=3))])
    with pytest.raises(UnknownEvent):
        agg.record("i1", "ingress", None, [Event(time.time(), (200, 0.01, None))])  # the old tuple shape


def test_every_report_the_real_scheduler_makes_is_counted(float32_model):
    from embserve.api.contracts import EmbedJob
    from embserve.engine.scheduler import ForwardLayout, Scheduler, embed_jobs
    from embserve.settings import BatchingConfig

    reporter = ReplicaReporter("m")
    config = BatchingConfig()
    scheduler = Scheduler(float32_model, ForwardLayout(1, 1), config=lambda: config, max_batch_tokens=8192,
                          report=reporter.record)
    try:
        results = embed_jobs(scheduler, [EmbedJob(texts=["a cat", "a dog on a mat"]), EmbedJob(texts=["x"]),
                                         EmbedJob(token_ids=[[-1]])])
    finally:
        scheduler.close()
    agg = Aggregate()
    agg.record(reporter.source_id, reporter.kind, reporter.model, reporter.take())  # raises on any unknown
    totals = agg.snapshot()["totals"]
    assert [r.error is None for r in results] == [True, True, False]
    assert (totals["requests"], totals["batches"], totals["inputs"]) == (3, 1, 3)
    assert totals["tokens"] == sum(r.prompt_tokens for r in results)
    assert agg.snapshot()["models"]["m"]["errors"] == {"InvalidRequest": 1}


# Since the last reset (/v1/performance) and since the actor started (Prometheus)


def _lifetime(agg: Aggregate) -> dict:
    """Every count Prometheus exposes: counters, statuses, errors and histogram counts and sums."""
    out = {}
    for (kind, model), s in agg.lifetime.items():
        out.update({(kind, model, k): v for k, v in s.counters.items()})
        out.update({(kind, model, "status", k): v for k, v in s.statuses.items()})
        out.update({(kind, model, "error", k): v for k, v in s.errors.items()})
        for name, h in s.histograms.items():
            out.update({(kind, model, name, i): c for i, c in enumerate(h.counts)})
            out[(kind, model, name, "sum")], out[(kind, model, name, "count")] = h.total, h.n
    return out


def test_a_reset_zeroes_the_performance_figures_but_never_lowers_a_lifetime_count(agg):
    t = _at(agg, 1)
    agg.record("r1", "replica", "mini", _batch(t, requests=2, inputs=5, errors={"InputTooLong": 1}), now=t)
    agg.record("i1", "ingress", None, [Event(t, Responded(200, 0.01)), Event(t, Responded(400, 0.02, "X"))], now=t)
    before = _lifetime(agg)
    agg.reset()
    assert agg.snapshot()["totals"] == dict.fromkeys(COUNTERS, 0)
    assert agg.snapshot()["http"]["requests_by_status"] == {}
    assert _lifetime(agg) == before, "a reset alone changes no lifetime count"
    t = _at(agg, 1)
    agg.record("r1", "replica", "mini", _batch(t, requests=1, inputs=3), now=t)
    agg.record("i1", "ingress", None, [Event(t, Responded(200, 0.5))], now=t)
    after = _lifetime(agg)
    assert set(before) <= set(after)
    assert all(after[k] >= v for k, v in before.items()), [k for k, v in before.items() if after[k] < v]
    assert agg.snapshot(now=t)["totals"]["inputs"] == 3
    assert agg.since_start("replica", "mini").counters["inputs"] == 8
    assert agg.since_start("ingress").statuses == {"200": 2, "400": 1}


def test_events_from_before_a_reset_count_for_lifetime_but_not_for_performance(agg):
    agg.reset()
    agg.record("r1", "replica", "mini", _batch(agg.reset_at - 0.5, inputs=7), now=agg.reset_at + 0.5)
    assert agg.snapshot()["totals"]["inputs"] == 0
    assert agg.since_start("replica", "mini").counters["inputs"] == 7


def test_a_replica_forgotten_by_a_reset_keeps_its_counts_in_its_models_lifetime(agg):
    t = _at(agg, 1)
    agg.record("old", "replica", "mini", _batch(t, inputs=4), now=t)
    agg.record("new", "replica", "mini", _batch(t + 100, inputs=1), now=t + 100)
    agg.reset(now=t + 101)  # "old" has gone silent: it leaves /v1/performance
    assert [r["id"] for r in agg.snapshot(now=t + 101)["replicas"]] == ["new"]
    assert agg.since_start("replica", "mini").counters["inputs"] == 5


# The error rate


@pytest.mark.parametrize("statuses, rate", [({}, 0.0), ({"200": 3}, 0.0), ({"200": 1, "400": 1, "503": 2}, 0.75),
                                            ({"200": 2, "429": 1}, 1 / 3), ({"399": 1, "400": 1}, 0.5)])
def test_error_rate_is_statuses_of_400_and_above_over_all(statuses, rate):
    assert error_rate(statuses) == rate


def test_a_report_the_actor_refuses_is_logged_as_an_error_and_the_actor_kept(fake_actor, caplog):
    import asyncio

    import ray.exceptions

    from deployments.metrics import MetricsShipper

    refusal = ray.exceptions.RayTaskError("record", "UnknownEvent: no metric counts a X report", UnknownEvent("X"))

    async def refuse(*args, **kwargs):
        raise refusal

    fake_actor.record = type("Refusing", (), {"remote": staticmethod(refuse)})
    reporter = ReplicaReporter("m")
    shipper = MetricsShipper("app", reporter)
    reporter.record(_reports()[0])
    with caplog.at_level("ERROR", logger="ray.serve"):
        asyncio.run(shipper.flush())
    assert any(r.levelname == "ERROR" and "no metric counts a X report" in r.getMessage() for r in caplog.records)
    assert shipper._actor is fake_actor, "the actor answered: it is not looked up again"
