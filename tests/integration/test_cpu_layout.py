"""The CPU layout a user gets from the shipped file (docs/scaling.md, "A laptop"): one embedder replica
that takes every core, one single-thread forward per core, all fed from one queue."""

import concurrent.futures as cf
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import APP, EMBEDDER, call_deployment, deployment
from tests.texts import mixed_texts

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"


def small_token_budget(config) -> None:
    """Not part of the layout: a small token budget, so that a long request makes many small groups."""
    deployment(config, EMBEDDER)["user_config"] = {"max_batch_tokens": 1024}


@pytest.fixture(scope="module")
def config(serve_app):
    return serve_app(small_token_budget)


def test_the_shipped_cpu_layout_runs_one_single_thread_forward_per_core(config):
    from ray import serve

    replicas = serve.status().applications[APP].deployments[EMBEDDER].replica_states
    assert replicas.get("RUNNING") == 1, replicas
    described = call_deployment("describe")
    cores = len(os.sched_getaffinity(0))  # the replica runs on this machine
    assert (described["forward_workers"], described["threads_per_forward"]) == (cores, [1]), described
    assert described["profile"]["torch_threads"] == {"value": cores, "source": f"auto: {cores} cores visible to the replica"}


def test_the_replicas_threads_are_named_so_that_its_cpu_splits_by_thread(config, client):
    """bench.procs tells the replica's event loop, forward workers and helper threads from the runtime's by their
    OS names: one loop (where Serve runs the replica's code), one worker per forward worker, and the helpers that
    a health check and an admission of more than 20,000 characters ran on. A thread the loop starts after it is
    named (Serve's threads for sync methods such as `describe`) takes the loop's name, and counts as a helper."""
    from bench.procs import HELPER_THREAD, LOOP_THREAD, replica_thread_ticks
    from deployments.embedder import INLINE_CHARS

    texts = [f"passage {i}: " + "words of a long admission " * 10 for i in range(100)]
    assert sum(map(len, texts)) > INLINE_CHARS
    assert client.post("/v1/embeddings", json={"model": MODEL, "input": texts}).status_code == 200
    call_deployment("check_health")
    described = call_deployment("describe")
    pid = described["pid"]
    found = replica_thread_ticks(pid)
    kinds = sorted(kind for kind, _ in found.values())
    assert kinds.count("loop") == 1 and kinds.count("forward workers") == described["forward_workers"], kinds
    names = {}
    for tid in found:  # read again: a thread that ended since has no name to check
        try:
            names[tid] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            pass
    loop = next(tid for tid, (kind, _) in found.items() if kind == "loop")
    helpers = {tid: names[tid] for tid, (kind, _) in found.items() if kind == "helpers" and tid in names}
    assert any(name.startswith(HELPER_THREAD) for name in helpers.values()), helpers
    assert all(name.startswith(HELPER_THREAD) or (name == LOOP_THREAD and tid > loop)
               for tid, name in helpers.items()), (loop, helpers)


def test_the_shipped_cpu_replica_runs_openvino_with_a_stream_per_forward_worker_and_says_why(config, client):
    """`runtime: auto` on a CPU with openvino installed (a dependency): the profile in /v1/performance names
    the runtime, why, its precision and its streams, one per forward worker. The precision is bf16 where this
    CPU has a bf16 matrix unit (`dtype: auto`, the shipped default), f32 elsewhere."""
    from embserve.engine.model import cpu_bf16_choice, read_cpu_flags, torch_bf16_gemm_supported

    cores = len(os.sched_getaffinity(0))
    bf16, _ = cpu_bf16_choice(read_cpu_flags(), torch_bf16_gemm_supported())
    runtime = call_deployment("describe")["profile"]["runtime"]
    assert runtime["value"] == "openvino", runtime
    assert runtime["source"].startswith("auto: a CPU, and openvino is installed"), runtime
    assert f"{'bf16' if bf16 else 'f32'} precision, {cores} streams" in runtime["source"], runtime
    deadline = time.monotonic() + 10  # the replica's profile reaches the metrics actor with its next report
    while MODEL not in (profiles := client.get("/v1/performance").json()["profile"]):
        assert time.monotonic() < deadline, profiles
        time.sleep(0.2)
    assert profiles[MODEL]["runtime"] == runtime


def test_a_long_requests_groups_run_on_every_forward_worker_in_arrival_order(config, client, reference):
    """The long request queues about 24 groups (4 documents each, under the 1024-token budget); a query
    sent while they compute is answered after them: nothing overtakes an older input. Both workers take
    the long request's groups, so it takes about half of what one worker alone would."""
    long_docs = [" ".join(mixed_texts(40, seed=s)) for s in range(96)]  # each cut to 256 tokens
    done = {}

    def post(name, inputs):
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": inputs, "truncate": True})
        done[name] = time.perf_counter()
        assert response.status_code == 200, response.text
        return np.array([d["embedding"] for d in response.json()["data"]]), response.headers

    client.post("/v1/performance/reset")
    with cf.ThreadPoolExecutor(2) as pool:
        long_request = pool.submit(post, "long", long_docs)
        deadline = time.monotonic() + 30
        while call_deployment("describe")["pending_inputs"] < 16:  # its groups have queued
            assert time.monotonic() < deadline, "the long request's inputs never queued"
            time.sleep(0.05)
        sent = time.perf_counter()
        query = pool.submit(post, "query", ["how do I parse a date string"])
        vectors, query_headers = query.result()
        long_vectors, headers = long_request.result()
    # The query waited until every older input was taken: nearly all of the long request's remaining time.
    assert float(query_headers["x-embserve-queue-ms"]) / 1000 > 0.5 * (done["long"] - sent)
    assert float(vectors[0] @ reference(["how do I parse a date string"])[0]) > 0.9999
    cosines = np.sum(long_vectors * reference(long_docs), axis=1)
    assert cosines.min() > 0.9999, cosines.min()
    deadline = time.monotonic() + 10
    while (perf := client.get("/v1/performance").json())["totals"]["inputs"] < 97:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    # Both workers computed: the forwards' time adds up to well over the request's own compute time.
    forward = perf["latency_ms"]["forward"]
    assert forward["mean"] * forward["count"] > 1.5 * float(headers["x-embserve-inference-ms"])


def test_concurrent_forwards_give_the_reference_vectors(config, client, reference):
    texts = mixed_texts(48, seed=29)

    def embed(text):
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": text})
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["embedding"]

    with cf.ThreadPoolExecutor(16) as pool:
        got = np.array(list(pool.map(embed, texts)))
    cosines = np.sum(got * reference(texts), axis=1)
    assert cosines.min() > 0.9999, cosines.min()
