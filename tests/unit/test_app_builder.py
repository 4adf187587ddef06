"""The builder's wiring without a running Ray, as `serve build` writes it: per-model deployments and options."""

from tests.built_apps import built, register

register({
    "builder_two_models": {"models": [{"name": "a", "source": "bundled"}, {"name": "b/c", "source": "bundled"}]},
    "builder_own_options": {"num_gpus": 1, "models": [
        {"name": "a", "deployment": {"ray_actor_options": {"num_cpus": 2}, "num_replicas": 3}}]},
    "builder_small_queue": {"max_batch_size": 48, "max_queued_requests": 7},
})


def test_each_model_gets_its_own_embedder_deployment_behind_one_ingress():
    assert set(built("builder_two_models")) == {"Ingress", "Embedder-a", "Embedder-b-c"}


def test_a_models_own_ray_actor_options_keep_the_gpu_ask():
    embedder = built("builder_own_options")["Embedder-a"]
    assert embedder.ray_actor_options.num_gpus == 1 and embedder.ray_actor_options.num_cpus == 2
    assert embedder.num_replicas == 3


def test_queues_are_bounded_and_batches_can_fill_by_default():
    embedder = built("builder_small_queue")["Embedder-all-MiniLM-L6-v2"]
    assert embedder.max_ongoing_requests >= 48 and embedder.max_queued_requests == 7


def test_serve_build_writes_a_config_serve_accepts_for_the_shipped_app():
    """`serve build deployments.default_app:app`, read back through Serve's own config schema."""
    assert set(built("default_app")) == {"Ingress", "Embedder-all-MiniLM-L6-v2"}
