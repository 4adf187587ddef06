"""embserve.launch.serving: what `embserve serve` runs, the ports it checks, and that a run leaves no process behind.

The supervision is tested here with stand-ins (a fake `serve run` whose worker starts a fake HAProxy), in
seconds and without Ray; tests/integration/test_embserve_serve.py runs the real thing."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from embserve.launch import cli, procfs, serving
from embserve.launch.procfs import Proc
from embserve.launch.serving import Port

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the supervision reads /proc")


def test_http_options_as_serve_reads_them():
    assert serving.http_options({}, {}) == ("127.0.0.1", 8000)
    assert serving.http_options({"http_options": {"host": "0.0.0.0", "port": 8123}}, {}) == ("0.0.0.0", 8123)
    shipped = __import__("yaml").safe_load((ROOT / "serve_config.yaml").read_text())
    assert serving.http_options(shipped, {}) == ("127.0.0.1", 8000)


def test_the_fast_path_also_needs_haproxys_stats_and_prometheus_ports_and_the_fallback_proxys():
    config = {"http_options": {"port": 8123}}
    assert [p.port for p in serving.ports_needed(config, {})] == [8123]
    fast = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": "18404"}
    assert [p.port for p in serving.ports_needed(config, fast)] == [8123, 18404, 9101, 8500]


def test_a_taken_port_is_refused_naming_its_holder():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = serving.taken([Port("127.0.0.1", port, "the HTTP port"), Port("127.0.0.1", 0, "any")])
    [(p, who)] = busy
    message = serving.refusal(busy)
    assert f"port {port}, the HTTP port, is taken by {who}" in message and "embserve stop" in message
    if sys.platform == "linux":
        assert f"pid {os.getpid()}" in who


def test_serve_environment_adds_the_fast_path_and_this_runs_haproxy_folder_and_keeps_what_is_set(tmp_path):
    env = serving.serve_environment({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "PATH": "/bin",
                                     "RAY_SERVE_HAPROXY_BINARY_PATH": "/opt/haproxy"}, tmp_path)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == str(tmp_path / "haproxy.cfg")
    assert env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == str(tmp_path)
    assert set(serving.HAPROXY_FILES) <= set(env)


def test_the_haproxy_file_variables_are_those_ray_reads():
    from ray.serve._private import constants

    assert all(hasattr(constants, key) for key in serving.HAPROXY_FILES)


def test_serve_command_is_the_venvs_serve_run(tmp_path):
    assert serving.serve_command("c.yaml", ["--address", "auto"])[-4:] == ["run", "c.yaml", "--address", "auto"]
    python = tmp_path / "python"
    assert serving.serve_command("c.yaml", python=str(python))[:2] == [str(python), "-c"]  # no serve script there
    (tmp_path / "serve").write_text("#!/bin/sh\n")
    (tmp_path / "serve").chmod(0o755)
    assert serving.serve_command("c.yaml", python=str(python)) == [str(tmp_path / "serve"), "run", "c.yaml"]


def test_haproxies_of_a_run_are_told_apart_by_their_config_folder_and_orphans_by_their_parent(tmp_path):
    run = tmp_path / "embserve-abc"
    procs = {
        1: Proc(1, 0, "S", ("/sbin/init",)),
        10: Proc(10, 1, "S", ("embserve",)),
        11: Proc(11, 10, "S", ("serve", "run")),
        12: Proc(12, 11, "S", ("ray::HAProxyManager",)),
        13: Proc(13, 12, "S", ("/x/haproxy", "-db", "-f", f"{run}/node/haproxy.cfg")),  # managed
        14: Proc(14, 10, "S", ("/x/haproxy", "-db", "-f", f"{run}/node/haproxy.cfg", "-sf", "13")),  # orphan
        15: Proc(15, 1, "S", ("/x/haproxy", "-f", f"{tmp_path}/embserve-abcd/node/haproxy.cfg")),  # another run
        16: Proc(16, 1, "S", ("/usr/sbin/haproxy", "-f", "/etc/haproxy/haproxy.cfg")),  # a stranger's
        17: Proc(17, 10, "Z", ("/x/haproxy", "-f", f"{run}/node/haproxy.cfg")),  # gone
        18: Proc(18, 11, "S", ("/bin/cat", "-f", f"{run}/node/haproxy.cfg")),  # not an HAProxy
    }
    assert serving.descendants(procs, 10) == {11, 12, 13, 14, 17, 18}
    assert serving.haproxy_config(procs[16].argv) == "/etc/haproxy/haproxy.cfg"
    assert serving.haproxy_config(("haproxy", "-db")) is None
    assert serving.run_haproxies(procs, run) == {13, 14}
    parent_of = {pid: p.ppid for pid, p in procs.items()}.get
    assert serving.orphaned(procs, {13, 14}, 11, parent_of) == {14}
    assert serving.orphaned(procs, {13, 14, 99}, 11, parent_of) == {14}  # 99 is gone: nothing to stop
    looped = {13: Proc(13, 12, "S", ()), 12: Proc(12, 13, "S", ())}
    assert serving.orphaned(looped, {13}, 11, lambda pid: looped[pid].ppid) == {13}  # a loop ends the walk
    # An ancestor gone, or unreadable, on the way up is no proof: nothing is stopped until a look can tell.
    assert serving.orphaned(procs, {13}, 11, lambda pid: None) == set()

    def unreadable(pid):
        raise PermissionError(pid)
    assert serving.orphaned(procs, {13}, 11, unreadable) == set()


def test_named_reads_the_command_lines_of_the_processes_whose_executable_has_the_name(tmp_path):
    for pid, name, ppid, argv in ((7, b"haproxy", 3, b"/x/haproxy\0-f\0/r/haproxy.cfg\0"),
                                  (8, b"python3.11", 1, b"python\0-m\0haproxy\0"),
                                  (9, b"my (haproxy) x", 7, b"odd\0"),
                                  (11, b"ray-serve-hapro", 1, b"/opt/ray-serve-haproxy\0"),  # cut to 15 bytes
                                  (12, b"caf\xe9", 1, b"cafe\0")):  # a name that is not UTF-8
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_bytes(b"%d (%s) S %d %d %d 0 -1 4194560" % (pid, name, ppid, pid, pid))
        (tmp_path / str(pid) / "cmdline").write_bytes(argv)
    (tmp_path / "self").mkdir()
    (tmp_path / "10").mkdir()  # gone while it was read: no stat
    assert procfs.named("haproxy", tmp_path) == {
        7: Proc(7, 3, "S", ("/x/haproxy", "-f", "/r/haproxy.cfg"), 7),
        9: Proc(9, 7, "S", ("odd",), 9),
        11: Proc(11, 1, "S", ("/opt/ray-serve-haproxy",), 11)}
    assert procfs.processes(tmp_path).keys() == {7, 8, 9, 11, 12}
    assert procfs.parent(9, tmp_path) == 7 and procfs.parent(10, tmp_path) is None
    assert procfs.parent(12, tmp_path) == 1


def test_processes_reads_this_process_from_proc():
    if sys.platform != "linux":
        pytest.skip("reads /proc")
    me = procfs.processes()[os.getpid()]
    assert me.ppid == os.getppid() and me.state in "RS" and "python" in me.argv[0]


# A stand-in for `serve run`: a "worker" (like Ray's HAProxyManager) starts an "HAProxy" whose command line
# names a config file in the run's folder; the pids go to a file. On SIGINT it exits and leaves them
# running (as `serve run` does when Ray is killed under it), or ignores SIGINT when asked to. In mode
# "reloading" the worker answers SIGTERM as Ray's manager can while replicas go: it starts a new HAProxy
# (`-sf OLD`), writes that pid to OUT.reloaded, then exits.
FAKE_WORKER = textwrap.dedent("""
    import signal, subprocess, sys, time
    out, mode, haproxy = sys.argv[1], sys.argv[2], sys.argv[3:]
    p = subprocess.Popen(haproxy)
    print(p.pid, flush=True)

    def reload(*_):
        q = subprocess.Popen([*haproxy, "-sf", str(p.pid)])
        with open(out + ".reloaded", "w") as f:
            f.write(str(q.pid))
        sys.exit(0)
    if mode == "reloading":
        signal.signal(signal.SIGTERM, reload)
    time.sleep(120)
""")
FAKE_SERVE = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    out, run_dir, mode = sys.argv[1:4]
    # An executable named haproxy (a link to Python): the watcher looks for HAProxy by the executable's name.
    exe = os.path.join(os.path.dirname(out), "bin", "haproxy")
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    if not os.path.lexists(exe):
        os.symlink(sys.executable, exe)
    haproxy = [exe, "-c", "import time; time.sleep(120)", "-f", run_dir + "/node/haproxy.cfg"]
    worker = subprocess.Popen([sys.executable, "-c", WORKER, out, mode, *haproxy], stdout=subprocess.PIPE,
                              text=True)
    haproxy_pid = int(worker.stdout.readline())
    with open(out, "w") as f:
        json.dump({"serve": os.getpid(), "worker": worker.pid, "haproxy": haproxy_pid}, f)
    if mode == "deaf":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(120)
""").replace("WORKER", repr(FAKE_WORKER))

SUPERVISE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from embserve.launch.serving import Run
    fake, out, run_dir, mode, grace = sys.argv[1:6]
    if mode == "threaded":
        # A thread that exists before Run.start, as coverage's saver or a library's would, and that takes
        # the SIGTERM itself once the fake serve run is up.
        import signal, threading, time

        def take_sigterm():
            while not Path(out).exists() or not Path(out).read_text():
                time.sleep(0.05)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        threading.Thread(target=take_sigterm, daemon=True).start()
        mode = "leaky"
    run = Run([sys.executable, fake, out, run_dir, mode], {}, Path(run_dir), float(grace))
    run.command[0] = sys.executable
    import os
    run.env = dict(os.environ)
    run.start()
    try:
        status = run.wait()
    finally:
        run.clean_up()
    sys.exit(status)
""")


@pytest.fixture
def supervise(tmp_path, request):
    """Starts Run over the fake `serve run` in a process of its own (it blocks signals); returns it and a
    function that reads the fake's pids once they are written."""
    (tmp_path / "fake_serve.py").write_text(FAKE_SERVE)
    (tmp_path / "supervise.py").write_text(SUPERVISE)
    run_dir = tmp_path / "embserve-run"
    run_dir.mkdir()
    out = tmp_path / "pids.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if getattr(request.config.option, "cov_source", None):
        env.update(COVERAGE_PROCESS_START=str(ROOT / "pyproject.toml"), COVERAGE_FILE=str(ROOT / ".coverage"))
    started = []

    def start(mode: str = "leaky", grace_s: float = 2.0):
        proc = subprocess.Popen([sys.executable, str(tmp_path / "supervise.py"), str(tmp_path / "fake_serve.py"),
                                 str(out), str(run_dir), mode, str(grace_s)], env=env, stderr=subprocess.PIPE,
                                text=True)
        started.append(proc)
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        return proc, json.loads(out.read_text()), run_dir

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()


def wait_gone(pids, timeout_s: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if procfs.alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_leaves_no_process_of_the_run_and_no_folder(supervise, sig):
    proc, pids, run_dir = supervise()
    assert all(procfs.alive(p) for p in pids.values())
    proc.send_signal(sig)
    assert proc.wait(30) != 0  # the fake serve run died of the SIGINT it was sent
    assert wait_gone(pids.values(), 1) == set()
    assert not run_dir.exists()
    err = proc.stderr.read()
    assert f"{sig.name}: asking serve run" in err and "stopping what the run left" in err


@linux_only
def test_a_stop_signal_that_another_thread_takes_still_stops_the_run_cleanly(supervise):
    """The signal mask is per thread: a thread started earlier gets the SIGTERM, and it must not end
    `embserve serve` before it has stopped `serve run` (it did, under coverage's saver thread)."""
    proc, pids, run_dir = supervise(mode="threaded")
    assert proc.wait(30) != 0
    assert wait_gone(pids.values(), 1) == set()
    assert not run_dir.exists()
    err = proc.stderr.read()
    assert "SIGTERM: asking serve run" in err and "stopping what the run left" in err


@linux_only
def test_an_haproxy_whose_manager_dies_is_stopped_while_the_run_goes_on(supervise):
    """What `ray stop --force` does to the HAProxyManager's worker: HAProxy comes to the subreaper."""
    proc, pids, _ = supervise()
    os.kill(pids["worker"], signal.SIGKILL)
    assert wait_gone([pids["haproxy"]], 30) == set()
    assert proc.poll() is None and procfs.alive(pids["serve"])
    proc.terminate()
    proc.wait(30)
    assert "lost its Ray manager" in proc.stderr.read()


@linux_only
def test_a_serve_run_that_will_not_stop_is_terminated_after_the_grace_period(supervise):
    proc, pids, _ = supervise(mode="deaf", grace_s=1)
    started = time.monotonic()
    proc.terminate()
    proc.wait(30)
    assert time.monotonic() - started < 20  # the 1 s grace, SIGTERM, the clean-up; 60 s would mean no escalation
    assert wait_gone(pids.values(), 1) == set()
    assert "SIGTERM to its process group" in proc.stderr.read()


@linux_only
def test_a_second_signal_kills_at_once(supervise):
    proc, pids, _ = supervise(mode="deaf", grace_s=60)
    proc.terminate()
    time.sleep(0.5)
    proc.terminate()
    proc.wait(15)
    assert wait_gone(pids.values(), 1) == set()
    assert "again: killing" in proc.stderr.read()


@linux_only
def test_embserve_stop_stops_a_run_and_the_haproxy_a_killed_run_left(supervise, tmp_path):
    proc, pids, run_dir = supervise()
    # As if `embserve serve` had written its pid (the fake's supervisor has "embserve" in its command line).
    (run_dir / serving.OWNER_FILE).write_text(str(proc.pid))
    assert any("stopped embserve serve" in line for line in serving.stop(base=tmp_path, timeout_s=30))
    assert wait_gone(pids.values(), 1) == set() and not run_dir.exists()


@linux_only
def test_embserve_stop_stops_haproxy_left_by_a_run_killed_with_sigkill(supervise, tmp_path):
    proc, pids, run_dir = supervise()
    (run_dir / serving.OWNER_FILE).write_text(str(proc.pid))
    (run_dir / serving.SERVE_RUN_FILE).unlink()  # as a run of an embserve that did not write it
    proc.kill()  # no clean-up: the fake serve run, its worker and HAProxy go on
    proc.wait()
    os.kill(pids["serve"], signal.SIGKILL)
    os.kill(pids["worker"], signal.SIGKILL)
    assert procfs.alive(pids["haproxy"])
    done = serving.stop(base=tmp_path, timeout_s=5)
    assert done == [f"stopped HAProxy [{pids['haproxy']}] left by an earlier embserve serve"]
    assert wait_gone([pids["haproxy"]], 1) == set() and not run_dir.exists()
    assert serving.stop(base=tmp_path) == []


@linux_only
def test_embserve_stop_stops_serve_run_and_everything_in_its_session_after_embserve_serve_was_killed(supervise, tmp_path):
    """SIGKILL gives embserve serve no chance to clean up: `serve run` and its Ray go on serving. They share
    the session embserve serve gave `serve run`, which embserve stop finds from the pid the run wrote."""
    proc, pids, run_dir = supervise()
    (run_dir / serving.OWNER_FILE).write_text(str(proc.pid))
    assert (run_dir / serving.SERVE_RUN_FILE).read_text() == str(pids["serve"])
    proc.kill()
    proc.wait()
    assert all(procfs.alive(p) for p in pids.values())
    done = serving.stop(base=tmp_path, timeout_s=5)
    assert done == ["stopped serve run and its Ray (2 processes) left by an earlier embserve serve",
                    f"stopped HAProxy [{pids['haproxy']}] left by an earlier embserve serve"]
    assert wait_gone(pids.values(), 1) == set() and not run_dir.exists()


def reloaded(tmp_path) -> int:
    return int((tmp_path / "pids.json.reloaded").read_text())


@linux_only
def test_an_haproxy_that_ray_starts_while_the_run_stops_is_stopped_too(supervise, tmp_path):
    """Ray's HAProxy manager reloads (a new HAProxy process) when replicas go, and so may while it is stopped:
    the clean-up ends Ray first, then looks again for HAProxy."""
    proc, pids, run_dir = supervise(mode="reloading")
    proc.terminate()
    proc.wait(30)
    assert wait_gone([*pids.values(), reloaded(tmp_path)], 1) == set()
    assert not run_dir.exists()


@linux_only
def test_embserve_stop_also_stops_the_haproxy_that_ray_starts_while_it_is_stopped(supervise, tmp_path):
    """What failed once in CI: after `embserve serve` was SIGKILLed, `embserve stop` ended every process it had
    seen, and a new HAProxy, started by Ray's manager on its way down, held the port."""
    proc, pids, run_dir = supervise(mode="reloading")
    (run_dir / serving.OWNER_FILE).write_text(str(proc.pid))
    proc.kill()
    proc.wait()
    done = serving.stop(base=tmp_path, timeout_s=5)
    new = reloaded(tmp_path)
    assert done == ["stopped serve run and its Ray (2 processes) left by an earlier embserve serve",
                    f"stopped HAProxy {sorted([pids['haproxy'], new])} left by an earlier embserve serve"]
    assert wait_gone([*pids.values(), new], 1) == set() and not run_dir.exists()


def test_a_session_counts_only_where_the_run_wrote_it_and_ray_or_serve_runs_in_it(tmp_path):
    procs = {10: procfs.Proc(10, 1, "S", ("/venv/bin/serve", "run", "c.yaml"), sid=10),
             11: procfs.Proc(11, 10, "S", ("ray::ServeReplica",), sid=10),
             12: procfs.Proc(12, 11, "Z", ("",), sid=10),
             20: procfs.Proc(20, 1, "S", ("vim",), sid=20)}
    assert serving.run_session(procs, tmp_path) == set()  # no pid written
    (tmp_path / serving.SERVE_RUN_FILE).write_text("10")
    assert serving.run_session(procs, tmp_path) == {10, 11}
    (tmp_path / serving.SERVE_RUN_FILE).write_text("20")  # a pid now another's session: not the run's
    assert serving.run_session(procs, tmp_path) == set()


@linux_only
def test_embserve_stop_reports_a_run_that_ignores_sigterm_and_exits_1_for_it(tmp_path, monkeypatch):
    """The report's failed line is a StillRuns, which the command's exit status reads: not its words."""
    monkeypatch.setattr(serving, "run_base", lambda: tmp_path)  # this test's run folders, not the user's
    ignoring = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\ntime.sleep(60)",
                                 "embserve"], stdout=subprocess.PIPE, text=True)
    try:
        ignoring.stdout.readline()  # its handler is in place
        run_dir = tmp_path / f"{serving.RUN_PREFIX}ignoring"
        run_dir.mkdir()
        (run_dir / serving.OWNER_FILE).write_text(str(ignoring.pid))
        [line] = serving.stop(base=tmp_path, timeout_s=0.5)
        assert isinstance(line, serving.StillRuns) and str(ignoring.pid) in line and run_dir.exists()
        assert cli.main(["stop", "--timeout-s", "0.5"]) == 1
    finally:
        ignoring.kill()
        ignoring.wait()
    assert cli.main(["stop", "--timeout-s", "0.5"]) == 0  # its owner is gone: the folder is cleaned up
    assert not run_dir.exists()
