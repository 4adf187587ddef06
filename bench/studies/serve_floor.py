"""What Ray Serve's two hops cost per request with no model behind them: the floor under embserve's CPU per text.

    python -m bench serve-floor --rounds 3

The floor app has the design's shape and nothing else: a FastAPI ingress deployment (one route that reads the
JSON body and answers OpenAI's shape in base64) calling a replica deployment whose `@serve.batch` method hands
back a fixed 384-float vector per request (bench/studies/serve_floor_app.py); a second floor arm is the same ingress
answering by itself (one deployment, one hop fewer). All start through `embserve serve`, so they run on the same Serve
fast path (HAProxy, gRPC handles, user code on the replica's loop) as the shipped service. Each round serves the two
floor apps and the shipped serve_config.yaml (in alternating order), and drives each as bench.ab does: 32 closed-loop
single-text clients of the short mix, then one client of short queries, with every process's CPU per served text by
role and the machine's idle cores.

What the floor's processes spend per request is what any service of this shape pays before its model runs: with the
in-process forward cost of a text beside it, it bounds what the served path can reach on this many cores.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, offline_env, short_commit, stop_on_signals, write_json

FLOOR_APP = "bench.studies.serve_floor_app:build_app"  # imported by Serve only, so that --help needs no Ray


def floor_config(shipped: Path, out: Path, one_deployment: bool = False) -> Path:
    """The shipped serve config with the floor app in place of embserve's (same HTTP and proxy options)."""
    config = yaml.safe_load(shipped.read_text()) or {}
    config["applications"] = [{"name": "floor", "route_prefix": "/", "import_path": FLOOR_APP,
                               "args": {"one_deployment": one_deployment}}]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "serve-floor.json")


def run(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from bench import procs
    from bench.ab import QUIET_WAIT_S, summary, workloads_of
    from bench.measure import FULL, Bench, measure_variant
    from bench.service import DEFAULT_CONFIG, Layout, embserve_serve

    offline_env()
    stop_on_signals()
    workloads = workloads_of("short")
    build = ROOT / "build"
    arms = {"floor (no model)": Layout(config=floor_config(DEFAULT_CONFIG, build / "serve-floor.yaml")),
            "floor, one deployment": Layout(config=floor_config(DEFAULT_CONFIG, build / "serve-floor-one.yaml", True)),
            "embserve (shipped)": Layout(config=DEFAULT_CONFIG)}
    mode = replace(FULL, duration_s=args.seconds)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for k in range(args.rounds):
        for name, layout in (list(arms.items()) if k % 2 == 0 else list(arms.items())[::-1]):
            with embserve_serve(layout, args.port) as base_url:
                bench = Bench(base_url, mode, progress=False, gate=procs.QuietGate(QUIET_WAIT_S))
                point = measure_variant(bench, workloads, name)
            results[name].append(point)
            cpu = point["c32"].get("cpu") or {}
            per_text = {role: round(cores * 1000 / point["c32"]["texts_per_s"], 2)
                        for role, cores in (cpu.get("by_role") or {}).items()}
            print(f"round {k + 1} {name}: {point['c32']['texts_per_s']:.1f} texts/s, CPU ms per text {per_text}, "
                  f"idle {cpu.get('idle')} cores, lone query p50 {point['single_query']['latency_ms'].get('p50')} ms",
                  flush=True)
    report = {name: summary(runs) for name, runs in results.items()}
    for name, s in report.items():
        totals = [sum(by_role.values()) for by_role in s["cpu_ms_per_text_by_role"]]
        s["cpu_ms_per_text_all"] = [round(t, 2) for t in totals]
        print(f"{name}: texts/s median {statistics.median(s['texts_per_s']):.1f}; CPU ms per text, all processes: "
              f"{s['cpu_ms_per_text_all']}; lone query p50 {s['single_query_p50_ms']}", flush=True)
    write_json(args.out, {"commit": short_commit(), "arms": report, "rounds": results})


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("serve-floor", argv)


if __name__ == "__main__":
    raise SystemExit(main())
