"""docs/scaling.md's CPU layout (one single-thread embedder replica per core), applied from the docs'
own yaml to serve_config.yaml and deployed: both replicas start and share the requests."""

import concurrent.futures as cf
import re
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import APP, EMBEDDER, app_config, call_deployment, deployment
from tests.texts import mixed_texts

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"
SCALING = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def docs_layout() -> dict:
    """The yaml block under "A laptop" that sets num_cpus for the embedder."""
    blocks = re.findall(r"```yaml\n(.*?)```", SCALING.read_text(), re.S)
    [block] = [b for b in blocks if "num_cpus: 0.5" in b]
    return yaml.safe_load(block)


def apply_layout(config) -> None:
    layout = docs_layout()
    app_config(config)["args"].update(layout["args"])
    [wanted] = layout["deployments"]
    embedder = deployment(config, wanted["name"])
    embedder["ray_actor_options"] = wanted["ray_actor_options"]
    embedder["autoscaling_config"].update(wanted["autoscaling_config"])


@pytest.fixture(scope="module")
def config(serve_app):
    return serve_app(apply_layout)


def test_the_documented_cpu_layout_runs_two_single_thread_replicas_that_share_the_load(config, client):
    assert deployment(config, EMBEDDER)["ray_actor_options"] == {"num_cpus": 0.5}
    from ray import serve

    replicas = serve.status().applications[APP].deployments[EMBEDDER].replica_states
    assert replicas.get("RUNNING") == 2, replicas

    def embed(text):
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": text})
        assert response.status_code == 200, response.text
        return len(response.json()["data"][0]["embedding"])

    with cf.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(embed, mixed_texts(64, seed=29))) == {384}
    seen = {}
    for _ in range(20):
        described = call_deployment("describe")
        seen[described["pid"]] = described["torch_threads"]
    assert len(seen) == 2 and set(seen.values()) == {1}, seen
