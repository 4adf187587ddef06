"""`embserve serve` and `embserve stop`: `serve run CONFIG` on Serve's fast path, and nothing left when it stops.

Ray's HAProxy (`ray/serve/_private/haproxy.py`) is a plain child of the HAProxyManager actor's worker: when
that worker is killed (`ray stop --force`, SIGTERM to `serve run`), HAProxy lives on, holding the HTTP port
and answering 500. So `embserve serve` runs `serve run` in a session of its own, gives Ray's HAProxy files
a folder of this run's own (the HAProxy command line names its config file there, which is how its
processes are told from anyone else's), and becomes the child subreaper of everything the run starts, so
that what loses its parent comes to it. It then waits for signals and for the child: an HAProxy of this run
whose manager is gone is stopped within a second; a stop signal asks `serve run` to shut Serve down, and
whatever of the run is still alive after it is stopped.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embserve.launch import ports
from embserve.launch.procfs import Proc, alive, named, parent, processes

RUN_PREFIX = "embserve-"
OWNER_FILE = "embserve-serve.pid"
SERVE_RUN_FILE = "serve-run.pid"  # `serve run`'s pid, which is also the id of the session everything of the run is in
# Where Ray's HAProxy keeps its files (ray/serve/_private/constants.py), moved into the run's folder. Ray puts
# each node's files in a folder named by the node id below these.
HAPROXY_FILES: dict[str, str] = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
# One node: its HAProxy notices a stopping ingress replica within a second, not Ray's 30 s (docs/settings.md).
DRAINING = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WATCH_S = 0.5  # how often the run's processes are looked at: the kernel tells no one when a process is orphaned
KILL_WAIT_S = 5.0
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Port:
    """A port the server will listen on, and what it is, in words a user can act on."""

    host: str
    port: int
    what: str


def http_options(config: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str, int]:
    """The host and port Serve's HTTP proxy (HAProxy on the fast path) listens on, as Serve reads them."""
    options = config.get("http_options") or {}
    host = options.get("host") or environ.get("RAY_SERVE_DEFAULT_HTTP_HOST") or "127.0.0.1"
    return host, int(options.get("port", 8000))


def ports_needed(config: Mapping[str, Any], environ: Mapping[str, str]) -> list[Port]:
    """Every fixed port the run will listen on: HTTP, and on the fast path HAProxy's stats and Prometheus
    pages and the fallback proxy on the head node."""
    host, port = http_options(config, environ)
    needed = [Port(host, port, "the HTTP port (http_options.port in the config)")]
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        needed += [
            Port("0.0.0.0", int(environ.get("RAY_SERVE_HAPROXY_STATS_PORT", 8404)),
                 "HAProxy's stats page (RAY_SERVE_HAPROXY_STATS_PORT moves it)"),
            Port("0.0.0.0", int(environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)),
                 "HAProxy's Prometheus page (RAY_SERVE_HAPROXY_METRICS_PORT moves it)"),
            Port(host, int(environ.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500)),
                 "Serve's fallback proxy (RAY_SERVE_FALLBACK_PROXY_HTTP_PORT moves it)"),
        ]
    return needed


def taken(needed: Iterable[Port]) -> list[tuple[Port, str]]:
    """The ports of `needed` that something already listens on, each with who it is."""
    return [(p, ports.holder(p.port)) for p in needed if not ports.is_free(p.host, p.port)]


def refusal(busy: Sequence[tuple[Port, str]]) -> str:
    lines = [f"port {p.port}, {p.what}, is taken by {who}" for p, who in busy]
    return ("embserve serve: cannot start: " + "; ".join(lines) + ". Stop it (`embserve stop` stops what an "
            "earlier `embserve serve` left), or move the port.")


def serve_environment(environ: Mapping[str, str], run_dir: Path) -> dict[str, str]:
    """`environ` plus Serve's fast path (embserve/launch/serve_env.py), a short drain on one node, and HAProxy's
    files in `run_dir`; what the user set wins."""
    from embserve.launch import serve_env

    env = dict(environ)
    serve_env.apply(env)
    for key, value in DRAINING.items():
        env.setdefault(key, value)
    for key, name in HAPROXY_FILES.items():
        env.setdefault(key, str(run_dir / name) if name else str(run_dir))
    return env


def serve_command(config: str, extra: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """`serve run CONFIG ...` with the Ray Serve CLI of this interpreter's environment."""
    script = Path(python).parent / "serve"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "run", config, *extra]
    return [python, "-c", "import sys; from ray.serve.scripts import cli; sys.exit(cli())", "run", config, *extra]


def descendants(procs: Mapping[int, Proc], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def haproxy_config(argv: Sequence[str]) -> str | None:
    """The config file of an HAProxy command line (`haproxy -db -f FILE ...`, as Ray starts it)."""
    if not argv or "haproxy" not in Path(argv[0]).name:
        return None
    for flag, value in zip(argv, argv[1:]):
        if flag == "-f":
            return value
    return None


def run_haproxies(procs: Mapping[int, Proc], run_dir: Path) -> set[int]:
    """The live HAProxy processes whose config file lies in `run_dir`: this run's, and no one else's."""
    inside = str(run_dir).rstrip("/") + "/"
    return {p.pid for p in procs.values()
            if p.state != "Z" and (haproxy_config(p.argv) or "").startswith(inside)}


def run_session(procs: Mapping[int, Proc], run_dir: Path) -> set[int]:
    """The live processes in the session of the run's `serve run` (its Ray, its workers, HAProxy), from the pid
    the run wrote: whatever survived an `embserve serve` that was killed outright. The kernel does not reuse a
    pid while a session still carries it, and a session counts only if Ray or Serve runs in it."""
    try:
        sid = int((run_dir / SERVE_RUN_FILE).read_text())
    except (OSError, ValueError):
        return set()
    members = {p.pid for p in procs.values() if p.sid == sid and p.state != "Z"}
    if not any("ray" in line or "serve" in line for line in (" ".join(procs[pid].argv) for pid in members)):
        return set()
    return members


def orphaned(procs: Mapping[int, Proc], pids: Iterable[int], child: int,
             parent_of: Callable[[int], int | None]) -> set[int]:
    """Those of `pids` (in `procs`, one look at /proc) whose line of parents no longer reaches `child`: Ray's
    worker that started them is gone, and they came to the subreaper or to init. The line is followed up from
    each one's parent in that look with `parent_of` (a pid's parent now, None where it is gone): a few reads,
    where the run's whole tree would cost a read of every process. A line that cannot be followed to its end
    (an ancestor gone or unreadable on the way) is no proof: the next look decides, and as the kernel hands an
    orphan to its new parent at once, that look sees it."""
    def lost(pid: int) -> bool:
        up, seen = procs[pid].ppid, set()
        while up > 1 and up not in seen:
            if up == child:
                return False
            seen.add(up)
            try:
                up = parent_of(up)
            except OSError:
                return False
            if up is None:
                return False
        return True

    return {pid for pid in pids if pid in procs and lost(pid)}


def become_subreaper() -> bool:
    """Orphaned descendants come to this process rather than to init (Linux 3.4+); False elsewhere."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def say(message: str) -> None:
    print(f"embserve serve: {message}", file=sys.stderr, flush=True)


class Run:
    """One `serve run` child and the processes it starts."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], run_dir: Path, grace_s: float):
        self.command, self.env, self.run_dir, self.grace_s = list(command), dict(env), run_dir, grace_s
        self.me = os.getpid()
        self.child = 0
        self.status: int | None = None
        self.stop_asked: float | None = None
        self.escalated: list[signal.Signals] = []
        self.noticed: list[int] = []

    def start(self) -> None:
        become_subreaper()
        # The mask below is this thread's only: a thread started before it (by a library, or coverage's saver
        # under the tests) can still take a stop signal, whose default action would end this process without
        # clean-up and leave `serve run` behind. A handler turns such a signal into a note that wait() reads.
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signo, _frame: self.noticed.append(signo))
        signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, signal.SIGCHLD})
        # The child gets an empty mask and default dispositions: a background shell ignores SIGINT for it
        # otherwise, and SIGINT is how `serve run` is asked to shut Serve down.
        self.child = os.posix_spawnp(
            self.command[0], self.command, self.env, setsid=True, setsigmask=(),
            setsigdef=(*STOP_SIGNALS, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ))
        (self.run_dir / SERVE_RUN_FILE).write_text(str(self.child))  # for `embserve stop`, were this one killed

    def reap(self) -> None:
        """Collects every exited child (orphans of the run are this process's children now)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.status = os.waitstatus_to_exitcode(status)

    def ask_to_stop(self, why: str) -> None:
        if self.stop_asked is None:
            say(f"{why}: asking serve run (pid {self.child}) to shut Serve down")
            self.stop_asked = time.monotonic()
            self._signal_child(signal.SIGINT, group=False)
        else:
            say(f"{why} again: killing serve run's process group")
            self._signal_child(signal.SIGKILL, group=True)

    def _signal_child(self, sig: signal.Signals, group: bool) -> None:
        try:
            os.killpg(self.child, sig) if group else os.kill(self.child, sig)
        except ProcessLookupError:
            pass

    def escalate(self) -> None:
        """SIGTERM, then SIGKILL, to serve run's process group when it outlives the grace period."""
        if self.stop_asked is None:
            return
        late = time.monotonic() - self.stop_asked
        for sig, after in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, self.grace_s + KILL_WAIT_S)):
            if late >= after and sig not in self.escalated:
                self.escalated.append(sig)
                say(f"serve run still runs after {late:.0f} s: {sig.name} to its process group")
                self._signal_child(sig, group=True)

    def stop_orphaned_haproxies(self) -> None:
        procs = named("haproxy")
        lost = orphaned(procs, run_haproxies(procs, self.run_dir), self.child, parent)
        if lost:
            say(f"HAProxy {sorted(lost)} lost its Ray manager (Ray stopped?): stopping it")
            terminate(lost, self.reap)

    def wait(self) -> int:
        while self.status is None:
            info = signal.sigtimedwait({*STOP_SIGNALS, signal.SIGCHLD}, WATCH_S)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self.noticed.append(info.si_signo)
            while self.noticed:
                self.ask_to_stop(signal.Signals(self.noticed.pop(0)).name)
            self.reap()
            if self.status is None:
                self.escalate()
                self.stop_orphaned_haproxies()
        return self.status

    def clean_up(self) -> None:
        """Stops whatever the run left: its descendants, and its HAProxy processes wherever they went."""
        def members(procs: Mapping[int, Proc]) -> set[int]:
            left = {pid for pid in descendants(procs, self.me) if procs[pid].state != "Z"}
            return left | run_session(procs, self.run_dir)

        end_run(self.run_dir, members, self.reap,
                tell=lambda procs, pids: say(f"stopping what the run left: {describe(procs, pids)}"))
        self.reap()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def describe(procs: Mapping[int, Proc], pids: Iterable[int]) -> str:
    return ", ".join(f"{pid} ({' '.join(procs[pid].argv)[:80] or '?'})" for pid in sorted(pids))


def terminate(pids: Iterable[int], reap=lambda: None, wait_s: float = KILL_WAIT_S) -> None:
    """SIGTERM, then SIGKILL after `wait_s` to those still alive; `reap` collects this process's children."""
    pids = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while True:
            reap()
            pids = {pid for pid in pids if alive(pid)}
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # no event tells when a process that is not our child has gone
        if not pids:
            return


END_ROUNDS = 4


def end_run(run_dir: Path, members: Callable[[Mapping[int, Proc]], set[int]], reap=lambda: None,
            tell: Callable[[Mapping[int, Proc], set[int]], None] = lambda procs, pids: None) -> tuple[set[int], set[int]]:
    """Ends a run's processes: first all but its HAProxy (`members` names them: Ray, its workers, `serve run`),
    then its HAProxy from a fresh look at /proc. Ray's HAProxy manager starts a new HAProxy on every reload, and
    it reloads when replicas go, so it may start one while it is being stopped: one taken from an earlier look
    would miss it, and it would hold the port with no Ray behind it. Returns (others, HAProxy) that it ended."""
    others_ended: set[int] = set()
    haproxies_ended: set[int] = set()
    for _ in range(END_ROUNDS):
        procs = processes()
        found = run_haproxies(procs, run_dir)
        # Each process is signalled in one round only: one that outlived SIGKILL must not hold HAProxy's turn up.
        others = members(procs) - found - others_ended
        haproxies = found - haproxies_ended
        now = others or haproxies
        if not now:
            break
        tell(procs, now)
        terminate(now, reap)
        (others_ended if others else haproxies_ended).update(now)
    return others_ended, haproxies_ended


def new_run_dir(base: Path | None = None) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=base or run_base()))
    (run_dir / OWNER_FILE).write_text(str(os.getpid()))
    return run_dir


def run_base() -> Path:
    # Short, so that HAProxy's sockets (RUN_DIR/<56-character node id>/admin.sock) fit a socket path's 108 bytes.
    return Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())


def serve(config_path: str, extra: Sequence[str] = (), grace_s: float = 60.0,
          environ: Mapping[str, str] = os.environ) -> int:
    """`embserve serve`: refuses when a port is taken, else runs `serve run` until it ends or is stopped."""
    import yaml

    config = yaml.safe_load(Path(config_path).read_text()) or {}
    run_dir = new_run_dir()
    try:
        env = serve_environment(environ, run_dir)
        busy = taken(ports_needed(config, env))
        if busy:
            print(refusal(busy), file=sys.stderr, flush=True)
            return 1
        command = serve_command(config_path, extra)
        if not hasattr(signal, "sigtimedwait"):  # not Linux: no HAProxy either; Serve's own proxy stops with Ray
            import subprocess

            return subprocess.call(command, env=env)
        run = Run(command, env, run_dir, grace_s)
        run.start()
        try:
            return run.wait()
        finally:
            run.clean_up()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_dirs(base: Path | None = None) -> dict[Path, int]:
    """This user's run folders and the pid of the `embserve serve` that made each."""
    found = {}
    for run_dir in sorted((base or run_base()).glob(f"{RUN_PREFIX}*")):
        try:
            if run_dir.stat().st_uid == os.getuid():
                found[run_dir] = int((run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
    return found


class StillRuns(str):
    """A line of `stop`'s report that says a run did not stop: `embserve stop` exits 1 when there is one."""


def stop(base: Path | None = None, timeout_s: float = 90.0) -> list[str]:
    """`embserve stop`: every run of this user's `embserve serve` stopped (`stop_run`). Returns what it did,
    in words."""
    return [line for run_dir, owner in run_dirs(base).items() for line in stop_run(run_dir, owner, timeout_s)]


def stop_run(run_dir: Path, owner: int, timeout_s: float = 90.0) -> list[str]:
    """Asks the run's `embserve serve` to stop and waits for it; then stops what it left, if it was killed
    outright (SIGKILL, say): `serve run` with its Ray, and HAProxy; and removes the run's folder."""
    done = []
    if alive(owner) and "embserve" in ports.command_line(owner):
        os.kill(owner, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while alive(owner) and time.monotonic() < deadline:
            time.sleep(0.2)  # not our child: nothing to wait on but /proc
        if alive(owner):
            return [StillRuns(f"embserve serve (pid {owner}) still runs after {timeout_s:.0f} s")]
        done.append(f"stopped embserve serve (pid {owner})")
    ray, haproxies = end_run(run_dir, lambda procs: run_session(procs, run_dir))
    if ray:
        done.append(f"stopped serve run and its Ray ({len(ray)} processes) left by an earlier embserve serve")
    if haproxies:
        done.append(f"stopped HAProxy {sorted(haproxies)} left by an earlier embserve serve")
    shutil.rmtree(run_dir, ignore_errors=True)
    return done
