"""The builder's wiring without a running Ray: per-model deployments, options, and `serve build`."""

import subprocess
import sys
from pathlib import Path

import yaml
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app
from embserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def built_options(settings: Settings) -> dict:
    return {d.name: d for d in build_serve_app(build_app(settings), name="embserve").deployments}


def test_each_model_gets_its_own_embedder_deployment_behind_one_ingress():
    settings = Settings(models=[{"name": "a", "source": "bundled"}, {"name": "b/c", "source": "bundled"}])
    assert set(built_options(settings)) == {"Ingress", "Embedder-a", "Embedder-b-c"}


def test_a_models_own_ray_actor_options_keep_the_gpu_ask():
    settings = Settings(num_gpus=1, models=[
        {"name": "a", "deployment": {"ray_actor_options": {"num_cpus": 2}, "num_replicas": 3}}])
    embedder = built_options(settings)["Embedder-a"]
    assert embedder.ray_actor_options["num_gpus"] == 1 and embedder.ray_actor_options["num_cpus"] == 2
    assert embedder._deployment_config.num_replicas == 3


def test_queues_are_bounded_and_batches_can_fill_by_default():
    embedder = built_options(Settings(max_batch_size=48, max_queued_requests=7))["Embedder-all-MiniLM-L6-v2"]
    config = embedder._deployment_config
    assert config.max_ongoing_requests >= 48 and config.max_queued_requests == 7


def test_serve_build_writes_a_config_serve_accepts(tmp_path):
    out = tmp_path / "built.yaml"
    subprocess.run([sys.executable, "-m", "ray.serve.scripts", "build", "deployments.default_app:app",
                    "--app-dir", str(ROOT), "-o", str(out)], check=True, capture_output=True, cwd=tmp_path)
    config = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    names = {d.name for d in config.applications[0].deployments}
    assert names == {"Ingress", "Embedder-all-MiniLM-L6-v2"}
