"""Where the CPU goes: per-process CPU time of this benchmark's own Ray processes (from /proc), the CPU
that processes outside it took meanwhile, and py-spy profiles of the Serve processes grouped by stage.

Linux only. Processes are found as descendants of this (driver) process, so another Ray cluster on the
same machine is never mistaken for ours.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")

# Process roles by their title (Ray renames worker processes "ray::<Actor>...").
ROLES = (
    ("replica", re.compile(r"ServeReplica:[^:]+:Embedder")),
    ("ingress", re.compile(r"ServeReplica:[^:]+:Ingress")),
    ("proxy", re.compile(r"ProxyActor|HAProxyManager|(^|/)haproxy\b")),  # Serve's Python proxy, or HAProxy
    ("controller", re.compile(r"ServeController")),
    ("metrics actor", re.compile(r"MetricsActor")),
    ("raylet", re.compile(r"raylet")),
    ("gcs", re.compile(r"gcs_server")),
    ("py-spy", re.compile(r"py-spy")),
    ("infinity", re.compile(r"infinity_emb")),  # the peer server bench.peers starts (Infinity's CLI)
    ("bulk actor", re.compile(r"ShardEmbedder")),  # embserve embed's Ray Data actors (bench.bulk)
)


def _stat(path: str) -> tuple[int, int] | None:
    """(parent pid, CPU ticks user+system) from a /proc stat file (a process's or a thread's), None when it is
    gone."""
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks user+system) of a process, None when it is gone."""
    return _stat(f"/proc/{pid}/stat")


def title_of(pid: int) -> str:
    """A process's command line as one string (Ray's workers show their actor there), '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int | None = None) -> dict[int, str]:
    """Every live process under `root` (this process by default), itself included: pid -> role."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = process_stat(int(entry))
            if st is not None:
                parents[int(entry)] = st[0]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        title = title_of(pid)
        role = "load generator" if pid == root else next((r for r, rx in ROLES if rx.search(title)), "other ray")
        out[pid] = role
        todo.extend(children.get(pid, []))
    return out


def _system_ticks() -> tuple[int, int]:
    """(busy, idle) CPU ticks of the whole machine since boot, from one read of /proc/stat (idle counts
    iowait too)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, idle


# A replica's thread names (embserve.engine.scheduler, where the replica names them; kept here so that this module
# needs nothing of embserve's): its forward workers, its event loop, and its helper threads.
FORWARD_THREAD = "forward-"
LOOP_THREAD = "replica-loop"
HELPER_THREAD = "replica-hlp"


def forward_thread_times(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (ns on a CPU, ns runnable but waiting for one) of each forward worker of the process, from
    /proc/PID/task/TID/schedstat; the rest of a window the thread slept (no work, or the GIL)."""
    found = {}
    for tid in threads_of(pid):
        try:
            if not Path(f"/proc/{pid}/task/{tid}/comm").read_text().startswith(FORWARD_THREAD):
                continue
            run_ns, wait_ns, _ = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        found[tid] = (run_ns, wait_ns)
    return found


def replica_thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (kind, CPU ticks) of a replica's own named threads: its event loop ("loop"), its forward workers
    ("forward workers") and its helper threads ("helpers"). A thread takes the name of the thread that starts
    it, so any other thread named as the loop was started by the loop after it was named: the loop is the
    oldest of them (the lowest tid), the rest count as helpers. The rest of the process's CPU is the runtime's
    threads (OpenVINO's streams, torch's intra-op pool) and Ray's few I/O threads."""
    found: dict[int, tuple[str, int]] = {}
    loops = []
    for tid in threads_of(pid):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            if comm.startswith(FORWARD_THREAD):
                kind = "forward workers"
            elif comm.startswith(HELPER_THREAD):
                kind = "helpers"
            elif comm == LOOP_THREAD:
                kind = "loop"
            else:
                continue
        except OSError:
            continue
        stat = _stat(f"/proc/{pid}/task/{tid}/stat")
        if stat is None:
            continue
        found[tid] = (kind, stat[1])
        if kind == "loop":
            loops.append(tid)
    for tid in sorted(loops)[1:]:
        found[tid] = ("helpers", found[tid][1])
    return found


@dataclass
class CpuSnapshot:
    at: float
    system_ticks: int
    per_pid: dict[int, tuple[str, int]]
    idle_ticks: int = 0
    forward_threads: dict[int, tuple[int, int]] = field(default_factory=dict)
    replica_threads: dict[int, tuple[str, int]] = field(default_factory=dict)


def cpu_snapshot() -> CpuSnapshot:
    per_pid = {}
    forward: dict[int, tuple[int, int]] = {}
    threads: dict[int, tuple[str, int]] = {}
    for pid, role in descendants().items():
        st = process_stat(pid)
        if st is not None:
            per_pid[pid] = (role, st[1])
            if role == "replica":
                forward.update(forward_thread_times(pid))
                threads.update(replica_thread_ticks(pid))
    busy, idle = _system_ticks()
    return CpuSnapshot(time.perf_counter(), busy, per_pid, idle, forward, threads)


def replica_split(before: CpuSnapshot, after: CpuSnapshot, replica_cores: float) -> dict[str, float] | None:
    """The replicas' CPU in cores by thread: their event loops, their forward workers' Python (and, where the
    runtime computes on the calling thread, as torch with one thread per worker does, the forward too), their
    helpers (health checks, large admissions), and the rest: the runtime's own threads (OpenVINO's streams: the
    forward itself) and Ray's I/O threads.
    None where the replica's loop was not seen by name in both snapshots (a replica older than its naming,
    whose forward workers alone are named)."""
    seconds = max(1e-9, after.at - before.at)
    shared = [tid for tid in after.replica_threads if tid in before.replica_threads]
    if not any(after.replica_threads[tid][0] == "loop" for tid in shared):
        return None
    split = {"loop": 0.0, "forward workers": 0.0, "helpers": 0.0}
    for tid in shared:
        kind, ticks = after.replica_threads[tid]
        split[kind] += (ticks - before.replica_threads[tid][1]) / CLK_TCK / seconds
    split["runtime threads"] = max(0.0, replica_cores - sum(split.values()))
    return {kind: round(cores, 3) for kind, cores in split.items()}


def forward_states(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float] | None:
    """The share of the window a replica's forward worker spent on a CPU, waiting for one (runnable: the
    machine's other processes had it), and asleep (nothing to run, or waiting for the GIL); the mean over
    the workers seen in both snapshots. None without any."""
    seconds = max(1e-9, after.at - before.at)
    shared = [tid for tid in after.forward_threads if tid in before.forward_threads]
    if not shared:
        return None

    def share(k: int) -> float:
        done = sum(after.forward_threads[t][k] - before.forward_threads[t][k] for t in shared)
        return done / 1e9 / seconds / len(shared)

    running, waiting = share(0), share(1)
    return {"workers": len(shared), "running": round(running, 3), "waiting_for_cpu": round(waiting, 3),
            "asleep": round(max(0.0, 1 - running - waiting), 3)}


@dataclass
class CpuUsage:
    """CPU used between two snapshots, in cores (1.0 = one core busy for the whole window)."""

    window_s: float
    by_role: dict[str, float]
    foreign: float  # cores that processes outside this benchmark used
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    idle: float | None = None  # cores that nothing used
    forward: dict[str, float] | None = None  # forward_states
    replica_threads: dict[str, float] | None = None  # replica_split

    @property
    def ours(self) -> float:
        return sum(self.by_role.values())

    def to_dict(self) -> dict:
        return {"window_s": round(self.window_s, 2), "by_role": {k: round(v, 3) for k, v in self.by_role.items()},
                "ours": round(self.ours, 3), "foreign": round(self.foreign, 3), "cores": self.cores,
                "idle": None if self.idle is None else round(self.idle, 3), "forward_threads": self.forward,
                "replica_threads": self.replica_threads}


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    seconds = max(1e-9, after.at - before.at)
    by_role: Counter = Counter()
    ours = 0
    for pid, (role, ticks) in after.per_pid.items():
        start = before.per_pid[pid][1] if pid in before.per_pid else 0
        by_role[role] += (ticks - start)
        ours += ticks - start
    foreign = max(0, (after.system_ticks - before.system_ticks) - ours)
    cores = {r: t / CLK_TCK / seconds for r, t in sorted(by_role.items())}
    return CpuUsage(seconds, cores, foreign / CLK_TCK / seconds,
                    idle=(after.idle_ticks - before.idle_ticks) / CLK_TCK / seconds,
                    forward=forward_states(before, after),
                    replica_threads=replica_split(before, after, cores.get("replica", 0.0)))


class QuietGate:
    """Waits, before a point, until processes outside the benchmark leave the CPU alone (or the budget
    runs out): other people's test runs on a shared box would otherwise be measured as our slowness."""

    def __init__(self, budget_s: float, threshold_cores: float = 0.4, per_point_s: float = 30.0) -> None:
        self.budget_s = budget_s
        self.threshold = threshold_cores
        self.per_point_s = per_point_s
        self.waited_s = 0.0

    def wait(self) -> float:
        """Seconds waited this time. Samples the load over one-second intervals."""
        waited = 0.0
        while self.waited_s < self.budget_s and waited < self.per_point_s:
            before = cpu_snapshot()
            time.sleep(1.0)  # the measurement interval itself, not a poll for an event
            if cpu_usage(before, cpu_snapshot()).foreign < self.threshold:
                break
            waited += 1.0
            self.waited_s += 1.0
        return waited


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def set_affinity(pids: list[int], cpus: set[int]) -> dict[int, set[int]]:
    """Pins every thread of `pids` to `cpus`; returns what each thread had, for `restore_affinity`."""
    previous = {}
    for pid in pids:
        for tid in threads_of(pid):
            try:
                previous[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread ended meanwhile
                pass
    return previous


def restore_affinity(previous: dict[int, set[int]]) -> None:
    for tid, cpus in previous.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def set_nice(pid: int, nice: int) -> None:
    """Niceness of every thread of a process (Linux keeps it per thread). Lowering it needs root."""
    for tid in threads_of(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            pass


# Stages of the serving pipeline, by the file a sampled frame belongs to. A sample is charged to the
# innermost frame that matches one of these, so a json.dumps called by the route counts as serialization.
STAGES = (
    ("forward (torch)", re.compile(r"torch/|transformers/models/|embserve/model\.py")),
    ("tokenization", re.compile(r"tokenizers/|transformers/tokenization|embserve/tokenize\.py")),
    ("batch planning", re.compile(r"embserve/batching\.py|embserve/engine\.py|embserve/coalesce\.py")),
    ("serialization", re.compile(r"pickle|serializ|msgpack|json/|orjson|base64|embserve/responses\.py|"
                                 r"embserve/encode\.py|pydantic|fastapi/encoders|numpy/")),
    ("metrics", re.compile(r"embserve/stats\.py|deployments/metrics\.py|ray/util/metrics|prometheus|"
                           r"opentelemetry|metrics_utils")),
    ("HTTP/ASGI", re.compile(r"uvicorn/|h11/|httptools|starlette/|fastapi/|deployments/ingress\.py")),
    ("Serve router/replica", re.compile(r"ray/serve/")),
    ("Ray core (RPC)", re.compile(r"ray/_raylet|ray/_private/|ray/actor|ray/remote_function|grpc")),
    ("asyncio loop", re.compile(r"asyncio/|selectors\.py|uvloop")),
)


def stage_of(stack: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first)."""
    for frame in reversed(stack):
        for name, pattern in STAGES:
            if pattern.search(frame):
                return name
    return "other"


@dataclass
class Profile:
    role: str
    pid: int
    samples: int
    by_stage: dict[str, int]
    top_leaves: list[tuple[str, int]]

    def shares(self) -> dict[str, float]:
        return {k: v / self.samples for k, v in self.by_stage.items()} if self.samples else {}


def parse_collapsed(text: str, role: str, pid: int) -> Profile:
    """py-spy's raw (collapsed) output: `frame;frame;...;frame count` per line, outermost first."""
    by_stage: Counter = Counter()
    leaves: Counter = Counter()
    total = 0
    for line in text.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        n = int(count)
        stack = [f for f in stack_text.split(";") if not f.startswith(("process ", "thread "))]
        total += n
        by_stage[stage_of(stack)] += n
        if stack:
            leaves[_short(stack[-1])] += n
    return Profile(role, pid, total, dict(by_stage.most_common()), leaves.most_common(12))


def _short(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    func, path = match.groups()
    path = re.sub(r".*site-packages/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    root = str(Path(__file__).resolve().parents[1]) + "/"
    path = path.split(root, 1)[-1]  # this checkout's own files, relative to it
    return f"{func} ({path})"


def py_spy() -> str:
    """The py-spy that pyproject installs next to this interpreter, so that `.venv/bin/python -m bench run`
    finds it without an activated venv; else the one on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def record(pids: dict[int, str], seconds: float, out_dir: Path, rate: int = 50) -> list[subprocess.Popen]:
    """Starts one `py-spy record` per process (non-blocking sampling, so the target is not paused)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid, role in pids.items():
        target = out_dir / f"{role.replace(' ', '_')}-{pid}.txt"
        cmd = [py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
               "--format", "raw", "--nonblocking", "--output", str(target)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return procs


def collect(procs: list[subprocess.Popen], pids: dict[int, str], out_dir: Path, timeout_s: float) -> list[Profile]:
    profiles = []
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)
    for pid, role in pids.items():
        target = out_dir / f"{role.replace(' ', '_')}-{pid}.txt"
        if target.is_file():
            profiles.append(parse_collapsed(target.read_text(), role, pid))
    return profiles


def dump(pid: int) -> str:
    """One `py-spy dump` of every thread of a process (what each is doing right now)."""
    result = subprocess.run([py_spy(), "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                            text=True, timeout=30)
    return result.stdout or result.stderr
