"""Same-run A/B of checkouts and settings, in interleaved rounds, each arm served as a user starts it
(`embserve serve` of that checkout's serve_config.yaml, on Serve's fast path): 32 single-text clients of the
mixed corpus and one client of short queries, with per-process CPU. What a change did, measured against the
commit before it on the same box in the same minutes. Each round also measures the in-process limit (this
checkout's model, runtime and dtype, in this process, on the same texts, with no server up; `--no-limit` skips it)
and a lone query's forward in-process, and gives each arm's served texts/s, replica CPU per text and lone-query
p50 against that round's. The limit is this checkout's shipped runtime and dtype: a variant or checkout that runs
another is held against it too (issue 28's bars compare with the shipped defaults' limit).

    python -m bench ab --rounds 3 --checkout HEAD~1 --variant "shipped defaults" \\
        --variant 'float32, 1 thread={"dtype": "float32", "torch_threads": 1}'

Each checkout other than this one is put in a git worktree under build/ab/ and its server runs its own code
(PYTHONPATH and working directory); the load generator is this checkout's for every arm, so that the arms
differ in the server only. Rounds repeat every (checkout, variant) pair, so that a burst of someone else's
load hits one round, not one arm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import procs
from bench.common import ROOT, offline_env, short_commit, stop_on_signals, write_json
from bench.load import Workload
from bench.measure import FULL, Bench, measure_variant
from bench.service import Layout, embserve_serve

QUIET_WAIT_S = 30.0  # per window: how long a point waits for other processes' load to pass
LIMIT_BATCH_SIZES = (16, 32)  # the in-process limit's batch sizes on short texts (docs/benchmarks.md, 2026-12-07)
LIMIT_TEXTS = 1024  # texts per pass of the in-process limit
LONE_QUERIES = 40  # queries, each tokenized and embedded alone after LONE_GAP_S idle, for the in-process lone forward
LONE_GAP_S = 0.05  # what a lone client's requests are apart, about (its round trip): the caches go cold meanwhile


def checkout_dir(rev: str, root: Path = ROOT) -> Path:
    """`root` itself for "here", else a detached worktree of `rev` under build/ab/ (made once)."""
    if rev == "here":
        return root
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = root / "build" / "ab" / sha
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=root, check=True,
                       capture_output=True)
    return path


def arm_layout(checkout: Path, settings: dict[str, Any]) -> Layout:
    """An arm's server: the checkout's own serve_config.yaml, with the variant's settings."""
    return Layout(config=checkout / "serve_config.yaml", settings=dict(settings))


def measure(checkout: Path, name: str, settings: dict[str, Any], seconds: float, port: int,
            workloads: dict[str, Workload]) -> dict[str, Any]:
    """One arm, in an `embserve serve` of its own, driven by this checkout's load generator."""
    mode = replace(FULL, duration_s=seconds)
    with embserve_serve(arm_layout(checkout, settings), port, checkout=checkout) as base_url:
        bench = Bench(base_url, mode, progress=False, gate=procs.QuietGate(QUIET_WAIT_S))
        return measure_variant(bench, workloads, name)


def workloads_of(kind: str, seed: int = 0) -> dict[str, Workload]:
    """What every arm is sent: "mixed" (the corpus's queries and passages) or "short" (queries of 10-20
    tokens and ~50-token passage heads) for the 32 clients, and the queries for the lone client."""
    from bench.corpus import load_or_build

    corpus = load_or_build(None, seed)
    texts = corpus.short(2000, seed) if kind == "short" else corpus.mixed(2000, seed)
    return {"mixed": Workload(kind, texts), "queries": Workload("queries", corpus.queries)}


def summary(runs: list[dict[str, Any]], limits: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An arm's rounds; with `limits` (the in-process limit measured in each round), each round against its
    own round's limit."""
    def cores(run: dict[str, Any], role: str) -> float:
        return ((run["c32"].get("cpu") or {}).get("by_role") or {}).get(role, 0.0)

    tps = [r["c32"]["texts_per_s"] for r in runs]
    return {
        **(against_limits(runs, limits) if limits else {}),
        "texts_per_s": tps,
        "texts_per_s_median": statistics.median(tps),
        "single_query_p50_ms": [r["single_query"]["latency_ms"].get("p50") for r in runs],
        "replica_cores": [round(cores(r, "replica"), 3) for r in runs],
        "replica_cpu_ms_per_text": [round(cores(r, "replica") * 1000 / r["c32"]["texts_per_s"], 2) for r in runs],
        "ingress_cores": [round(cores(r, "ingress"), 3) for r in runs],
        # Every process's CPU per served text, by role: what a request costs around its forward.
        "cpu_ms_per_text_by_role": [{role: round(c * 1000 / r["c32"]["texts_per_s"], 2) for role, c in
                                     ((r["c32"].get("cpu") or {}).get("by_role") or {}).items()} for r in runs],
        "other_load": [round((r["c32"].get("cpu") or {}).get("foreign", 0.0), 3) for r in runs],
        "idle_cores": [(r["c32"].get("cpu") or {}).get("idle") for r in runs],
        # Each forward worker's share of the window running / runnable without a CPU / asleep.
        "forward_threads": [(r["c32"].get("cpu") or {}).get("forward_threads") for r in runs],
        # The replica's CPU per text by thread (bench.procs.replica_split), and all CPU per text but its
        # runtime's threads: what a request costs outside its forward where the runtime computes on threads
        # of its own (OpenVINO's streams; torch with one thread per worker computes in the workers).
        "replica_threads_ms_per_text": [per_text(r, replica_threads(r)) for r in runs],
        "outside_forward_ms_per_text": [outside_forward(r) for r in runs],
    }


def against_limits(runs: list[dict[str, Any]], limits: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 28's ratios, each round against the limit measured in that round: served texts/s over the
    limit's, the replica's CPU per text (all of it, and its runtime's threads) over the limit's, and how much
    longer a lone query took served (p50) than its forward in-process."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 2)

    out: dict[str, list[float | None]] = {"served_over_limit": [], "replica_cpu_over_limit": [],
                                          "runtime_threads_over_limit": [], "lone_p50_less_forward_ms": []}
    for run, limit in zip(runs, limits, strict=True):
        lone = run["single_query"]["latency_ms"].get("p50")
        forward = limit.get("lone_forward_ms")
        out["lone_p50_less_forward_ms"].append(None if lone is None or forward is None else round(lone - forward, 2))
        tps = run["c32"]["texts_per_s"]
        replica = ((run["c32"].get("cpu") or {}).get("by_role") or {}).get("replica")
        split = replica_threads(run)
        out["served_over_limit"].append(ratio(tps, limit["texts_per_s"]))
        out["replica_cpu_over_limit"].append(ratio(replica * 1000 / tps if replica and tps else None,
                                                   limit["cpu_ms_per_text"]))
        out["runtime_threads_over_limit"].append(ratio(split["runtime threads"] * 1000 / tps if split and tps
                                                       else None, limit["cpu_ms_per_text"]))
    return out


def in_process_limit(model: Any, texts: list[str], batch_sizes: tuple[int, ...] = LIMIT_BATCH_SIZES) -> dict[str, Any]:
    """The in-process limit of `model` (bench.offline.OfflineModel: this checkout's shipped runtime and dtype)
    on the arms' texts: sorted into batches, one single-thread forward per core as a replica lays them out,
    tokenizing included. The best of `batch_sizes` by texts/s, with this process's CPU per text over the same
    window (the pass's warm-up forward left out of both)."""
    if not batch_sizes:
        raise ValueError("the in-process limit needs at least one batch size")
    cores = os.cpu_count() or 1
    best: dict[str, Any] = {}
    for batch_size in batch_sizes:
        before = time.process_time()
        result = model.sorted_batches(texts, batch_size, threads=1, streams=cores)
        cpu_s = result.cpu_s if result.cpu_s is not None else time.process_time() - before
        point = {"texts_per_s": round(result.texts_per_s, 1), "cpu_ms_per_text": round(cpu_s * 1000 / result.texts, 2),
                 "batch_size": batch_size, "runtime": model.runtime, "dtype": result.dtype}
        if not best or point["texts_per_s"] > best["texts_per_s"]:
            best = point
    return best


def lone_forward_ms(model: Any, queries: list[str]) -> float:
    """p50 of tokenizing and embedding one query alone in this process, after LONE_GAP_S of idleness each, on
    one thread as a replica's forward worker runs it: what a lone request's forward costs in-process."""
    return model.single_latency_ms(queries, threads=1, repeats=2, gap_s=LONE_GAP_S)["p50"]


def replica_threads(run: dict[str, Any]) -> dict[str, float] | None:
    return (run["c32"].get("cpu") or {}).get("replica_threads")


def per_text(run: dict[str, Any], cores: dict[str, float] | None) -> dict[str, float] | None:
    tps = run["c32"]["texts_per_s"]
    return None if cores is None or not tps else {k: round(v * 1000 / tps, 2) for k, v in cores.items()}


def outside_forward(run: dict[str, Any]) -> float | None:
    """CPU per text of every process of the service and the load generator, less the replica's runtime
    threads; None where the replica's threads were not told apart."""
    cpu, split = run["c32"].get("cpu") or {}, replica_threads(run)
    tps = run["c32"]["texts_per_s"]
    if split is None or not tps:
        return None
    return round((sum(cpu.get("by_role", {}).values()) - split["runtime threads"]) * 1000 / tps, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--checkout", action="append", default=[], help="a git revision to compare (this "
                        "working tree always runs, as 'here')")
    parser.add_argument("--variant", action="append", default=[], help='NAME or NAME={settings as JSON}')
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "ab.json")
    parser.add_argument("--workload", choices=("mixed", "short"), default="mixed",
                        help="what the 32 clients send: the corpus's queries and passages, or queries of 10-20 "
                        "tokens and ~50-token passage heads")
    parser.add_argument("--limit", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the in-process limit (this checkout's model, runtime and dtype, on the "
                        "same texts) in every round, and give each arm's ratios to it")


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """'NAME' or 'NAME={settings as JSON}'."""
    name, _, settings = spec.partition("=")
    return name, json.loads(settings) if settings else {}


def run(args: argparse.Namespace) -> None:
    offline_env()
    stop_on_signals()
    workloads = workloads_of(args.workload)
    variants = [parse_variant(spec) for spec in args.variant or ["shipped defaults"]]
    arms = [(rev, name, settings) for rev in ["here", *args.checkout] for name, settings in variants]
    where = {rev: checkout_dir(rev) for rev in ["here", *args.checkout]}
    results: dict[str, list[dict[str, Any]]] = {f"{rev}: {name}": [] for rev, name, _ in arms}
    model, limits = None, []
    if args.limit:
        from bench.offline import OfflineModel, served_runtime

        model = OfflineModel(dtype="auto", runtime=served_runtime())
    for k in range(args.rounds):
        if model is not None:  # with no server up: the round's in-process limit
            limits.append({**in_process_limit(model, workloads["mixed"].texts[:LIMIT_TEXTS]),
                           "lone_forward_ms": lone_forward_ms(model, workloads["queries"].texts[:LONE_QUERIES])})
            print(f"round {k + 1} in-process limit: {limits[-1]}", flush=True)
        for rev, name, settings in arms if k % 2 == 0 else arms[::-1]:
            run = measure(where[rev], name, settings, args.seconds, args.port, workloads)
            results[f"{rev}: {name}"].append(run)
            print(f"round {k + 1} {rev}: {name}: {run['c32']['texts_per_s']:.1f} texts/s, lone query p50 "
                  f"{run['single_query']['latency_ms'].get('p50')} ms", flush=True)
    report = {arm: summary(runs, limits or None) for arm, runs in results.items()}
    checkouts = {rev: short_commit(cwd=path) for rev, path in where.items()}
    write_json(args.out, {"checkouts": checkouts, "arms": report, "rounds": results, "in_process_limits": limits})
    print(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("ab", argv)


if __name__ == "__main__":
    raise SystemExit(main())
