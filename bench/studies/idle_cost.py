"""What an idle service spends, by process: `embserve serve` of the shipped serve_config.yaml, no requests.

    python -m bench idle-cost --rounds 2 --seconds 40 --variant 'loop 0.5 s={"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}'

Each arm is the shipped service started by `embserve serve` with an environment over the one it would get (Serve's
variables: embserve/launch/serve_env.py; a value given here wins, as a user's does); "shipped" is none. After the
service answers, the study waits `--settle` seconds (so that what starts lazily is up and the start's own work
is done), then reads every process's CPU from /proc over `--seconds`. Rounds interleave the arms. What an idle
service spends, it spends under load too: on a machine with two cores, every hundredth of a core is about half a
percent of what the model could have had.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, offline_env, short_commit, stop_on_signals, write_json

# Process titles shortened to what tells them apart: Ray's actors by class, its daemons by binary.
NAMES = (
    ("embedder replica", re.compile(r"ServeReplica:[^:]+:Embedder")),
    ("ingress replica", re.compile(r"ServeReplica:[^:]+:Ingress")),
    ("Serve controller", re.compile(r"ServeController")),
    ("Serve proxy actor", re.compile(r"ProxyActor")),
    ("HAProxy manager", re.compile(r"HAProxyManager")),
    ("HAProxy", re.compile(r"(^|/)haproxy\b")),
    ("metrics actor", re.compile(r"MetricsActor")),
    ("GCS", re.compile(r"gcs_server")),
    ("raylet", re.compile(r"raylet")),
    ("dashboard agent", re.compile(r"DashboardAgent|dashboard/agent\.py")),
    ("dashboard", re.compile(r"dashboard/dashboard\.py|ray-dashboard-|ray\.dashboard")),  # with its head modules
    ("log monitor", re.compile(r"log_monitor")),
    ("autoscaler monitor", re.compile(r"autoscaler/_private/monitor")),
    ("runtime env agent", re.compile(r"RuntimeEnvAgent|runtime_env/agent")),
    ("embserve serve", re.compile(r"embserve(\.launch\.cli)? serve|bin/embserve serve")),
    ("serve run", re.compile(r"serve run|ray/serve/scripts")),
)


def name_of(title: str) -> str:
    return next((name for name, rx in NAMES if rx.search(title)), "other")


def arms_of(variants: list[str]) -> dict[str, dict[str, str]]:
    arms: dict[str, dict[str, str]] = {"shipped": {}}
    for spec in variants:
        name, _, env = spec.partition("=")
        arms[name.strip()] = {str(k): str(v) for k, v in json.loads(env).items()}
    return arms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=40.0, help="measured seconds per arm and round")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds between the first answer and the window")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME={ENV JSON}",
                        help="an arm: the shipped service with these environment variables set before Ray starts")
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "idle-cost.json")


def measure(base_env: dict[str, str], port: int, settle_s: float, seconds: float) -> dict[str, Any]:
    from bench import procs
    from bench.service import DEFAULT_CONFIG, Layout, embserve_serve

    with embserve_serve(Layout(config=DEFAULT_CONFIG, env=base_env), port):
        time.sleep(settle_s)
        before = procs.cpu_snapshot()
        time.sleep(seconds)
        after = procs.cpu_snapshot()
        titles = {pid: procs.title_of(pid) for pid in after.per_pid}
    usage = procs.cpu_usage(before, after)
    by_name: dict[str, float] = {}
    for pid, (_, ticks) in after.per_pid.items():
        if pid not in before.per_pid:
            continue  # born inside the window: its CPU would not be this window's alone
        name = "this study" if pid == os.getpid() else name_of(titles[pid])
        by_name[name] = by_name.get(name, 0.0) + (ticks - before.per_pid[pid][1]) / procs.CLK_TCK / usage.window_s
    return {"window_s": round(usage.window_s, 2),
            "cores_by_process": {k: round(v, 4) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])},
            "service_cores": round(sum(v for k, v in by_name.items() if k != "this study"), 4),
            "other_load_cores": round(usage.foreign, 4), "idle_cores": round(usage.idle or 0.0, 3)}


def run(args: argparse.Namespace) -> None:
    offline_env()
    stop_on_signals()
    arms = arms_of(args.variant)
    results: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        for name, env in arms.items():
            got = measure(env, args.port, args.settle, args.seconds)
            got.update(arm=name, round=round_no + 1, env=env)
            results.append(got)
            print(f"round {round_no + 1} {name}: the service {got['service_cores']:.3f} cores "
                  f"(other load {got['other_load_cores']:.3f}); "
                  + ", ".join(f"{k} {v:.4f}" for k, v in list(got["cores_by_process"].items())[:6]), flush=True)
    print("\ncores an idle service spends, median over rounds:")
    names = sorted({k for r in results for k in r["cores_by_process"]},
                   key=lambda k: -max(r["cores_by_process"].get(k, 0) for r in results))
    print(f"{'process':22s} " + " ".join(f"{a:>14s}" for a in arms))
    for key in ["service"] + names:
        cells = []
        for arm in arms:
            values = [r["service_cores"] if key == "service" else r["cores_by_process"].get(key, 0.0)
                      for r in results if r["arm"] == arm]
            cells.append(f"{statistics.median(values):14.4f}")
        print(f"{key:22s} " + " ".join(cells))
    write_json(args.out, {"commit": short_commit(), "seconds": args.seconds, "settle_s": args.settle,
                          "arms": arms, "rounds": results})
    print(f"\nwrote {args.out}")
