"""Aggregated metrics through the real service: exact totals, per-replica sums, Prometheus, actor faults."""

import asyncio
import concurrent.futures as cf
import time

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import NAMESPACE, actor_name, ensure_metrics_actor
from tests.integration.conftest import APP, fixed_replicas
from tests.texts import mixed_texts

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"


def two_replicas(config) -> None:
    # Half a CPU each: two replicas beside the ingress on a 2-CPU cluster.
    fixed_replicas(config, 2, ray_actor_options={"num_cpus": 0.5})


@pytest.fixture(scope="module", autouse=True)
def config(serve_app):
    return serve_app(two_replicas)


def settle(client, until, timeout_s: float = 30.0) -> dict:
    """Replicas report every 0.5 s: poll until the figures say what `until` wants (or time out; a loaded box
    can hold a report up for seconds)."""
    deadline = time.time() + timeout_s
    while True:
        perf = client.get("/v1/performance").json()
        if until(perf) or time.time() > deadline:
            return perf
        time.sleep(0.25)


def load(client, requests: list[list[str]], concurrency: int = 8) -> None:
    def post(texts):
        r = client.post("/v1/embeddings", json={"model": MODEL, "input": texts, "truncate": True})
        assert r.status_code == 200, r.text

    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, requests))


def test_totals_after_reset_count_exactly_the_requests_and_inputs_sent(client):
    texts = mixed_texts(60, seed=21)
    requests = [texts[i : i + 1 + i % 3] for i in range(0, 50, 2)]  # 25 requests of 1-3 inputs
    n, m = len(requests), sum(len(r) for r in requests)
    assert client.post("/v1/performance/reset").status_code == 200
    load(client, requests)
    # A replica counts a request when it admits it and its inputs when their forward ends; the two can reach
    # the metrics actor in different reports (CI once read 25 requests with 46 of 49 inputs): wait for both.
    perf = settle(client, lambda p: p["totals"]["requests"] >= n and p["totals"]["inputs"] >= m)
    assert perf["totals"]["requests"] == n
    assert perf["totals"]["inputs"] == m
    assert perf["totals"]["errors"] == 0
    assert perf["http"]["requests_by_status"] == {"200": n}
    time.sleep(1.0)  # and nothing more arrives later
    assert client.get("/v1/performance").json()["totals"]["requests"] == n


def test_two_replicas_totals_are_the_sum_of_per_replica_figures(client):
    client.post("/v1/performance/reset")
    texts = mixed_texts(96, seed=22)
    load(client, [[t] for t in texts], concurrency=16)
    perf = settle(client, lambda p: p["totals"]["inputs"] >= len(texts))
    live = [r for r in perf["replicas"] if r["model"] == MODEL and r["last_seen_s_ago"] < 5]
    assert len(live) == 2
    for key in ("requests", "inputs", "tokens", "padded_tokens", "batches"):
        assert perf["totals"][key] == sum(r["totals"][key] for r in perf["replicas"]), key
    assert all(r["totals"]["inputs"] > 0 for r in live)  # Serve spread the load over both
    assert perf["models"][MODEL]["totals"]["inputs"] == len(texts)


def test_performance_reports_latency_stages_padding_and_memory(client):
    client.post("/v1/performance/reset")
    load(client, [[t] for t in mixed_texts(16, seed=23)])
    # A request's end is reported after its forward's: wait for every stage's reports.
    perf = settle(client, lambda p: p["totals"]["inputs"] >= 16 and p["latency_ms"]["queue"]["count"] >= 16
                  and p["latency_ms"]["request"]["count"] >= 16)
    assert 0 < perf["padding_efficiency"] <= 1
    assert perf["padding_efficiency"] == round(perf["totals"]["tokens"] / perf["totals"]["padded_tokens"], 4)
    lat = perf["latency_ms"]
    counts = {stage: lat[stage]["count"] for stage in ("request", "queue", "tokenize", "forward")}
    assert counts == {"request": 16, "queue": 16, "tokenize": perf["totals"]["batches"],
                      "forward": perf["totals"]["forwards"]}
    for stage in counts:
        assert lat[stage]["p50"] <= lat[stage]["p95"] <= lat[stage]["p99"] <= lat[stage]["max"], stage
    # Each request's time at the ingress holds its wait at the replica, so every order statistic does too.
    for q in ("p50", "p95", "max"):
        assert lat["request"][q] >= lat["queue"][q], q
    # Rates over the window the snapshot names: they give back the counts (window_s is rounded to 0.1 s).
    throughput = perf["throughput"]
    assert throughput["inputs_per_s"] * throughput["window_s"] == pytest.approx(16, rel=0.1)
    assert throughput["requests_per_s"] * throughput["window_s"] == pytest.approx(16, rel=0.1)
    assert perf["error_rate"] == 0.0
    assert perf["batch_inputs"]["count"] == perf["totals"]["batches"]
    assert perf["memory"]["process"]["rss_bytes"] > 50_000_000  # a replica holds a model


def test_errors_are_counted_by_kind(client):
    client.post("/v1/performance/reset")
    assert client.post("/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404
    assert client.post("/v1/embeddings", json={"model": MODEL, "input": ""}).status_code == 400
    assert client.post("/v1/embeddings", json={"model": MODEL, "input": "w " * 400}).status_code == 400
    perf = settle(client, lambda p: p["totals"]["errors"] >= 3)
    assert perf["totals"]["errors"] == 3
    assert perf["errors"] == {"ModelNotFound": 1, "InvalidRequest": 1, "InputTooLong": 1}
    assert perf["http"]["requests_by_status"] == {"404": 1, "400": 2}
    assert perf["error_rate"] == 1.0


def test_error_rate_is_failed_over_all_requests_in_performance_and_prometheus(client):
    client.post("/v1/performance/reset")
    good = [[t] for t in mixed_texts(7, seed=27)]
    load(client, good)
    bad = [{"model": "nope", "input": "x"}, {"model": MODEL, "input": ""}, {"model": MODEL, "input": []}]
    for body in bad:
        assert client.post("/v1/embeddings", json=body).status_code >= 400
    answered = len(good) + len(bad)
    perf = settle(client, lambda p: sum(p["http"]["requests_by_status"].values()) >= answered)
    assert sum(perf["http"]["requests_by_status"].values()) == answered
    assert perf["error_rate"] == round(len(bad) / answered, 4)
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    [rate] = [s.value for s in families["embserve_error_rate"].samples]
    assert rate == pytest.approx(len(bad) / answered)
    client.post("/v1/performance/reset")
    assert client.get("/v1/performance").json()["error_rate"] == 0.0


def scrape(client) -> dict:
    return {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}


def quiet_scrape(client, timeout_s: float = 15.0) -> dict:
    """A scrape once the reports of earlier traffic have all landed: two scrapes a shipping interval and a
    half apart (sources ship every 0.5 s) that count the same. A lifetime counter takes a report that was on
    its way when a test began, which /v1/performance's reset would have dropped."""
    last = scrape(client)
    deadline = time.monotonic() + timeout_s
    while True:
        time.sleep(0.75)
        now = scrape(client)
        if counts(now) == counts(last) or time.monotonic() > deadline:
            return now
        last = now


def counts(families: dict) -> dict:
    """Every counter and histogram sample (buckets, sums, counts), by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values()
            if f.type in ("counter", "histogram") for s in f.samples}


def sample(families: dict, family: str, name: str, **labels) -> float:
    return sum(s.value for s in families[family].samples if s.name == name and s.labels == labels)


def test_prometheus_metrics_parse_and_agree_with_performance(client):
    client.post("/v1/performance/reset")
    before = quiet_scrape(client)  # counters count since the actor started: compare what this test adds
    load(client, [[t] for t in mixed_texts(12, seed=24)])
    # The replicas report the inputs, the ingress the requests: wait for both reports.
    perf = settle(client, lambda p: p["totals"]["inputs"] >= 12 and sum(p["http"]["requests_by_status"].values()) >= 12)
    families = scrape(client)
    for name in ("embserve_requests", "embserve_request_duration_seconds", "embserve_queue_duration_seconds",
                 "embserve_tokenize_duration_seconds", "embserve_forward_duration_seconds",
                 "embserve_batch_inputs", "embserve_forward_inputs", "embserve_batch_tokens",
                 "embserve_padding_efficiency", "embserve_queue_size"):
        assert name in families, name

    def added(family: str, name: str, **labels) -> float:
        return sample(families, family, name, **labels) - sample(before, family, name, **labels)

    assert added("embserve_requests", "embserve_requests_total", status="200") == 12.0
    assert perf["http"]["requests_by_status"] == {"200": 12}
    # Per model; the ingress's requests have no model label. The app's metrics actor outlives the test
    # modules before this one, whose models may still be listed (with nothing counted since then).
    models = {s.labels["model"] for f in (before, families) for s in f["embserve_inputs"].samples}
    assert added("embserve_inputs", "embserve_inputs_total", model=MODEL) == 12.0
    assert sum(added("embserve_inputs", "embserve_inputs_total", model=m) for m in models) == 12.0
    assert added("embserve_request_duration_seconds", "embserve_request_duration_seconds_count") == 12.0
    # Every input ran in exactly one forward, and a forward held one input at least.
    assert added("embserve_forward_inputs", "embserve_forward_inputs_sum", model=MODEL) == 12.0
    assert 1 <= added("embserve_forward_inputs", "embserve_forward_inputs_count", model=MODEL) <= 12
    assert sample(families, "embserve_padding_efficiency", "embserve_padding_efficiency", model=MODEL) == \
        pytest.approx(perf["models"][MODEL]["padding_efficiency"], abs=1e-4)


def test_a_reset_zeroes_performance_but_prometheus_counters_keep_counting(client):
    first, second = [[t] for t in mixed_texts(10, seed=28)], [[t] for t in mixed_texts(6, seed=29)]
    quiet_scrape(client)  # earlier tests' reports have landed: what follows counts this test's only
    client.post("/v1/performance/reset")
    load(client, first)
    settle(client, lambda p: p["totals"]["inputs"] >= 10 and sum(p["http"]["requests_by_status"].values()) >= 10)
    before = scrape(client)
    assert client.post("/v1/performance/reset").status_code == 200
    perf = client.get("/v1/performance").json()
    assert perf["totals"]["inputs"] == perf["totals"]["requests"] == 0
    assert perf["http"]["requests_by_status"] == {}
    right_after = counts(scrape(client))
    assert [k for k, v in counts(before).items() if right_after.get(k, -1) < v] == [], "a reset lowered a counter"
    load(client, second)
    perf = settle(client, lambda p: p["totals"]["inputs"] >= 6 and sum(p["http"]["requests_by_status"].values()) >= 6)
    assert perf["totals"]["inputs"] == 6 and perf["http"]["requests_by_status"] == {"200": 6}
    after = scrape(client)
    assert [k for k, v in right_after.items() if counts(after).get(k, -1) < v] == []
    for family, name, labels in (("embserve_inputs", "embserve_inputs_total", {"model": MODEL}),
                                 ("embserve_requests", "embserve_requests_total", {"status": "200"}),
                                 ("embserve_request_duration_seconds", "embserve_request_duration_seconds_count", {})):
        assert sample(after, family, name, **labels) == sample(before, family, name, **labels) + 6, name


def test_serving_goes_on_while_the_metrics_actor_is_down_and_it_comes_back(client):
    actor = ray.get_actor(actor_name(APP), namespace=NAMESPACE)
    ray.kill(actor, no_restart=True)
    for text in mixed_texts(5, seed=25):
        r = client.post("/v1/embeddings", json={"model": MODEL, "input": text})
        assert r.status_code == 200
    # The next metrics call creates a fresh actor (a new worker process: on a loaded box it may outlast the
    # ingress's wait for one call, which answers 503, as a user would see it, until the actor is up);
    # replicas find it on their next report.
    deadline = time.monotonic() + 60
    while (reset := client.post("/v1/performance/reset")).status_code != 200 and time.monotonic() < deadline:
        assert reset.status_code == 503, reset.text
        time.sleep(1)
    assert reset.status_code == 200, reset.text
    load(client, [[t] for t in mixed_texts(6, seed=26)])
    perf = settle(client, lambda p: p["totals"]["inputs"] >= 6)
    assert perf["totals"]["inputs"] == 6


def test_ensure_metrics_actor_creates_an_actor_that_answers_and_keeps_profiles():
    # An application name of its own: this actor never meets the deployed app's figures.
    app = "embserve-ensure-test"
    assert asyncio.run(ensure_metrics_actor(app)) is True
    actor = ray.get_actor(actor_name(app), namespace=NAMESPACE)
    try:
        assert asyncio.run(ensure_metrics_actor(app)) is True, "a second call finds the same actor"
        profile = {"device": "cpu", "dtype": "float32", "forward_workers": 1, "sources": {"device": "auto"}}
        ray.get(actor.record.remote("r1", "replica", MODEL, [], None, {"kind": "process", "rss_bytes": 1},
                                    profile=profile))
        ray.get(actor.reset.remote())
        snap = ray.get(actor.snapshot.remote())
        assert snap["profile"] == {MODEL: profile}
        assert snap["replicas"][0]["profile"] == profile
    finally:
        ray.kill(actor, no_restart=True)
