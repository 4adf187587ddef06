"""One command for the whole benchmark: the offline limit, then each served configuration as a user starts
it (`embserve serve serve_config.yaml`, the configuration's settings in the application's args, one fresh
local Ray each), then docs/benchmarks.md with plots.

    python -m bench run --quick     # about 4 minutes, writes build/bench-quick/
    python -m bench run             # the full run (about 30 minutes), writes docs/benchmarks.md + docs/bench/
    python -m bench run --tuned my_config.yaml   # also a tuned layout, reported beside the defaults

Every served figure is set against the offline limit measured at the start of the same run, on the same
texts. The servers are stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import procs
from bench.common import ROOT, machine, offline_env, stop_on_signals
from bench.corpus import Corpus, load_or_build
from bench.load import Workload
from bench.measure import FULL, QUICK, Bench, Mode, describe_point
from bench.offline import measure_offline
from bench.service import DEFAULT_CONFIG, PLAIN_SERVE, Layout, embserve_serve

# The pipelines compared at every concurrency: Settings fields that differ from the config's.
ONE_FORWARD = "one forward on all threads"
CONFIGS: dict[str, dict[str, Any]] = {
    "batching off": {"enable_dynamic_batching": False},
    "no length grouping": {"enable_length_grouping": False},
    "full engine": {},  # on CPU: one single-thread forward per torch thread, from one queue (forward_workers)
    # The layout before forward_workers: one forward at a time, on all of the replica's threads.
    ONE_FORWARD: {"forward_workers": 1},
}
FULL_ENGINE = "full engine"
SWEEP_CONCURRENCY = 32
IN_FLIGHT = 32
PACKINGS = (2, 4, 8, 32)  # texts per request, at IN_FLIGHT / n clients
HEADLINE_CONCURRENCY = 32


class Service:
    """Starts `embserve serve` for each configuration in turn, on one port, with the run's base layout."""

    def __init__(self, base: Layout, port: int, mode: Mode, progress: bool, gate: procs.QuietGate) -> None:
        self.base, self.port, self.mode, self.progress, self.gate = base, port, mode, progress, gate

    def layout(self, overrides: dict[str, Any], config: Path | None = None) -> Layout:
        return replace(self.base, config=config or self.base.config, settings=self.mode.served(overrides))

    @contextmanager
    def serving(self, layout: Layout) -> Iterator[Bench]:
        with embserve_serve(layout, self.port) as base_url:
            yield Bench(base_url, self.mode, self.progress, self.gate)


def run_served(service: Service, corpus: Corpus, mixed: list[str], offline: dict[str, Any], profile_dir: Path,
               tuned: Path | None = None) -> dict[str, Any]:
    """Every configuration at every concurrency, the max_batch_size sweep, and the profile; each
    configuration in an `embserve serve` of its own."""
    mode = service.mode
    limit = offline["mixed"]["texts_per_s"]
    single = Workload("mixed", mixed)
    queries = Workload("queries", corpus.queries)
    out: dict[str, Any] = {"configs": {}, "sweep": [], "extras": []}

    layouts = {name: (overrides, None) for name, overrides in CONFIGS.items()
               if mode.only is None or name in mode.only}
    if tuned:  # a tuned layout as its own config file, measured like the defaults and reported beside them
        layouts[f"tuned ({tuned.name})"] = ({}, tuned)
    for name, (overrides, config) in layouts.items():
        print(f"{name}: embserve serve {(config or service.base.config).name} with {overrides or 'its settings'} ...",
              flush=True)
        with service.serving(service.layout(overrides, config)) as bench:
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
            if config:
                out["configs"][name]["config"] = str(config)
            if name == FULL_ENGINE:  # the short-text headline: 32 clients of queries and passage heads
                short = bench.point(Workload("short", corpus.short(2000, 0)), concurrency=HEADLINE_CONCURRENCY,
                                    label=f"{name} short c={HEADLINE_CONCURRENCY}")
                print(describe_point(name, short, offline.get("short", {}).get("texts_per_s")), flush=True)
                out["configs"][name]["short"] = short
            if name == FULL_ENGINE and mode.extras:
                out["extras"] = run_extras(bench, corpus, mixed, points, limit, offline)
            if name == FULL_ENGINE and mode.profile_s:
                try:
                    out["profile"] = run_profile(bench, single, mode, profile_dir)
                except OSError as exc:  # no py-spy, or not allowed to attach: the measurements above still count
                    print(f"profile skipped: {exc}", flush=True)

    for size in mode.sweep:
        overrides = {"max_batch_size": size}
        print(f"sweep: max_batch_size={size} ...", flush=True)
        with service.serving(service.layout(overrides)) as bench:
            bench.warm(single)
            point = bench.point(single, concurrency=SWEEP_CONCURRENCY, label=f"max_batch_size={size}")
        point["max_batch_size"] = size
        print(describe_point(f"max_batch_size={size}", point, limit), flush=True)
        out["sweep"].append(point)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a 4-minute smoke run: the batching-off and full-engine configurations (build/bench-quick/)")
    parser.add_argument("--out", type=Path, default=None, help="where benchmarks.md goes (default: docs/, "
                        "or build/bench-quick/ with --quick)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the serve config every configuration "
                        "starts from (default: the checkout's serve_config.yaml, what ships)")
    parser.add_argument("--tuned", type=Path, default=None, help="a serve config of a tuned layout, measured as "
                        "one more configuration and reported beside the defaults")
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
                        "instead of the fast path that `embserve serve` starts (embserve/launch/serve_env.py)")


def run(args: argparse.Namespace) -> None:
    mode = QUICK if args.quick else FULL
    if args.duration:
        mode = replace(mode, duration_s=args.duration)
    if args.profile_seconds is not None:
        mode = replace(mode, profile_s=args.profile_seconds)
    if args.torch_threads is not None:
        mode = replace(mode, torch_threads=args.torch_threads)
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs")
    offline_env()
    stop_on_signals()

    from bench.report import write_report

    base = Layout(config=args.config.resolve(), env=dict(PLAIN_SERVE) if args.plain_serve else {})
    started = time.time()
    results: dict[str, Any] = {"mode": mode.name, "machine": machine(), "settings": mode.__dict__,
                               "service": {"command": "embserve serve", "config": relative(base.config),
                                           "tuned": relative(args.tuned.resolve()) if args.tuned else None,
                                           "fast_path": not args.plain_serve}}
    corpus = load_or_build(None, args.seed)
    results["corpus"] = corpus.stats()
    mixed = corpus.mixed(2000, args.seed)
    gate = procs.QuietGate(args.quiet_wait if args.quiet_wait is not None else (0 if args.quick else 180))
    gate.wait()
    results["offline"] = measure_offline(corpus, mixed, mode)
    service = Service(base, args.port, mode, not args.no_progress, gate)
    results.update(run_served(service, corpus, mixed, results["offline"], ROOT / "build" / "bench-profile",
                              args.tuned.resolve() if args.tuned else None))
    results["waited_for_quiet_s"] = gate.waited_s
    results["elapsed_s"] = round(time.time() - started, 1)
    report = write_report(results, out)
    print(f"done in {results['elapsed_s']:.0f} s: {report}", flush=True)


def relative(path: Path) -> str:
    """A path as the report shows it: relative to the checkout where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("run", argv)


if __name__ == "__main__":
    raise SystemExit(main())
