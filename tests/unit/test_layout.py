"""What the app asks Ray for, and the refusal on a cluster that could never give it."""

import pytest

from embserve.engine.layout import INGRESS_OPTIONS, embedder_options, is_fixed_size, needed, unmet
from embserve.settings import ModelSpec, Settings


def test_cpu_models_share_one_cpu_and_gpu_models_take_a_card_each():
    spec = ModelSpec(name="m")
    cpu = embedder_options(Settings(), spec, cpu_models=2)
    assert cpu["ray_actor_options"] == {"num_cpus": 0.5} and cpu["num_replicas"] == 1
    gpu = embedder_options(Settings(num_gpus=1), spec, cpu_models=0)
    assert gpu["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in gpu
    assert gpu["max_ongoing_requests"] == 512  # room for two of the largest batches a card may pick
    assert embedder_options(Settings(max_batch_size=100), spec, 1)["max_ongoing_requests"] == 200


def test_a_models_own_deployment_options_win_and_never_pair_replicas_with_autoscaling():
    spec = ModelSpec(name="m", deployment={"num_replicas": 3, "ray_actor_options": {"num_cpus": 2}})
    options = embedder_options(Settings(num_gpus=1), spec, cpu_models=0)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert {k: options["ray_actor_options"][k] for k in ("num_gpus", "num_cpus")} == {"num_gpus": 1, "num_cpus": 2}


def test_what_the_app_needs_counts_every_deployment_at_its_fewest_replicas():
    two = [embedder_options(Settings(), ModelSpec(name=n), 2) for n in "ab"]
    assert needed([INGRESS_OPTIONS, *two]) == {"CPU": 1.25, "GPU": 0.0}
    gpu = embedder_options(Settings(num_gpus=1), ModelSpec(name="g", deployment={"autoscaling_config": {"min_replicas": 2}}), 0)
    assert needed([gpu]) == {"CPU": 2.0, "GPU": 2.0}  # Serve's default of one CPU per replica


def test_a_fixed_cluster_that_lacks_resources_is_told_what_is_missing():
    assert unmet({"CPU": 1.25, "GPU": 0}, {"CPU": 2.0}) is None
    message = unmet({"CPU": 1.25, "GPU": 1}, {"CPU": 2.0})
    assert message.startswith("this application needs 1 GPUs (the cluster has 0)")


@pytest.mark.parametrize("status, fixed", [
    (None, None),
    ({"autoscaler_report": {}}, None),
    ({"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12"}}}, True),
    ({"autoscaler_report": {"node_type_mapping": {"ab12": "head", "cd34": "gpu_worker"}}}, False),
])
def test_a_cluster_without_node_types_to_launch_is_fixed(status, fixed):
    assert is_fixed_size(status) is fixed
