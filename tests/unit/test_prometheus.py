"""Prometheus exposition of the aggregate: parses with prometheus_client and says what the aggregate says."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from embserve.metrics.events import Admitted, Answered, Forward, Responded
from embserve.metrics.prometheus import render
from embserve.metrics.stats import Aggregate, Event


def _families(agg: Aggregate) -> dict:
    return {f.name: f for f in text_string_to_metric_families(render(agg).decode())}


def _value(family, sample_name: str, **labels) -> float:
    [value] = [s.value for s in family.samples if s.name == sample_name and s.labels == labels]
    return value


@pytest.fixture
def agg() -> Aggregate:
    agg = Aggregate()
    t = max(time.time(), agg.reset_at) + 1
    agg.record("r1", "replica", "mini", [
        Event(t, Admitted(requests=2, inputs=3, tokenize_s=0.001)),
        Event(t, Forward(inputs=3, tokens=90, padded_tokens=120, seconds=0.03)),
        Event(t, Answered(queue_s=0.002, error=None)),
        Event(t, Answered(queue_s=0.004, error=None)),
    ], gauges={"queue_size": 2}, now=t)
    agg.record("r2", "replica", "mini", [
        Event(t, Admitted(requests=1, inputs=40, tokenize_s=0.004)),
        Event(t, Forward(inputs=20, tokens=1500, padded_tokens=1600, seconds=0.2)),
        Event(t, Forward(inputs=20, tokens=1500, padded_tokens=1600, seconds=0.2)),
        Event(t, Answered(queue_s=0.02, error=None)),
    ], gauges={"queue_size": 1}, now=t)
    agg.record("i1", "ingress", None, [
        Event(t, Responded(200, 0.04, None)),
        Event(t, Responded(200, 0.6, None)),
        Event(t, Responded(400, 0.003, "InputTooLong")),
    ], now=t)
    return agg


def test_render_parses_as_prometheus_text(agg):
    families = _families(agg)
    for name in ("embserve_requests", "embserve_request_duration_seconds", "embserve_batch_inputs",
                 "embserve_batch_tokens", "embserve_padding_efficiency", "embserve_queue_size",
                 "embserve_inputs", "embserve_tokens", "embserve_padded_tokens", "embserve_errors",
                 "embserve_replicas"):
        assert name in families


def test_requests_total_is_counted_by_status(agg):
    fam = _families(agg)["embserve_requests"]
    assert fam.type == "counter"
    assert _value(fam, "embserve_requests_total", status="200") == 2
    assert _value(fam, "embserve_requests_total", status="400") == 1


def test_request_duration_is_a_cumulative_histogram(agg):
    fam = _families(agg)["embserve_request_duration_seconds"]
    assert fam.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 0
    assert buckets["0.005"] == 1
    assert buckets["0.05"] == 2
    assert buckets["1.0"] == 3 and buckets["+Inf"] == 3
    values = list(buckets.values())
    assert values == sorted(values), "bucket counts are cumulative"
    assert _value(fam, "embserve_request_duration_seconds_count") == 3
    assert _value(fam, "embserve_request_duration_seconds_sum") == pytest.approx(0.643)


def test_batch_histograms_count_inputs_and_padded_tokens_per_batch(agg):
    families = _families(agg)
    inputs, tokens = families["embserve_batch_inputs"], families["embserve_batch_tokens"]
    assert inputs.type == tokens.type == "histogram"
    assert _value(inputs, "embserve_batch_inputs_count", model="mini") == 2
    assert _value(inputs, "embserve_batch_inputs_sum", model="mini") == 43
    assert _value(inputs, "embserve_batch_inputs_bucket", le="4", model="mini") == 1
    assert _value(inputs, "embserve_batch_inputs_bucket", le="64", model="mini") == 2
    assert _value(tokens, "embserve_batch_tokens_sum", model="mini") == 3320
    assert _value(tokens, "embserve_batch_tokens_bucket", le="256", model="mini") == 1


def test_inputs_per_forward_is_its_own_histogram_beside_the_admissions(agg):
    """Two admissions (3 and 40 inputs) ran as three forwards (3, 20, 20): each histogram counts its own step."""
    forwards = _families(agg)["embserve_forward_inputs"]
    assert forwards.type == "histogram"
    assert _value(forwards, "embserve_forward_inputs_count", model="mini") == 3
    assert _value(forwards, "embserve_forward_inputs_sum", model="mini") == 43
    assert _value(forwards, "embserve_forward_inputs_bucket", le="4", model="mini") == 1
    assert _value(forwards, "embserve_forward_inputs_bucket", le="16", model="mini") == 1
    assert _value(forwards, "embserve_forward_inputs_bucket", le="32", model="mini") == 3


def test_counters_and_gauges_sum_the_replicas(agg):
    families = _families(agg)
    assert _value(families["embserve_inputs"], "embserve_inputs_total", model="mini") == 43
    assert _value(families["embserve_tokens"], "embserve_tokens_total", model="mini") == 3090
    assert _value(families["embserve_padded_tokens"], "embserve_padded_tokens_total", model="mini") == 3320
    assert _value(families["embserve_forwards"], "embserve_forwards_total", model="mini") == 3
    assert _value(families["embserve_batches"], "embserve_batches_total", model="mini") == 2
    assert _value(families["embserve_errors"], "embserve_errors_total", kind="InputTooLong") == 1
    eff = families["embserve_padding_efficiency"]
    assert eff.type == "gauge"
    assert _value(eff, "embserve_padding_efficiency", model="mini") == pytest.approx(3090 / 3320)
    assert _value(families["embserve_queue_size"], "embserve_queue_size", model="mini") == 3
    assert _value(families["embserve_replicas"], "embserve_replicas", model="mini") == 2


def test_stage_histograms_are_exposed(agg):
    families = _families(agg)
    assert _value(families["embserve_queue_duration_seconds"], "embserve_queue_duration_seconds_count",
                  model="mini") == 3
    assert _value(families["embserve_forward_duration_seconds"], "embserve_forward_duration_seconds_count",
                  model="mini") == 3  # one per forward
    assert _value(families["embserve_tokenize_duration_seconds"],
                  "embserve_tokenize_duration_seconds_count", model="mini") == 2


def test_render_matches_the_snapshot(agg):
    snap = agg.snapshot()
    families = _families(agg)
    assert _value(families["embserve_inputs"], "embserve_inputs_total", model="mini") == snap["totals"]["inputs"]
    assert _value(families["embserve_padding_efficiency"], "embserve_padding_efficiency",
                  model="mini") == pytest.approx(
        snap["padding_efficiency"], abs=1e-4)
    assert _value(families["embserve_queue_size"], "embserve_queue_size", model="mini") == snap["queue_size"]


def test_empty_aggregate_has_no_model_series_until_a_replica_reports():
    families = _families(Aggregate())
    for name in ("embserve_inputs", "embserve_padding_efficiency", "embserve_queue_size", "embserve_batch_inputs"):
        assert families[name].samples == [], name
    assert [s for s in families["embserve_requests"].samples] == []
    assert _value(families["embserve_request_duration_seconds"],
                  "embserve_request_duration_seconds_bucket", le="+Inf") == 0


def test_a_replica_that_reported_nothing_yet_has_zeros_and_full_efficiency(agg):
    agg.record("r3", "replica", "bge", [], gauges={"queue_size": 0}, now=time.time())
    families = _families(agg)
    assert _value(families["embserve_inputs"], "embserve_inputs_total", model="bge") == 0
    assert _value(families["embserve_padding_efficiency"], "embserve_padding_efficiency", model="bge") == 1.0
    assert _value(families["embserve_queue_size"], "embserve_queue_size", model="bge") == 0


def _counts(agg: Aggregate) -> dict:
    """Every sample of every counter and histogram, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in _families(agg).values()
            if f.type in ("counter", "histogram") for s in f.samples}


def test_a_reset_never_lowers_a_counter_or_histogram_sample(agg):
    before = _counts(agg)
    agg.reset()
    assert _counts(agg) == before, "a reset alone changes no counter"
    t = max(time.time(), agg.reset_at) + 1
    agg.record("r1", "replica", "mini", [Event(t, Admitted(requests=1, inputs=2, tokenize_s=0.001)),
                                         Event(t, Forward(inputs=2, tokens=20, padded_tokens=20, seconds=0.01))],
               now=t)
    agg.record("i1", "ingress", None, [Event(t, Responded(200, 0.02)), Event(t, Responded(503, 0.1, "Unavailable"))],
               now=t)
    after = _counts(agg)
    assert set(before) <= set(after)
    assert [k for k, v in before.items() if after[k] < v] == []
    families = _families(agg)
    assert _value(families["embserve_inputs"], "embserve_inputs_total", model="mini") == 43 + 2
    assert _value(families["embserve_requests"], "embserve_requests_total", status="200") == 2 + 1
    assert _value(families["embserve_request_duration_seconds"], "embserve_request_duration_seconds_count") == 3 + 2
    # ... while /v1/performance counts from the reset.
    snap = agg.snapshot(now=t)
    assert (snap["totals"]["inputs"], snap["http"]["requests_by_status"]) == (2, {"200": 1, "503": 1})


def test_after_a_reset_the_gauges_say_what_happened_since_and_replicas_stay_listed(agg):
    agg.reset()
    families = _families(agg)
    assert _value(families["embserve_error_rate"], "embserve_error_rate") == 0.0
    assert _value(families["embserve_padding_efficiency"], "embserve_padding_efficiency", model="mini") == 1.0
    assert _value(families["embserve_replicas"], "embserve_replicas", model="mini") == 2
    assert _value(families["embserve_queue_size"], "embserve_queue_size", model="mini") == 3


def test_error_rate_gauge_is_failed_over_all_requests(agg):
    fam = _families(agg)["embserve_error_rate"]
    assert fam.type == "gauge"
    assert _value(fam, "embserve_error_rate") == pytest.approx(1 / 3)


def test_error_rate_gauge_is_zero_with_no_requests():
    assert _value(_families(Aggregate())["embserve_error_rate"], "embserve_error_rate") == 0.0


def test_gpu_peak_fraction_gauge_is_the_highest_replica_peak_since_reset(agg):
    assert "embserve_gpu_memory_peak_fraction" not in _families(agg), "no GPU, no gauge"
    t = max(time.time(), agg.reset_at) + 1
    for sid, peak in (("r1", 250), ("r2", 600), ("r1", 100)):
        agg.record(sid, "replica", "mini", [], memory={"kind": "gpu", "allocated_bytes": 10, "reserved_bytes": 10,
                                                       "total_bytes": 1000, "peak_allocated_bytes": peak}, now=t)
    fam = _families(agg)["embserve_gpu_memory_peak_fraction"]
    assert fam.type == "gauge"
    assert _value(fam, "embserve_gpu_memory_peak_fraction") == pytest.approx(0.6)
    agg.reset()
    assert _value(_families(agg)["embserve_gpu_memory_peak_fraction"], "embserve_gpu_memory_peak_fraction") == 0.0


MODEL_SERIES = ("embserve_inputs", "embserve_tokens", "embserve_padded_tokens", "embserve_batches",
                "embserve_forwards", "embserve_queue_duration_seconds", "embserve_tokenize_duration_seconds",
                "embserve_forward_duration_seconds", "embserve_batch_inputs", "embserve_batch_tokens",
                "embserve_padding_efficiency", "embserve_queue_size", "embserve_replicas")


def test_every_replica_series_has_a_model_label_and_the_ingress_series_none(agg):
    agg.record("r3", "replica", "bge", [], gauges={"queue_size": 5}, now=time.time())
    families = _families(agg)
    for name in MODEL_SERIES:
        models = {s.labels["model"] for s in families[name].samples}
        assert models == {"mini", "bge"}, name
    for name in ("embserve_requests", "embserve_request_duration_seconds", "embserve_errors", "embserve_error_rate"):
        assert all("model" not in s.labels for s in families[name].samples), name


def test_each_model_counts_only_its_own_replicas(agg):
    agg.record("r3", "replica", "bge", [], gauges={"queue_size": 5}, now=time.time())
    families = _families(agg)
    assert _value(families["embserve_inputs"], "embserve_inputs_total", model="mini") == 43
    assert _value(families["embserve_inputs"], "embserve_inputs_total", model="bge") == 0
    assert _value(families["embserve_queue_size"], "embserve_queue_size", model="mini") == 3
    assert _value(families["embserve_queue_size"], "embserve_queue_size", model="bge") == 5
    assert _value(families["embserve_batch_inputs"], "embserve_batch_inputs_count", model="bge") == 0
    assert _value(families["embserve_replicas"], "embserve_replicas", model="bge") == 1


def test_model_series_agree_with_the_snapshots_models(agg):
    snap = agg.snapshot()["models"]["mini"]
    families = _families(agg)
    for key in ("inputs", "tokens", "padded_tokens", "batches", "forwards"):
        assert _value(families[f"embserve_{key}"], f"embserve_{key}_total", model="mini") == snap["totals"][key], key
    assert _value(families["embserve_padding_efficiency"], "embserve_padding_efficiency", model="mini") == \
        pytest.approx(snap["padding_efficiency"], abs=1e-4)
