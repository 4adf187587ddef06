"""`embserve serve` for real, as `./run.sh serve` runs it: a Ray of its own on free ports, a 200 from
/v1/embeddings, and nothing left once it stops, whether by SIGTERM or because its Ray was killed under it
(what `ray stop --force` does); and a refusal that names the holder when its port is taken."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from embserve.launch import install_stamp, procfs, serve_env, serving
from embserve.launch.ports import free_port, holder, is_free

pytestmark = [pytest.mark.integration, pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")]
ROOT = Path(__file__).resolve().parents[2]
AUX_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


def command(config: Path) -> list[str]:
    """`./run.sh serve CONFIG` where the venv's stamp says nothing needs installing (as under `./run.sh
    test`); else the `embserve serve` it would exec, so that a test never installs packages."""
    venv = Path(sys.prefix)
    stamp = install_stamp.read(venv)
    current = install_stamp.fingerprint((ROOT / "pyproject.toml").read_bytes(), sys.version)
    if install_stamp.satisfied(stamp, current, []):
        return ["bash", str(ROOT / "run.sh"), "serve", str(config)]
    return [str(venv / "bin" / "embserve"), "serve", str(config)]


@pytest.fixture
def server(tmp_path):
    """Starts `embserve serve` on a copy of serve_config.yaml with free ports; returns (process, port, env)."""
    port = free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    # A user's shell: without the Serve variables that the test session set for its own Ray, so that what the
    # run's Ray gets is what `embserve serve` sets.
    env = {k: v for k, v in os.environ.items() if k not in serve_env.SERVE_ENV}
    env.update(RAY_ADDRESS="local", EMBSERVE_VENV=sys.prefix, HF_HUB_OFFLINE="1",
               **{name: str(free_port()) for name in AUX_PORTS})
    log = (tmp_path / "embserve.log").open("w")
    started = []

    def start():
        proc = subprocess.Popen(command(path), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc, port, env

    yield start
    # A test that failed half-way still leaves nothing behind: what embserve stop does, for this run only.
    for proc in started:
        for run_dir, owner in serving.run_dirs().items():
            if owner == proc.pid:
                serving.stop_run(run_dir, owner, timeout_s=120)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    print((tmp_path / "embserve.log").read_text()[-3000:])


def wait_for_embeddings(proc, port: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    body = {"model": "all-MiniLM-L6-v2", "input": "The cat sits on the mat."}
    while time.monotonic() < deadline:
        assert proc.poll() is None, "embserve serve exited before serving"
        try:
            if httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("no 200 from /v1/embeddings")


def gone(pids, timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if procfs.alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def the_runs_processes(proc) -> tuple[set[int], dict[int, str]]:
    """The run's processes now, and its HAProxy processes with their config files (one snapshot: Ray replaces
    HAProxy by a new process on a reload)."""
    procs = procfs.processes()
    started = serving.descendants(procs, proc.pid)
    haproxies = {pid: serving.haproxy_config(procs[pid].argv) for pid in started}
    return started, {pid: config for pid, config in haproxies.items() if config}


def environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def ports_of(port: int, env) -> list[int]:
    return [port, *(int(env[name]) for name in AUX_PORTS)]


def still_taken(ports: list[int], timeout_s: float = 30) -> dict[int, str]:
    """Those of `ports` that something still listens on after `timeout_s`, with the process that holds each: a
    listening socket goes with the last process that holds it, and on a loaded box the run's last processes can
    take seconds to end after the run itself has."""
    deadline = time.monotonic() + timeout_s
    while (taken := [p for p in ports if not is_free("0.0.0.0", p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {p: holder(p) for p in taken}


def test_sigterm_stops_every_process_embserve_serve_started_and_frees_its_ports(server):
    proc, port, env = server()
    wait_for_embeddings(proc, port)
    started, haproxies = the_runs_processes(proc)
    assert haproxies, "Serve's fast path runs HAProxy"
    procs = procfs.processes()  # one snapshot: a short-lived worker of the run may end between two
    [controller] = [pid for pid in started if pid in procs and "ray::ServeController" in " ".join(procs[pid].argv)]
    assert environment(controller)["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    [run_dir] = {Path(config).parents[1] for config in haproxies.values()}
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    assert gone(started, 30) == set()  # a loaded box can take seconds to end a killed process
    assert still_taken(ports_of(port, env)) == {}
    assert not run_dir.exists()


def test_an_haproxy_whose_ray_is_killed_goes_at_once_and_the_port_is_free_again(server):
    """`ray stop --force` SIGKILLs Ray's processes: here only this run's, so that the session's Ray lives."""
    proc, port, env = server()
    wait_for_embeddings(proc, port)
    started, haproxies = the_runs_processes(proc)
    procs = procfs.processes()
    [serve_run] = [pid for pid in started if pid in procs and procs[pid].ppid == proc.pid and "run" in procs[pid].argv]
    for pid in started - haproxies.keys() - {serve_run}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The watcher looks every 0.5 s; a loaded box ending a dozen killed processes may take longer to stop it.
    assert gone(haproxies, 30) == set(), "HAProxy outlived its Ray"
    assert still_taken([port]) == {}  # the HTTP port, which HAProxy held
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    assert gone(started, 30) == set()  # a loaded box can take seconds to end a killed process


def test_embserve_stop_ends_serve_run_and_its_ray_after_embserve_serve_was_killed_outright(server):
    """SIGKILL gives embserve serve no chance to clean up: serve run and its Ray go on serving. `embserve stop`
    (here its per-run step, so that a developer's own server elsewhere is left alone) ends all of it."""
    proc, port, env = server()
    wait_for_embeddings(proc, port)
    started, _ = the_runs_processes(proc)
    [run_dir] = [d for d, owner in serving.run_dirs().items() if owner == proc.pid]
    proc.kill()
    proc.wait()
    assert httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"},
                      timeout=30).status_code == 200  # still serving, on its own
    done = serving.stop_run(run_dir, proc.pid, timeout_s=30)
    assert any(line.startswith("stopped serve run and its Ray") for line in done), done
    assert gone(started, 30) == set()
    assert still_taken(ports_of(port, env)) == {}
    assert not run_dir.exists()


def test_a_taken_port_is_refused_naming_the_process_that_holds_it(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        config["http_options"]["port"] = port
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, RAY_ADDRESS="local", **{name: str(free_port()) for name in AUX_PORTS})
        done = subprocess.run([str(Path(sys.prefix) / "bin" / "embserve"), "serve", str(tmp_path / "c.yaml")],
                              env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"port {port}, the HTTP port (http_options.port in the config), is taken by pid {os.getpid()} (" in done.stderr
    assert "Stop it" in done.stderr
