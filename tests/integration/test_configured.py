"""What a user configures is what runs: the shipped serve_config.yaml, with EMB_PROVIDER_* variables (or a
.env) as a user sets them, observed through the service rather than through the parsed value.

The tests share one Ray, so the variables travel in the app's runtime_env, which Serve gives the builder
and every replica: what a shell's `export` gives them under `serve run`."""

import time
from pathlib import Path

import pytest
from openai import OpenAI

from embserve.engine.batching import plan_batches
from tests.doc_blocks import the_block
from tests.integration.conftest import BASE, app_config, call_deployment, deploy, load_config, set_env

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def start(serve_app):
    """Deploys the shipped file with `env` (EMB_PROVIDER_ names without the prefix) and returns the replica's
    profile, as /v1/performance and its start log show it."""
    def _start(**env: str) -> dict:
        serve_app(lambda config: set_env(config, **env))
        return call_deployment("describe")["profile"]
    return _start


def embed(client, texts) -> dict:
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": texts})
    assert response.status_code == 200, response.text
    return response


def performance(client, requests: int, inputs: int | None = None) -> dict:
    """/v1/performance once the replicas have reported `requests` and their `inputs` (they ship every
    0.5 s; an admission is reported before its forwards end)."""
    deadline = time.monotonic() + 15
    while True:
        perf = client.get("/v1/performance").json()
        totals = perf["totals"]
        if totals["requests"] >= requests and totals["inputs"] >= (inputs or requests) or time.monotonic() > deadline:
            return perf
        time.sleep(0.3)


def concurrent_single_texts(client, n: int = 24) -> dict:
    import concurrent.futures as cf

    client.post("/v1/performance/reset")
    texts = [f"sentence number {i} about batching" for i in range(n)]
    with cf.ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda t: embed(client, t), texts))
    return performance(client, n)


def one_request(client, texts) -> dict:
    client.post("/v1/performance/reset")
    embed(client, texts)
    return performance(client, 1, len(texts))["totals"]


def token_lengths(bundled_model, texts) -> list[int]:
    return [len(bundled_model.tokenizer(t)["input_ids"]) for t in texts]


SHORT_AND_LONG = ["a cat", "a dog", " ".join(["long words about many things"] * 10), " ".join(["more long words here"] * 12)]


def test_max_batch_size_from_the_environment_caps_every_batch(start, client):
    profile = start(max_batch_size=4)
    assert profile["max_batch_size"] == {"value": 4, "source": "set: environment EMB_PROVIDER_MAX_BATCH_SIZE"}
    # The metrics actor is up at deploy, and the replica's profile reaches it before any request.
    deadline = time.monotonic() + 10
    while client.get("/v1/performance").json()["profile"].get(MODEL) != profile:
        assert time.monotonic() < deadline, client.get("/v1/performance").json()["profile"]
        time.sleep(0.3)
    perf = concurrent_single_texts(client)
    assert 1 <= perf["batch_inputs"]["max"] <= 4


def test_enable_dynamic_batching_false_runs_every_request_alone(start, client):
    start(enable_dynamic_batching="false")
    perf = concurrent_single_texts(client)
    assert perf["batch_inputs"]["max"] == 1
    assert perf["totals"]["batches"] == perf["totals"]["requests"] == 24


def test_max_wait_time_ms_makes_a_lone_request_wait(start, client):
    profile = start(max_wait_time_ms=300)
    assert profile["max_wait_time_ms"]["value"] == 300
    queued = [float(embed(client, "a lone query").headers["x-embserve-queue-ms"]) for _ in range(2)]
    assert min(queued) >= 280, queued  # the batch waited for company that never came


def test_min_batch_size_merges_small_groups_into_one_forward(start, client, bundled_model):
    lengths = token_lengths(bundled_model, SHORT_AND_LONG)
    assert len(plan_batches(lengths, max_batch_tokens=8192)) == 2  # what the defaults would run
    start(min_batch_size=4)
    assert one_request(client, SHORT_AND_LONG)["forwards"] == 1


def test_enable_length_grouping_false_keeps_arrival_order_in_one_padded_forward(start, client, bundled_model):
    interleaved = [SHORT_AND_LONG[i] for i in (0, 2, 1, 3)]
    lengths = token_lengths(bundled_model, interleaved)
    start(enable_length_grouping="false")
    totals = one_request(client, interleaved)
    assert totals["forwards"] == 1
    assert totals["padded_tokens"] == 4 * max(lengths) > totals["tokens"] == sum(lengths)


def test_length_group_tolerance_zero_splits_inputs_of_different_lengths(start, client, bundled_model):
    texts = ["hello world", "hello big world"]  # one token apart: one group at the default tolerance
    assert len(plan_batches(token_lengths(bundled_model, texts), max_batch_tokens=8192)) == 1
    start(length_group_tolerance=0)
    assert one_request(client, texts)["forwards"] == 2


def test_device_from_the_environment_is_the_device_that_runs(start, client):
    profile = start(device="cpu")
    assert profile["device"] == {"value": "cpu", "source": "set: environment EMB_PROVIDER_DEVICE"}
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_device_cuda_without_a_gpu_fails_the_start_saying_why(ray_cluster):
    config = load_config()
    set_env(config, device="cuda")
    with pytest.raises(RuntimeError, match="torch sees no GPU"):
        deploy(config, timeout_s=240)


def test_another_model_needs_only_the_environment(serve_app, bundled_model):
    serve_app(lambda config: set_env(config, model=bundled_model.source, model_name="minilm-copy"))
    assert call_deployment("describe", "Embedder-minilm-copy")["profile"]["device"]["value"] == "cpu"
    oai = OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oai.models.list().data] == ["minilm-copy"]
    assert len(oai.embeddings.create(model="minilm-copy", input="hi").data[0].embedding) == 384


def test_a_dotenv_with_other_tools_keys_is_read_and_they_are_ignored(serve_app, tmp_path):
    (tmp_path / ".env").write_text("HF_TOKEN=hf_not_a_real_token\nEMB_PROVIDER_MIN_BATCH_SIZE=3\n")

    def from_dotenv(config):
        app_config(config)["runtime_env"] = {"working_dir": f"local://{tmp_path}"}  # cwd of the builder

    serve_app(from_dotenv)
    profile = call_deployment("describe")["profile"]
    assert profile["min_batch_size"] == {"value": 3, "source": "set: .env EMB_PROVIDER_MIN_BATCH_SIZE"}


def test_an_unknown_emb_provider_key_fails_the_start_naming_the_closest(ray_cluster):
    config = load_config()
    set_env(config, max_batch=8)
    with pytest.raises(RuntimeError, match="'EMB_PROVIDER_MAX_BATCH' in the environment; did you mean "
                                           "'EMB_PROVIDER_MAX_BATCH_SIZE'"):
        deploy(config)


def test_the_readmes_settings_example_takes_effect(serve_app, client):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [line] = [x for x in readme.splitlines() if x.startswith("EMB_PROVIDER_") and x.endswith("./run.sh serve")]
    env = dict(word.split("=", 1) for word in line.split() if word.startswith("EMB_PROVIDER_"))
    assert env == {"EMB_PROVIDER_MAX_BATCH_SIZE": "64", "EMB_PROVIDER_TRUNCATE": "true"}
    serve_app(lambda config: set_env(config, **{k.removeprefix("EMB_PROVIDER_"): v for k, v in env.items()}))
    assert call_deployment("describe")["profile"]["max_batch_size"]["value"] == 64
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": "word " * 400})
    assert response.status_code == 200, response.text  # cut to the model's maximum, not refused
    assert response.headers["x-embserve-prompt-tokens"] == "256"


def test_an_app_this_fixed_cluster_can_never_place_is_refused_saying_what_is_missing(ray_cluster):
    """The test cluster (2 CPUs, no GPU, no autoscaler) could never place a GPU replica: without the check
    the replica would wait for ever, with only Ray's warning every 30 s to show for it."""
    config = load_config()
    set_env(config, num_gpus=1)
    with pytest.raises(RuntimeError, match=r"needs 1 GPUs \(the cluster has 0\) to start, and this Ray cluster "
                                           r"cannot add nodes"):
        deploy(config)


def test_the_settings_pages_user_config_example_retunes_the_replica(serve_app):
    import yaml

    block = the_block("docs/settings.md", "yaml", "user_config:")
    [entry] = yaml.safe_load(block)["deployments"]
    serve_app(lambda config: app_config(config).setdefault("deployments", []).append(entry))
    described = call_deployment("describe")
    assert described["batching"]["max_batch_size"] == entry["user_config"]["max_batch_size"]
    assert described["effective_wait_s"] == entry["user_config"]["max_wait_time_ms"] / 1000
    assert described["profile"]["max_wait_time_ms"]["source"] == "set: serve_config.yaml user_config"
