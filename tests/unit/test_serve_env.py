"""deployments.serve_env: the environment that `./run.sh serve` and the tests give Ray before it starts."""

import os
import subprocess
import sys
from pathlib import Path

from deployments import serve_env
from embserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_apply_sets_only_what_the_environment_lacks():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin"}
    added = serve_env.apply(environ)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in added
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the user's choice wins
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert added == {k: v for k, v in serve_env.FAST_PATH.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"}
    assert serve_env.missing(environ) == {}


def test_the_shell_gets_exports_it_can_eval():
    """What run.sh does: eval the module's output, then the variables are in the shell's environment."""
    env = {k: v for k, v in os.environ.items() if k not in serve_env.FAST_PATH}
    env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"
    script = (f'eval "$("{sys.executable}" -m deployments.serve_env)"; '
              'echo "$RAY_SERVE_ENABLE_HA_PROXY $RAY_SERVE_THROUGHPUT_OPTIMIZED $RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"')
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0", serve_env.FAST_PATH["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]]


def test_grpc_messages_hold_the_largest_request_and_answer_the_ingress_accepts():
    settings = Settings()
    limit = int(serve_env.FAST_PATH["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])
    assert limit > settings.max_body_bytes
    assert limit > settings.max_inputs_per_request * settings.max_input_chars  # texts, one byte a char at least
    assert limit > settings.max_inputs_per_request * 4096 * 4  # float32 vectors of a 4096-dim model


def test_every_fast_path_variable_is_documented_with_its_value():
    text = (ROOT / "docs" / "settings.md").read_text()
    for key, value in serve_env.FAST_PATH.items():
        assert f"| `{key}` | `{value}` |" in text
