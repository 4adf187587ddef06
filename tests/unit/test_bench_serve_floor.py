"""bench serve-floor: the floor app's serve config, and that bench.procs counts its processes as it counts embserve's."""

from __future__ import annotations

import importlib

import yaml

from bench import procs
from bench.service import DEFAULT_CONFIG
from bench.studies.serve_floor import FLOOR_APP, floor_config


def role(title: str) -> str:
    return next((name for name, pattern in procs.ROLES if pattern.search(title)), "other ray")


def test_the_floor_config_keeps_the_shipped_http_and_proxy_options_and_serves_only_the_floor(tmp_path):
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for one in (False, True):
        config = yaml.safe_load(floor_config(DEFAULT_CONFIG, tmp_path / f"floor-{one}.yaml", one).read_text())
        assert config["http_options"] == shipped["http_options"]
        assert config["proxy_location"] == shipped["proxy_location"]
        assert config["applications"] == [{"name": "floor", "route_prefix": "/", "import_path": FLOOR_APP,
                                           "args": {"one_deployment": one}}]


def test_the_floor_apps_import_path_builds_both_arms_and_their_processes_get_embserves_roles():
    module_name, _, builder = FLOOR_APP.partition(":")
    module = importlib.import_module(module_name)
    build = getattr(module, builder)
    two, one = build({"one_deployment": False}), build({"one_deployment": True})
    assert type(two).__name__ == type(one).__name__ == "Application"
    # Ray titles a replica's process ray::ServeReplica:APP:DEPLOYMENT; the bench's roles must see the floor's as
    # the ingress and the replica, or its CPU per text would land in "other ray".
    assert role(f"ray::ServeReplica:floor:{module.Ingress.name}") == "ingress"
    assert role(f"ray::ServeReplica:floor:{module.Embedder.name}") == "replica"
