"""One command for the whole benchmark: the offline limit, then each served configuration on a private local
Ray (port 8100), then docs/benchmarks.md with plots.

    python -m bench.run --quick     # about 3 minutes, writes build/bench-quick/
    python -m bench.run             # the full run (about 15 minutes), writes docs/benchmarks.md + docs/bench/

Every served figure is set against the offline limit measured at the start of the same run, on the same
texts. Ray and Serve are shut down on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from bench import procs
from bench.corpus import Corpus, load_or_build
from bench.load import EmbeddingsClient, LoadResult, Workload, closed_loop, open_loop
from bench.offline import DTYPES, OfflineModel, best_by_dtype
from embserve.engine.hardware import cpu_cores
from embserve.engine.model import choose_dtype
from embserve.launch import serve_env

ROOT = Path(__file__).resolve().parents[1]
APP = "bench"
MODEL = "all-MiniLM-L6-v2"

RAY_CPUS = 2  # the private Ray's num_cpus, as on this project's benchmark box
# The pipelines compared at every concurrency: Settings fields that differ from the defaults.
ONE_FORWARD = "one forward on all threads"
CONFIGS: dict[str, dict[str, Any]] = {
    "batching off": {"enable_dynamic_batching": False},
    "no length grouping": {"enable_length_grouping": False},
    "full engine": {},  # on CPU: one single-thread forward per torch thread, from one queue (forward_workers)
    # The layout before forward_workers: one forward at a time, on all of the replica's threads.
    ONE_FORWARD: {"forward_workers": 1},
}
FULL_ENGINE = "full engine"


@dataclass(frozen=True)
class Mode:
    name: str
    concurrencies: tuple[int, ...]
    duration_s: float
    warmup_s: float
    sweep: tuple[int, ...]  # max_batch_size values, full engine at SWEEP_CONCURRENCY
    offline_texts: int
    offline_batch_sizes: tuple[int, ...]
    offline_rounds: int  # passes over every (batch size, threads) pair; the best of each counts
    extras: bool  # multi-text, open loop and long documents
    profile_s: float  # 0: no py-spy
    torch_threads: int | None = None  # None: the shipped default (every core the replica sees)

    def served(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """A configuration's Settings: the shipped defaults, with `overrides` and any --torch-threads."""
        return {**({"torch_threads": self.torch_threads} if self.torch_threads else {}), **overrides}


QUICK = Mode("quick", (1, 32), 3.0, 1.0, (1,), 128, (32,), 1, extras=False, profile_s=0)
FULL = Mode("full", (1, 4, 16, 32, 64), 8.0, 2.0, (1, 2, 4, 8, 16, 32, 64, 128), 256, (8, 32, 128), 2,
            extras=True, profile_s=12)
SWEEP_CONCURRENCY = 32
ENGINE_RUN_INPUTS = 20  # a replica's runs at 32 clients: 20.45 inputs per run in the run of f9eca7c
IN_FLIGHT = 32
PACKINGS = (2, 4, 8, 32)  # texts per request, at IN_FLIGHT / n clients
HEADLINE_CONCURRENCY = 32


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def local_serve(port: int) -> Iterator[str]:
    """A private Ray (never an existing cluster: address='local') answering HTTP on `port` (HAProxy on the
    fast path, Serve's Python proxy otherwise: whatever the environment says when this starts Ray)."""
    # HAProxy's stats and metrics ports, clear of a service running on this box with Ray's defaults; and
    # a short drain for the ingress replica that each redeploy stops (one node, as in run.sh).
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(port + 1))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(port + 2))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # ray.init installs its own; ours shuts Serve down first
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def deploy(overrides: dict[str, Any]) -> None:
    """Replace the bench app with `build_app(Settings(**overrides))`; returns when it runs."""
    from ray import serve

    from deployments.app import build_app
    from embserve.settings import Settings

    if APP in serve.status().applications:
        serve.delete(APP)
    serve.run(build_app(Settings(**overrides)), name=APP, route_prefix="/")


def perf_summary(perf: dict[str, Any] | None) -> dict[str, Any]:
    """What the server says about the window: padding and batch sizes (from GET /v1/performance)."""
    if not perf:
        return {}
    totals = perf.get("totals", {})
    batches, forwards = totals.get("batches") or 0, totals.get("forwards") or 0
    return {
        "padding_efficiency": perf.get("padding_efficiency"),
        "inputs": totals.get("inputs"), "batches": batches, "forwards": forwards,
        "inputs_per_batch": round(totals["inputs"] / batches, 2) if batches else None,
        "inputs_per_forward": round(totals["inputs"] / forwards, 2) if forwards else None,
        "forward_ms_p50": perf.get("latency_ms", {}).get("forward", {}).get("p50"),
        "queue_ms_p50": perf.get("latency_ms", {}).get("queue", {}).get("p50"),
        "server_errors": totals.get("errors"),
    }


class Bench:
    """Runs points against the deployed app; each point resets and reads /v1/performance at its window."""

    def __init__(self, base_url: str, mode: Mode, progress: bool, gate: procs.QuietGate) -> None:
        self.base_url = base_url
        self.mode = mode
        self.progress = progress
        self.gate = gate

    async def _point(self, workload: Workload, concurrency: int | None = None, rate: float | None = None,
                     label: str = "", duration_s: float | None = None, window_hooks: Any = None) -> dict[str, Any]:
        duration = duration_s or self.mode.duration_s
        snapshots: dict[str, Any] = {}
        async with EmbeddingsClient(self.base_url, MODEL, connections=(concurrency or 256) + 8) as client:
            async def start() -> None:
                await client.post_json("/performance/reset")
                snapshots["cpu"] = procs.cpu_snapshot()
                if window_hooks:
                    await window_hooks[0]()

            async def end() -> Any:
                cpu = procs.cpu_usage(snapshots["cpu"], procs.cpu_snapshot())
                snapshots["usage"] = cpu
                if window_hooks:
                    await window_hooks[1]()
                return await client.get_json("/performance")

            bar = label if self.progress else None
            if rate is None:
                result: LoadResult = await closed_loop(client, workload, concurrency, duration, self.mode.warmup_s,
                                                       on_window_start=start, on_window_end=end, progress=bar)
            else:
                result = await open_loop(client, workload, rate, duration, self.mode.warmup_s,
                                         on_window_start=start, on_window_end=end, progress=bar)
        point = result.to_dict()
        point["perf"] = perf_summary(point["extra"].pop("window_end", None))
        point["cpu"] = snapshots["usage"].to_dict() if "usage" in snapshots else None
        point.pop("extra", None)
        return point

    def point(self, workload: Workload, **kwargs: Any) -> dict[str, Any]:
        waited = self.gate.wait()
        point = asyncio.run(self._point(workload, **kwargs))
        point["waited_for_quiet_s"] = waited
        return point

    def warm(self, workload: Workload) -> None:
        """Unmeasured traffic right after a deploy: first forwards, connections, code paths."""
        async def go() -> None:
            async with EmbeddingsClient(self.base_url, MODEL, connections=24) as client:
                await closed_loop(client, workload, 16, 2.0, warmup_s=0.0)
        asyncio.run(go())


def describe_point(name: str, point: dict[str, Any], limit: float | None) -> str:
    lat = point["latency_ms"]
    load = f"c={point['concurrency']}" if point["mode"] == "closed" else f"{point['rate']:.1f} req/s"
    ratio = f"{point['texts_per_s'] / limit:5.2f}x offline" if limit else ""
    perf = point.get("perf") or {}
    pad = perf.get("padding_efficiency")
    cpu = point.get("cpu") or {}
    return (f"  {name:<22} {point['workload']:<9} {load:<13} {point['texts_per_s']:7.1f} texts/s {ratio}  "
            f"p50 {lat.get('p50', float('nan')):7.1f} p99 {lat.get('p99', float('nan')):7.1f} ms  "
            f"pad {pad if pad is not None else '-'}  in/fwd {perf.get('inputs_per_forward', '-')}  "
            f"err {sum(point['errors'].values())}  other load {cpu.get('foreign', 0):.2f} cores")


def measure_offline(corpus: Corpus, mixed: list[str], mode: Mode) -> dict[str, Any]:
    """The limits every served figure is compared with, measured before Ray starts (nothing else runs)."""
    print("offline limit (in-process, sorted batching) ...", flush=True)
    before = procs.cpu_snapshot()
    # The replicas run `dtype: auto`; the limit is measured in both dtypes, and the served default's is the
    # one every ratio below is to (the others are set against both in the report).
    served = choose_dtype("auto", "cpu")
    models = offline_arms(served.autocast)
    # The arm the replicas run: OpenVINO where it converts, else (it fell back) torch's of the same dtype.
    served_label = next((label for label, m in models.items()
                         if m.model.info.dtype == served.name and m.runtime == served_runtime()),
                        f"torch {served.name}")
    model = models[served_label]
    threads = tuple(sorted({1, os.cpu_count() or 1}))
    # One forward at a time on 1 or all threads, and one single-thread forward per core at once (what a
    # replica's forward_workers do): the limit is the best of them.
    layouts = tuple(sorted({(t, 1) for t in threads} | {(1, max(threads))}))
    limits = best_by_dtype(models, mixed[: mode.offline_texts], mode.offline_batch_sizes, layouts, mode.offline_rounds)
    best, tried = limits[served_label]
    out: dict[str, Any] = {"mixed": best.to_dict(), "mixed_tried": [r.to_dict() for r in tried],
                           "served_dtype": served_label, "served_dtype_reason": served.reason,
                           "mixed_by_dtype": {d: b.to_dict() for d, (b, _) in limits.items()}}
    for d, (b, _) in limits.items():
        print(f"  mixed, {d}{' (served default)' if d == served_label else ''}: {b.texts_per_s:.1f} texts/s, "
              f"{b.tokens_per_s:.0f} tokens/s (batch {b.batch_size}, {b.streams} x {b.threads} threads)", flush=True)
    # The short-text mix (queries of 10-20 tokens, ~50-token passage heads): where a request's cost around
    # its forward shows most.
    short = best_by_dtype(models, corpus.short(mode.offline_texts, 0), mode.offline_batch_sizes, layouts,
                          mode.offline_rounds)
    out["short"] = short[served_label][0].to_dict()
    out["short_by_dtype"] = {d: b.to_dict() for d, (b, _) in short.items()}
    for d, (b, _) in short.items():
        print(f"  short, {d}{' (served default)' if d == served_label else ''}: {b.texts_per_s:.1f} texts/s",
              flush=True)
    if mode.extras:
        docs, _ = model.best(corpus.documents[:48], (8, 32), ((best.threads, best.streams),))
        out["documents"] = docs.to_dict()
        print(f"  documents (truncated to 256 tokens): {docs.texts_per_s:.1f} texts/s", flush=True)
    # The replica under 32 clients gets runs of about 20 one-text jobs (the rest of the clients are in
    # the other run in flight, or on their way): the same texts through embserve's Engine in such runs,
    # on the replica's forward layout for these threads.
    engine = max((model.engine_runs(mixed[: mode.offline_texts], ENGINE_RUN_INPUTS, threads=mode.torch_threads or cpu_cores())
                  for _ in range(mode.offline_rounds)), key=lambda r: r.texts_per_s)
    out["engine_runs"] = engine.to_dict()
    print(f"  embserve Engine, runs of {ENGINE_RUN_INPUTS} texts, {engine.streams} forward worker(s) x "
          f"{engine.threads} thread(s): {engine.texts_per_s:.1f} texts/s",
          flush=True)
    floors = {t: model.single_latency_ms(corpus.queries[:40], t) for t in threads}
    out["single_forward"] = {str(t): v for t, v in floors.items()}
    out["single_forward_floor_ms"] = min(v["p50"] for v in floors.values())
    cold = model.single_latency_ms(corpus.queries[:20], 1, repeats=2, gap_s=0.03)
    out["single_forward_cold"] = cold
    print(f"  one short query, tokenize + forward: p50 {out['single_forward_floor_ms']:.1f} ms "
          f"({cold['p50']:.1f} ms at 1 thread with 30 ms idle before each)", flush=True)
    del model, models
    out["other_load"] = procs.cpu_usage(before, procs.cpu_snapshot()).foreign
    return out


def served_runtime() -> str:
    """The runtime `runtime: auto` gives a CPU replica here (embserve.engine.openvino_runtime.choose_runtime)."""
    from embserve.engine.openvino_runtime import choose_runtime, openvino_installed

    return choose_runtime("auto", "cpu", True, openvino_installed())[0]


def offline_arms(native_bf16: bool) -> dict[str, OfflineModel]:
    """The offline limit's models: torch in float32 and bf16, OpenVINO in float32, and OpenVINO in bf16 where
    the CPU multiplies bf16 natively (elsewhere OpenVINO emulates it at a tenth of float32's speed, which
    no replica runs: `dtype: auto` is float32 there)."""
    arms = {f"torch {d}": OfflineModel(dtype=d, runtime="torch") for d in DTYPES}
    if served_runtime() == "openvino":
        for d in DTYPES:
            if d == "float32" or native_bf16:
                arms[f"openvino {d}"] = OfflineModel(dtype=d, runtime="openvino")
    return arms


def run_served(base_url: str, corpus: Corpus, mixed: list[str], mode: Mode, offline: dict[str, Any],
               progress: bool, profile_dir: Path, gate: procs.QuietGate) -> dict[str, Any]:
    bench = Bench(base_url, mode, progress, gate)
    limit = offline["mixed"]["texts_per_s"]
    single = Workload("mixed", mixed)
    queries = Workload("queries", corpus.queries)
    out: dict[str, Any] = {"configs": {}, "sweep": [], "extras": []}

    for name, overrides in CONFIGS.items():
        print(f"{name}: deploying {overrides or 'defaults'} ...", flush=True)
        deploy(mode.served(overrides))
        bench.warm(single)
        points = []
        for c in mode.concurrencies:
            point = bench.point(single, concurrency=c, label=f"{name} c={c}")
            print(describe_point(name, point, limit), flush=True)
            points.append(point)
        # One client sending short queries: the latency a lone user sees.
        lone = bench.point(queries, concurrency=1, label=f"{name} queries c=1")
        print(describe_point(name, lone, None), flush=True)
        out["configs"][name] = {"settings": overrides, "points": points, "single_query": lone}
        if name == FULL_ENGINE:  # the short-text headline: 32 clients of queries and passage heads
            short = bench.point(Workload("short", corpus.short(2000, 0)), concurrency=HEADLINE_CONCURRENCY,
                                label=f"{name} short c={HEADLINE_CONCURRENCY}")
            print(describe_point(name, short, offline.get("short", {}).get("texts_per_s")), flush=True)
            out["configs"][name]["short"] = short
        if name == FULL_ENGINE and mode.extras:
            out["extras"] = run_extras(bench, corpus, mixed, points, limit, offline)

    for size in mode.sweep:
        overrides = {"max_batch_size": size}
        print(f"sweep: max_batch_size={size} ...", flush=True)
        deploy(mode.served(overrides))
        bench.warm(single)
        point = bench.point(single, concurrency=SWEEP_CONCURRENCY, label=f"max_batch_size={size}")
        point["max_batch_size"] = size
        print(describe_point(f"max_batch_size={size}", point, limit), flush=True)
        out["sweep"].append(point)

    if mode.profile_s:
        try:
            out["profile"] = run_profile(bench, single, mode, profile_dir)
        except OSError as exc:  # no py-spy, or not allowed to attach: the measurements above still count
            print(f"profile skipped: {exc}", flush=True)
    return out


def run_extras(bench: Bench, corpus: Corpus, mixed: list[str], points: list[dict[str, Any]], limit: float,
               offline: dict[str, Any]) -> list[dict[str, Any]]:
    """On the full engine: several texts per request, Poisson arrivals, and long (truncated) documents."""
    extras = []
    # The same 32 texts in flight, packed into fewer, larger requests: what per-request cost takes.
    for per_request in PACKINGS:
        clients = IN_FLIGHT // per_request
        multi = bench.point(Workload("mixed", mixed, per_request=per_request), concurrency=clients,
                            label=f"{per_request} texts/request c={clients}")
        multi["label"] = f"{per_request} texts per request, {clients} clients"
        multi["per_request"] = per_request
        extras.append(multi)
        print(describe_point(f"{per_request} per request", multi, limit), flush=True)
    at32 = next((p for p in points if p["concurrency"] == HEADLINE_CONCURRENCY), points[-1])
    for share in (0.5, 0.9):
        rate = round(at32["requests_per_s"] * share, 1)
        point = bench.point(Workload("mixed", mixed, seed=1), rate=rate, label=f"Poisson {rate}/s")
        point["label"] = f"Poisson arrivals at {int(share * 100)}% of the 32-client throughput"
        extras.append(point)
        print(describe_point("open loop", point, limit), flush=True)
    docs = bench.point(Workload("documents", corpus.documents, truncate=True), concurrency=16, label="documents c=16")
    docs["label"] = "long documents (truncate=true), 16 clients"
    docs["offline_texts_per_s"] = offline.get("documents", {}).get("texts_per_s")
    extras.append(docs)
    print(describe_point("documents", docs, docs["offline_texts_per_s"]), flush=True)
    return extras


def run_profile(bench: Bench, workload: Workload, mode: Mode, out_dir: Path) -> dict[str, Any]:
    """py-spy on the replica, the ingress and the proxy while 32 clients load the full engine."""
    print(f"profile: py-spy for {mode.profile_s:.0f} s under {HEADLINE_CONCURRENCY} clients ...", flush=True)
    deploy(mode.served(CONFIGS[FULL_ENGINE]))
    bench.warm(workload)
    targets = {pid: role for pid, role in procs.descendants().items() if role in ("replica", "ingress", "proxy")}
    running: dict[str, Any] = {}

    async def dumps() -> None:
        await asyncio.sleep(mode.profile_s / 2)
        texts = await asyncio.gather(*(asyncio.to_thread(procs.dump, pid) for pid in targets))
        for (pid, role), text in zip(targets.items(), texts):
            (out_dir / f"dump-{role}-{pid}.txt").write_text(text)

    async def start() -> None:
        running["procs"] = procs.record(targets, mode.profile_s, out_dir)
        running["dumps"] = asyncio.create_task(dumps())

    async def end() -> None:
        await running["dumps"]
        running["profiles"] = await asyncio.to_thread(procs.collect, running["procs"], targets, out_dir,
                                                      mode.profile_s + 20)

    point = bench.point(workload, concurrency=HEADLINE_CONCURRENCY, label="profiling",
                        duration_s=mode.profile_s + 2, window_hooks=(start, end))
    return {"point": point, "seconds": mode.profile_s, "raw_dir": str(out_dir.relative_to(ROOT)),
            "profiles": [{"role": p.role, "pid": p.pid, "samples": p.samples, "by_stage": p.by_stage,
                          "top_leaves": p.top_leaves} for p in running.get("profiles", [])]}


def machine() -> dict[str, Any]:
    import platform
    import subprocess

    import ray
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "transformers": transformers.__version__, "os": platform.platform(),
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_server_changes": bool(git("status", "--porcelain", "--", "embserve", "deployments")),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark embserve against its offline limit.")
    parser.add_argument("--quick", action="store_true", help="a 3-minute smoke run (build/bench-quick/)")
    parser.add_argument("--out", type=Path, default=None, help="where benchmarks.md goes (default: docs/, "
                        "or build/bench-quick/ with --quick)")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per point")
    parser.add_argument("--profile-seconds", type=float, default=None, help="py-spy under 32 clients for "
                        "this long (default: 12 in full mode, 0 = off in quick mode)")
    parser.add_argument("--quiet-wait", type=float, default=None, help="seconds in all to wait for other "
                        "processes' CPU load to drop before points (default: 180 full, 0 quick)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--torch-threads", type=int, default=None, help="the replica's torch_threads "
                        "(default: the shipped one, every core the replica sees)")
    parser.add_argument("--plain-serve", action="store_true", help="Serve's Python proxy and plain handles "
                        "instead of the fast path that ./run.sh serve starts (embserve/launch/serve_env.py)")
    args = parser.parse_args(argv)

    mode = QUICK if args.quick else FULL
    if args.duration:
        mode = replace(mode, duration_s=args.duration)
    if args.profile_seconds is not None:
        mode = replace(mode, profile_s=args.profile_seconds)
    if args.torch_threads is not None:
        mode = replace(mode, torch_threads=args.torch_threads)
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.plain_serve:
        for key in serve_env.FAST_PATH:
            os.environ.pop(key, None)
    else:
        serve_env.apply()  # before local_serve imports Ray
    signal.signal(signal.SIGTERM, _interrupt)
    # A shell without job control starts background jobs with SIGINT ignored; Ctrl-C and kill -INT
    # should still stop a run cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from bench.report import write_report

    started = time.time()
    results: dict[str, Any] = {"mode": mode.name, "machine": machine(), "settings": mode.__dict__,
                               "serve_env": {k: os.environ.get(k) for k in serve_env.FAST_PATH}}
    corpus = load_or_build(None, args.seed)
    results["corpus"] = corpus.stats()
    mixed = corpus.mixed(2000, args.seed)
    gate = procs.QuietGate(args.quiet_wait if args.quiet_wait is not None else (0 if args.quick else 180))
    gate.wait()
    results["offline"] = measure_offline(corpus, mixed, mode)
    with local_serve(args.port) as base_url:
        results.update(run_served(base_url, corpus, mixed, mode, results["offline"], not args.no_progress,
                                  ROOT / "build" / "bench-profile", gate))
    results["waited_for_quiet_s"] = gate.waited_s
    results["elapsed_s"] = round(time.time() - started, 1)
    report = write_report(results, out)
    print(f"done in {results['elapsed_s']:.0f} s: {report}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; Ray and Serve were shut down", file=sys.stderr)
        sys.exit(130)
