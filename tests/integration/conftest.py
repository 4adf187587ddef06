"""One local Ray cluster per test session; apps deployed from serve_config.yaml as `serve deploy` does."""

import asyncio
import copy
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import yaml

from embserve.launch.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
APP = "embserve"
# Ports of this session's own, so that a server already running (`./run.sh serve` on 8000, another test
# session) neither breaks the tests nor is answered in their place. Serve reads the fast path's fixed ports
# (HAProxy's stats and Prometheus pages, the fallback proxy) from the environment that Ray's processes
# inherit, so they are set before Ray starts.
PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"
for _name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
              "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
    os.environ[_name] = str(free_port())


def load_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def app_config(config: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in config["applications"] if a["name"] == APP)


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The config's entry for deployment `name`, added (empty) if the file does not name it, as a user
    would add one to override the builder's defaults."""
    entries = app_config(config).setdefault("deployments", [])
    found = next((d for d in entries if d["name"] == name), None)
    if found is None:
        found = {"name": name}
        entries.append(found)
    return found


def set_env(config: dict[str, Any], **env: str) -> None:
    """EMB_PROVIDER_* variables for the app's builder and replicas, as a shell would export them before
    `serve run`: the tests share one Ray, so they travel in the app's runtime_env."""
    runtime_env = app_config(config).setdefault("runtime_env", {})
    runtime_env.setdefault("env_vars", {}).update({f"EMB_PROVIDER_{k.upper()}": str(v) for k, v in env.items()})


EMBEDDER = "Embedder-all-MiniLM-L6-v2"


def fixed_replicas(config: dict[str, Any], n: int, **embedder_options: Any) -> None:
    """A fixed number of embedder replicas instead of autoscaling, so tests know where requests go."""
    embedder = deployment(config, EMBEDDER)
    embedder.pop("autoscaling_config", None)  # a CPU embedder's default is one replica, not autoscaled
    embedder.update(num_replicas=n, **embedder_options)


def deploy(config: dict[str, Any], timeout_s: float = 180) -> None:
    """Apply a Serve config to the running cluster, then wait until the app runs and answers."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {**config, "http_options": {**config.get("http_options", {}), "port": PORT}}
    schema = ServeDeploySchema.model_validate(config)
    _get_global_client().deploy_apps(schema)
    deadline = time.time() + timeout_s
    status = None
    while time.time() < deadline:
        app = serve.status().applications.get(APP)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            why = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
            raise RuntimeError(f"deploy failed: {app.message} " + " ".join(why))
        time.sleep(0.5)
    raise TimeoutError(f"app not running after {timeout_s}s (status {status})")


_handle_loop: asyncio.AbstractEventLoop | None = None


def ray_logs() -> str:
    """The logs folder of this session's Ray. Not /tmp/ray/session_latest: every Ray worker on the machine
    points that link at its own session when it starts, so another Ray here (a bench, a developer's server)
    can take it."""
    import ray._private.worker

    return ray._private.worker._global_node.get_logs_dir_path()


def call_deployment(method: str, deployment_name: str = EMBEDDER, app: str = APP, timeout_s: float = 60) -> Any:
    """`deployment_name.method()` on one replica, through a Serve handle, from the test process.

    The handle is used inside an event loop of its own: with Serve's fast path
    (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0) a handle cannot be used outside a running loop.
    """
    global _handle_loop
    from ray import serve

    if _handle_loop is None:
        _handle_loop = asyncio.new_event_loop()
        threading.Thread(target=_handle_loop.run_forever, name="serve-handles", daemon=True).start()

    async def call() -> Any:
        return await getattr(serve.get_deployment_handle(deployment_name, app), method).remote()

    return asyncio.run_coroutine_threadsafe(call(), _handle_loop).result(timeout_s)


def follow_coverage_into_ray_workers(config) -> None:
    """When pytest measures coverage, Ray's workers (started after this) measure it too."""
    if not getattr(config.option, "cov_source", None):
        return
    os.environ["EMBSERVE_COVERAGE_HOOK"] = str(ROOT / "tests" / "coverage_hook.py")
    os.environ["COVERAGE_PROCESS_START"] = str(ROOT / "pyproject.toml")
    os.environ["COVERAGE_FILE"] = str(ROOT / ".coverage")


@pytest.fixture(scope="session")
def ray_cluster(request):
    import ray
    from ray import serve

    follow_coverage_into_ray_workers(request.config)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_app(ray_cluster) -> Callable[..., dict[str, Any]]:
    """Deploy serve_config.yaml, optionally changed by `edit(config)`; the app is deleted after the module."""
    from ray import serve

    def _deploy(edit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        config = copy.deepcopy(load_config())
        if edit is not None:
            edit(config)
        deploy(config)
        return config

    yield _deploy
    serve.delete(APP)


@pytest.fixture(scope="module")
def client() -> httpx.Client:
    with httpx.Client(base_url=BASE, timeout=60) as c:
        yield c
