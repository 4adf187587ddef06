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

from embserve.launch import serve_env
from tests.built_apps import built, register

ROOT = Path(__file__).resolve().parents[2]
APP = "embserve"
EMBEDDER = "Embedder-all-MiniLM-L6-v2"
INGRESS = "Ingress"


def load(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


def app_of(config: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in config["applications"] if a["name"] == APP)


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


# What the builder makes of serve_config.yaml's args plus these settings, as `serve build` writes it.
VARIANTS = {"cluster_on_cpus": {}, "cluster_on_gpus": {"num_gpus": 1},
            "cluster_on_gpus_64": {"num_gpus": 1, "max_batch_size": 64},
            "cluster_two_models": {"models": [{"name": "a"}, {"name": "b"}]}}
register({name: {**app_of(load("serve_config.yaml"))["args"], **settings} for name, settings in VARIANTS.items()})


@pytest.fixture(scope="module")
def on_gpus() -> dict[str, Any]:
    return built("cluster_on_gpus")


def test_the_shipped_file_sets_nothing_the_environment_could_set(serve_config):
    """Every setting it named would shadow EMB_PROVIDER_* and .env; deployments it named would break
    when EMB_PROVIDER_MODEL_NAME renames the embedder."""
    app = app_of(serve_config)
    assert app["args"] == {} and "deployments" not in app and "runtime_env" not in app


def test_gpu_embedders_and_the_ingress_autoscale_on_their_own(on_gpus):
    for name in (INGRESS, EMBEDDER):
        scaling = on_gpus[name].autoscaling_config
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"], name
        assert scaling["upscale_delay_s"] < scaling["downscale_delay_s"], name
    assert on_gpus[INGRESS].autoscaling_config != on_gpus[EMBEDDER].autoscaling_config


def test_gpu_embedder_batches_can_fill_under_its_concurrency_limits(on_gpus):
    embedder = on_gpus[EMBEDDER]
    # A replica never holds more than max_ongoing_requests: below the largest batch a card can choose
    # (256 on a 24 GB card or more), a batch could never fill.
    assert embedder.max_ongoing_requests >= 256
    assert embedder.autoscaling_config["target_ongoing_requests"] < embedder.max_ongoing_requests
    assert embedder.max_queued_requests >= 1  # a bounded queue: overload is a fast 503


def test_gpu_embedders_scale_out_only_once_a_full_forward_is_in_flight_on_each_card():
    # A card is busy only when one full forward of one-text requests runs and the next one fills.
    for variant, largest in (("cluster_on_gpus", 256), ("cluster_on_gpus_64", 64)):
        embedder = built(variant)[EMBEDDER]
        assert embedder.autoscaling_config["target_ongoing_requests"] == largest
        assert embedder.max_ongoing_requests == 2 * largest


def test_a_cpu_app_runs_one_embedder_per_model_and_they_fit_beside_the_ingress_on_two_cores():
    one, two = built("cluster_on_cpus"), built("cluster_two_models")
    assert one[EMBEDDER].num_replicas == 1
    assert "autoscaling_config" not in one[EMBEDDER].model_fields_set  # a fixed number of replicas
    cpus = [d.ray_actor_options.num_cpus for d in two.values()]
    assert sorted(cpus) == [0.25, 0.5, 0.5] and sum(cpus) <= 2
    assert one[EMBEDDER].max_ongoing_requests >= 32


def test_ingress_refuses_overload_with_retry_after(on_gpus):
    ingress = on_gpus[INGRESS]
    assert ingress.autoscaling_config["target_ongoing_requests"] <= ingress.max_ongoing_requests
    assert ingress.max_queued_requests >= 1
    assert ingress.backpressure_config.model_dump() == {"status_code": 503, "retry_after_s": 1}


def test_builder_turns_num_gpus_into_a_gpu_per_replica(on_gpus):
    assert set(on_gpus) == {INGRESS, EMBEDDER}
    assert on_gpus[EMBEDDER].ray_actor_options.num_gpus == 1
    assert not on_gpus[INGRESS].ray_actor_options.num_gpus


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


def test_cluster_gpu_workers_scale_from_zero_up_to_the_embedders_max(cluster, on_gpus):
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    max_replicas = on_gpus[EMBEDDER].autoscaling_config["max_replicas"]
    assert gpu[0]["min_workers"] == 0
    assert gpu[0]["max_workers"] == cluster["max_workers"] == max_replicas


def test_cluster_nodes_install_the_repo_with_the_pinned_ray_and_export_metrics(cluster):
    assert cluster["file_mounts"] == {"~/embserve": "."}
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and '"$HOME/embserve[bulk]"' in setup  # quoted: no glob of [bulk]
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


def test_rayservice_gpu_group_scales_from_zero_with_one_gpu_per_pod(rayservice, on_gpus):
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert group["minReplicas"] == 0
    max_replicas = on_gpus[EMBEDDER].autoscaling_config["max_replicas"]
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
        assert start.index("embserve.launch.serve_env") < start.index("ray start")


def test_every_rayservice_pod_gets_the_fast_path_env(rayservice):
    spec = rayservice["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == serve_env.SERVE_ENV
