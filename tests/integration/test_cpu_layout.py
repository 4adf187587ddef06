"""The CPU layout a user gets from the shipped file (docs/scaling.md, "A laptop"): one embedder replica
that takes every core, one single-thread forward per core, all fed from one queue."""

import concurrent.futures as cf
import os
import time

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


def test_a_query_goes_ahead_of_the_queued_groups_of_a_long_request(config, client, reference):
    """The long request's run queues about 24 groups (4 documents each) on the two forward workers; a
    query sent while they compute is ranked ahead of all but the groups already running, so it is back
    long before the long request, which alone would keep both workers busy for the rest of the time."""
    long_docs = [" ".join(mixed_texts(40, seed=s)) for s in range(96)]  # each cut to 256 tokens
    done = {}

    def post(name, inputs):
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": inputs, "truncate": True})
        done[name] = time.perf_counter()
        assert response.status_code == 200, response.text
        return np.array([d["embedding"] for d in response.json()["data"]])

    with cf.ThreadPoolExecutor(2) as pool:
        long_request = pool.submit(post, "long", long_docs)
        deadline = time.monotonic() + 30
        while call_deployment("describe")["forwards_waiting"] < 4:  # its run has queued its groups
            assert time.monotonic() < deadline, "the long request's groups never queued"
            time.sleep(0.05)
        sent = time.perf_counter()
        query = pool.submit(post, "query", ["how do I parse a date string"])
        vectors = query.result()
        long_request.result()
    # First come, first served, the query would wait for nearly every group: most of the long request's
    # remaining time. Ranked, it waits for one group at most.
    assert done["query"] - sent < (done["long"] - sent) / 2, (done["query"] - sent, done["long"] - sent)
    assert float(vectors[0] @ reference(["how do I parse a date string"])[0]) > 0.9999


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
