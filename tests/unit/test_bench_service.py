"""bench.service starts what ships, `embserve serve CONFIG`, on a copy of the config that carries a bench's
port and settings; bench.ab's arms each run their own checkout's command and config."""

import json
import os
from pathlib import Path

import httpx
import pytest
import yaml

from bench.ab import arm_layout, checkout_dir, parse_variant
from bench.report import setup
from bench.service import (
    AUX_PORTS,
    DEFAULT_CONFIG,
    bench_config,
    cli_module,
    embserve_serve,
    serve_command,
    serve_env,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_config_is_the_one_that_ships():
    assert DEFAULT_CONFIG == ROOT / "serve_config.yaml"


def test_bench_config_sets_the_port_and_puts_settings_over_the_application_args():
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    base["applications"][0]["args"] = {"dtype": "float32", "torch_threads": 2}
    before = json.dumps(base, sort_keys=True)
    config = bench_config(base, 8123, {"torch_threads": 1, "enable_dynamic_batching": False})
    assert config["http_options"] == {**base["http_options"], "host": "127.0.0.1", "port": 8123}
    assert config["applications"][0]["args"] == {"dtype": "float32", "torch_threads": 1,
                                                 "enable_dynamic_batching": False}
    assert config["applications"][0]["import_path"] == base["applications"][0]["import_path"]
    assert json.dumps(base, sort_keys=True) == before  # the base is left as it was


def test_bench_config_of_a_config_without_args_or_http_options():
    config = bench_config({"applications": [{"name": "x", "import_path": "deployments.app:build_app"}]}, 9000, {})
    assert config["http_options"]["port"] == 9000
    assert config["applications"][0]["args"] == {}


def test_the_server_command_is_the_console_command_of_the_checkout(tmp_path: Path):
    assert serve_command(ROOT, Path("c.yaml"), python="py") == ["py", "-m", "embserve.launch.cli", "serve", "c.yaml"]
    older = tmp_path / "older"
    (older / "embserve").mkdir(parents=True)
    (older / "embserve" / "cli.py").write_text("")
    assert cli_module(older) == "embserve.cli"  # before embserve/launch/
    with pytest.raises(RuntimeError, match="too old"):
        cli_module(tmp_path)


def test_the_server_runs_its_checkouts_code_on_a_fresh_local_ray_with_free_aux_ports(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    ports = iter(range(30001, 30010))
    env = serve_env(Path("/checkout"), {"RAY_SERVE_ENABLE_HA_PROXY": "0"}, lambda: next(ports))
    assert env["PYTHONPATH"].split(":")[0] == "/checkout"
    assert env["RAY_ADDRESS"] == "local" and env["HF_HUB_OFFLINE"] == "1"
    assert sorted(int(env[name]) for name in AUX_PORTS) == [30001, 30002, 30003]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # a layout's environment wins


def test_an_ab_arm_serves_its_own_checkouts_config_with_the_variants_settings(tmp_path: Path):
    layout = arm_layout(tmp_path, {"dtype": "float32"})
    assert layout.config == tmp_path / "serve_config.yaml"
    assert layout.settings == {"dtype": "float32"}
    assert checkout_dir("here", tmp_path) == tmp_path


def test_a_variant_is_a_name_with_optional_settings_as_json():
    assert parse_variant("shipped defaults") == ("shipped defaults", {})
    assert parse_variant('one thread={"torch_threads": 1}') == ("one thread", {"torch_threads": 1})


def test_the_report_says_how_the_configurations_were_served():
    new = setup({"service": {"config": "serve_config.yaml", "tuned": "tuned.yaml", "fast_path": True}})
    assert "`embserve serve` of `serve_config.yaml`" in new and "`tuned.yaml` is the tuned layout" in new
    old = setup({"serve_env": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}})  # results.json of runs before embserve serve
    assert "build_app(Settings(...))" in old and "`RAY_SERVE_ENABLE_HA_PROXY=1`" in old


def test_an_arms_summary_gives_the_cpu_per_text_outside_the_replicas_runtime_threads():
    from bench.ab import summary

    def run(tps: float, split: dict | None) -> dict:
        cpu = {"by_role": {"replica": 1.4, "ingress": 0.2, "load generator": 0.1, "other ray": 0.1},
               "replica_threads": split}
        return {"c32": {"texts_per_s": tps, "cpu": cpu}, "single_query": {"latency_ms": {"p50": 9.0}}}

    split = {"loop": 0.15, "forward workers": 0.05, "runtime threads": 1.2}
    arm = summary([run(200.0, split), run(250.0, None)])
    # 1.8 cores in all less the 1.2 of the runtime's threads, over 200 texts/s: 3 ms per text.
    assert arm["outside_forward_ms_per_text"] == [3.0, None]
    assert arm["replica_threads_ms_per_text"] == [{"loop": 0.75, "forward workers": 0.25, "runtime threads": 6.0}, None]


def test_each_round_of_an_arm_is_held_against_the_in_process_limit_of_its_own_round():
    from bench.ab import summary

    def run(tps: float, replica: float, runtime: float) -> dict:
        cpu = {"by_role": {"replica": replica}, "replica_threads": {"loop": 0.0, "forward workers": 0.0,
                                                                    "runtime threads": runtime}}
        return {"c32": {"texts_per_s": tps, "cpu": cpu}, "single_query": {"latency_ms": {"p50": 9.0}}}

    limits = [{"texts_per_s": 400.0, "cpu_ms_per_text": 5.0, "lone_forward_ms": 4.0},
              {"texts_per_s": 500.0, "cpu_ms_per_text": 4.0}]
    arm = summary([run(200.0, 1.4, 1.2), run(250.0, 1.5, 1.0)], limits)
    # Round 1: 200 / 400 served, 7 ms of replica CPU per text / 5, its runtime's 6 / 5; round 2 against 500 and 4.
    assert arm["served_over_limit"] == [0.5, 0.5]
    assert arm["replica_cpu_over_limit"] == [1.4, 1.5]
    assert arm["runtime_threads_over_limit"] == [1.2, 1.0]
    assert arm["lone_p50_less_forward_ms"] == [5.0, None]  # a lone query at 9 ms served, its forward 4 in-process
    assert "served_over_limit" not in summary([run(200.0, 1.4, 1.2)])


def test_the_in_process_limit_is_the_best_batch_size_of_the_shipped_runtime_with_its_cpu_per_text():
    """On the real bundled model: the limit names the runtime and dtype it ran, and its CPU per text is this
    process's CPU over the pass's own window (its warm-up forward, outside the window's time, left out of its
    CPU too), so at that rate it kept at most every core busy."""
    from bench.ab import in_process_limit
    from bench.offline import OfflineModel, served_runtime

    model = OfflineModel(dtype="auto", runtime=served_runtime())
    texts = [f"query number {i} about {'long ' * (i % 7)}texts" for i in range(48)]
    limit = in_process_limit(model, texts, batch_sizes=(16,))
    assert (limit["runtime"], limit["batch_size"], limit["dtype"]) == (model.runtime, 16, model.model.info.dtype)
    cores_used = limit["cpu_ms_per_text"] * limit["texts_per_s"] / 1000
    assert 0 < cores_used <= (os.cpu_count() or 1) * 1.1, limit


def test_the_in_process_limit_keeps_the_batch_size_that_served_most_texts_per_second():
    from bench.ab import in_process_limit
    from bench.offline import OfflineResult

    class Passes:
        """Fixed passes by batch size: the choice among them is what is under test, not a model."""

        runtime = "openvino"

        def sorted_batches(self, texts, batch_size, threads, streams):
            seconds = {8: 2.0, 16: 1.0, 32: 1.5}[batch_size]
            return OfflineResult(texts=len(texts), tokens=10, padded_tokens=10, seconds=seconds, tokenize_s=0.0,
                                 batch_size=batch_size, threads=threads, streams=streams, dtype="bfloat16")

    assert in_process_limit(Passes(), ["a"] * 100, batch_sizes=(8, 16, 32))["batch_size"] == 16
    assert in_process_limit(Passes(), ["a"] * 100, batch_sizes=(8, 32))["batch_size"] == 32
    with pytest.raises(ValueError):
        in_process_limit(Passes(), ["a"], batch_sizes=())


def test_a_lone_querys_forward_in_process_is_timed_on_the_real_model(monkeypatch):
    import bench.ab as ab
    from bench.offline import OfflineModel, served_runtime

    monkeypatch.setattr(ab, "LONE_GAP_S", 0.0)  # the gap only cools the caches; a test need not wait for it
    p50 = ab.lone_forward_ms(OfflineModel(dtype="auto", runtime=served_runtime()), ["what is a vector", "why"])
    assert 0 < p50 < 5000


FAKE_CLI = """
import http.server, os, sys
from pathlib import Path
import yaml
count = Path(os.environ["FAKE_STARTS"])
starts = int(count.read_text() or 0) + 1 if count.exists() else 1
count.write_text(str(starts))
if starts <= int(os.environ["FAKE_FAILURES"]):
    print("cannot bind the stats port", flush=True)  # what a lost race for an auxiliary port ends in
    sys.exit(1)
port = yaml.safe_load(Path(sys.argv[2]).read_text())["http_options"]["port"]


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


@pytest.fixture
def flaky_checkout(tmp_path: Path, monkeypatch):
    """A checkout whose `embserve serve` fails its first FAKE_FAILURES starts, then answers /health."""
    (tmp_path / "embserve" / "launch").mkdir(parents=True)
    (tmp_path / "embserve" / "launch" / "cli.py").write_text(FAKE_CLI)
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump({"applications": [{"name": "a"}]}))
    monkeypatch.setenv("FAKE_STARTS", str(tmp_path / "starts"))
    return tmp_path


def test_a_server_whose_first_start_fails_is_started_again_and_stopped_after_the_block(flaky_checkout, monkeypatch,
                                                                                      capsys):
    from embserve.launch.ports import free_port, is_free

    monkeypatch.setenv("FAKE_FAILURES", "1")
    port = free_port()
    with embserve_serve(arm_layout(flaky_checkout, {}), port, checkout=flaky_checkout,
                        log=flaky_checkout / "log") as base_url:
        assert base_url == f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    assert (flaky_checkout / "starts").read_text() == "2"
    assert "start 1 of 2 exited before it was ready, trying again" in capsys.readouterr().err
    assert is_free("127.0.0.1", port)


def test_a_server_that_fails_every_start_raises_with_its_log_after_the_last(flaky_checkout, monkeypatch):
    from embserve.launch.ports import free_port

    monkeypatch.setenv("FAKE_FAILURES", "9")
    serving = embserve_serve(arm_layout(flaky_checkout, {}), free_port(), checkout=flaky_checkout,
                             log=flaky_checkout / "log", attempts=2)
    with pytest.raises(RuntimeError, match="exited with 1 before it was ready:\ncannot bind the stats port"), serving:
        pass
    assert (flaky_checkout / "starts").read_text() == "2"
    assert (flaky_checkout / "log").read_text().count("cannot bind the stats port") == 2  # the log keeps both tries


def test_a_server_that_is_not_ready_in_time_is_stopped_and_not_started_again(flaky_checkout, monkeypatch, capsys):
    from embserve.launch.ports import free_port, is_free

    monkeypatch.setenv("FAKE_FAILURES", "0")
    port = free_port()
    serving = embserve_serve(arm_layout(flaky_checkout, {}), port, checkout=flaky_checkout,
                             log=flaky_checkout / "log", ready_timeout_s=0.0)  # no Python answers that soon
    with pytest.raises(RuntimeError, match="not ready after 0 s"), serving:
        pass
    assert "trying again" not in capsys.readouterr().err  # a slow start is not a lost port: one try
    assert is_free("127.0.0.1", port)  # stopped


def test_a_server_start_needs_at_least_one_attempt(flaky_checkout):
    with pytest.raises(ValueError, match="at least 1"), embserve_serve(arm_layout(flaky_checkout, {}), 1, attempts=0):
        pass
