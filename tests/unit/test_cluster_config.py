"""The scale-out configs (serve_config.yaml, cluster.yaml, k8s/rayservice.yaml) checked by Ray's own validators.

No Ray is started: the cluster launcher's schema, Serve's config schema and Serve's app builder all run offline.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deployments import serve_env

ROOT = Path(__file__).resolve().parents[2]
APP = "embserve"
EMBEDDER = "Embedder-all-MiniLM-L6-v2"
INGRESS = "Ingress"


def load(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


def app_of(config: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in config["applications"] if a["name"] == APP)


def deployment_of(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in app_of(config)["deployments"] if d["name"] == name)


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return load("serve_config.yaml")


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load("cluster.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load("k8s/rayservice.yaml")


# --- serve_config.yaml ---------------------------------------------------------------------------------


def test_serve_config_passes_ray_serve_schema(serve_config):
    schema = ServeDeploySchema.model_validate(serve_config)
    assert [a.name for a in schema.applications] == [APP]


def test_every_deployment_autoscales_and_none_pins_num_replicas(serve_config):
    for name in (INGRESS, EMBEDDER):
        d = deployment_of(serve_config, name)
        assert "num_replicas" not in d, f"{name}: num_replicas cannot go with autoscaling_config"
        scaling = d["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"], name
        assert scaling["upscale_delay_s"] < scaling["downscale_delay_s"], name


def test_embedder_batches_can_fill_under_its_concurrency_limits(serve_config):
    embedder = deployment_of(serve_config, EMBEDDER)
    batch = embedder["user_config"]["max_batch_size"]
    scaling = embedder["autoscaling_config"]
    # A replica never holds more than max_ongoing_requests: below max_batch_size a batch could never fill.
    assert embedder["max_ongoing_requests"] >= batch
    # The autoscaler aims at one full batch of one-text requests, below the replica's hard limit.
    assert scaling["target_ongoing_requests"] == batch
    assert scaling["target_ongoing_requests"] < embedder["max_ongoing_requests"]
    # A bounded queue: overload is a fast 503, not a growing wait.
    assert embedder["max_queued_requests"] >= 1


def test_ingress_scales_on_its_own_and_refuses_overload_with_retry_after(serve_config):
    ingress = deployment_of(serve_config, INGRESS)
    embedder = deployment_of(serve_config, EMBEDDER)
    assert ingress["autoscaling_config"] != embedder["autoscaling_config"]
    assert ingress["autoscaling_config"]["target_ongoing_requests"] <= ingress["max_ongoing_requests"]
    assert ingress["max_queued_requests"] >= 1
    assert ingress["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}


def test_gpus_come_only_from_the_num_gpus_setting(serve_config):
    assert app_of(serve_config)["args"]["num_gpus"] == 0  # a laptop runs the file as it is
    # ray_actor_options in the file would replace the dict the builder fills from num_gpus.
    assert "ray_actor_options" not in deployment_of(serve_config, EMBEDDER)


def test_builder_turns_num_gpus_into_a_gpu_per_replica_under_the_configured_names(serve_config):
    from ray.serve._private.build_app import build_app as build_serve_app

    from deployments.app import build_app
    from embserve.settings import Settings

    args = {**app_of(serve_config)["args"], "num_gpus": 1}
    built = build_serve_app(build_app(Settings(**args)), name=APP)
    options = {d.name: d.ray_actor_options for d in built.deployments}
    assert set(options) == {d["name"] for d in app_of(serve_config)["deployments"]}
    assert options[EMBEDDER]["num_gpus"] == 1
    assert not options[INGRESS].get("num_gpus")


# --- cluster.yaml --------------------------------------------------------------------------------------


def test_cluster_yaml_passes_the_cluster_launchers_validation(cluster):
    # What `ray up` does before it launches anything: fill in the provider's defaults, then validate.
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cluster_head_takes_no_replicas(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")
    assert any("--num-cpus=0" in cmd for cmd in cluster["head_start_ray_commands"])


def test_cluster_gpu_workers_scale_from_zero_up_to_the_embedders_max(cluster, serve_config):
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    max_replicas = deployment_of(serve_config, EMBEDDER)["autoscaling_config"]["max_replicas"]
    assert gpu[0]["min_workers"] == 0
    assert gpu[0]["max_workers"] == cluster["max_workers"] == max_replicas


def test_cluster_nodes_install_the_repo_with_the_pinned_ray_and_export_metrics(cluster):
    assert cluster["file_mounts"] == {"~/embserve": "."}
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "~/embserve" in setup
    assert f"ray[default]=={ray.__version__}" in setup
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert any("--metrics-export-port=8080" in cmd for cmd in commands)


# --- k8s/rayservice.yaml -------------------------------------------------------------------------------


def test_rayservice_is_a_kuberay_v1_rayservice_with_in_tree_autoscaling(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayservice_gpu_group_scales_from_zero_with_one_gpu_per_pod(rayservice, serve_config):
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert group["minReplicas"] == 0
    max_replicas = deployment_of(serve_config, EMBEDDER)["autoscaling_config"]["max_replicas"]
    assert group["maxReplicas"] == max_replicas


def test_rayservice_serve_config_is_serve_config_yaml_with_the_documented_differences(rayservice,
                                                                                      serve_config):
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "KubeRay takes serveConfigV2 as a YAML string"
    in_k8s = yaml.safe_load(text)
    ServeDeploySchema.model_validate(in_k8s)

    expected = copy.deepcopy(serve_config)
    app_of(expected)["args"]["num_gpus"] = 1
    expected["http_options"]["host"] = "0.0.0.0"
    assert in_k8s == expected


# --- Serve's fast path on every node ---------------------------------------------------------------------


def test_every_cluster_node_exports_the_fast_path_before_ray_starts(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert start.index("deployments.serve_env") < start.index("ray start")


def test_every_rayservice_pod_gets_the_fast_path_env(rayservice):
    spec = rayservice["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == serve_env.FAST_PATH
