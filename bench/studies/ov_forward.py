"""What one OpenVINO forward of a few short texts costs, and where: fixed cost, static against dynamic shapes,
its nodes, and shape churn. In-process, one stream on one thread (as each of a CPU replica's forward workers runs).

    python -m bench ov-forward --rounds 3

The bundled model's converted IR (embserve's cache, converted first where it is not there), compiled as the replica
compiles it but with one stream of one thread. CPU per infer from the process's CPU time (the infer runs on
OpenVINO's stream thread, and nothing else runs meanwhile), token ids all the same (their values do not change the
cost). Parts:
- *fixed cost*: CPU per infer at 1 x 1 to 16 x 16 tokens, at bf16 and f32 precision: what one more forward costs
  whatever it holds;
- *static shapes*: the same shapes compiled static (`model.reshape`) against the dynamic model: what the dynamic
  shapes' per-infer work (shape inference, memory) costs;
- *nodes*: OpenVINO's own per-node timings (`PERF_COUNT`) at 1 x 1 and 4 x 16, by node type, and the rest of the
  infer outside the nodes;
- *shape churn*: 300 groups of 2-6 texts of 10-50 tokens run in a random order, then the same groups sorted so
  that equal shapes follow each other (all shapes warm in the executor cache in both).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import ROOT, offline_env, short_commit, write_json

SHAPES = ((1, 1), (1, 16), (4, 16), (16, 16))
STATIC_SHAPES = ((1, 1), (1, 16), (4, 16))
REPEATS = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "ov-forward.json")


def ir_of(runtime_reason: str) -> Path | None:
    """The IR file of the cache entry that a model's runtime reason names (EmbeddingModel._start_openvino)."""
    found = re.search(r"(?:cached IR|cached as) (\S+?)[,;]", runtime_reason)
    return Path(found.group(1)) / "model.xml" if found else None


def converted_ir() -> Path:
    """The bundled model's cached IR, as a replica finds it (converted now where the cache has none)."""
    from bench.offline import OfflineModel

    model = OfflineModel(dtype="auto", runtime="openvino")
    ir = ir_of(model.model.runtime_reason)
    if model.runtime != "openvino" or ir is None:
        raise SystemExit(f"no cached OpenVINO IR: {model.model.runtime_reason}")
    return ir


def properties(precision: str, **extra: str) -> dict[str, str]:
    from embserve.engine.openvino_runtime import compile_properties

    return {**compile_properties(precision, streams=1, threads=1), **extra}


def inputs(n: int, length: int) -> dict[str, Any]:
    import numpy as np

    return {"input_ids": np.full((n, length), 1000, np.int64), "attention_mask": np.ones((n, length), np.int64)}


def cpu_ms(request: Any, feeds: list[dict[str, Any]]) -> float:
    """CPU per infer over `feeds` run in order, in ms."""
    start = time.process_time()
    for feed in feeds:
        request.infer(feed)
    return (time.process_time() - start) / len(feeds) * 1e3


def run(args: argparse.Namespace) -> None:
    import openvino as ov

    offline_env()
    ir = converted_ir()
    core = ov.Core()
    dynamic = {p: core.compile_model(core.read_model(str(ir)), "CPU", properties(p)).create_infer_request()
               for p in ("bf16", "f32")}
    static = {}
    for n, length in STATIC_SHAPES:
        model = core.read_model(str(ir))
        model.reshape({"input_ids": [n, length], "attention_mask": [n, length]})
        static[(n, length)] = core.compile_model(model, "CPU", properties("bf16")).create_infer_request()
    profiled = core.compile_model(core.read_model(str(ir)), "CPU",
                                  properties("bf16", PERF_COUNT="YES")).create_infer_request()
    rng = random.Random(0)
    churn_shapes = [(rng.randint(2, 6), rng.randint(10, 50)) for _ in range(300)]
    feeds = {shape: inputs(*shape) for shape in {*SHAPES, *churn_shapes}}
    for feed in feeds.values():  # every shape's executor built before anything is timed
        dynamic["bf16"].infer(feed)
        dynamic["bf16"].infer(feed)
    rounds: list[dict[str, Any]] = []
    for round_no in range(1, args.rounds + 1):
        got: dict[str, Any] = {"round": round_no, "fixed": {}, "static": {}, "churn": {}}
        for precision, request in dynamic.items():
            for shape in SHAPES:
                request.infer(feeds[shape])
                got["fixed"][f"{precision} {shape[0]}x{shape[1]}"] = round(
                    cpu_ms(request, [feeds[shape]] * REPEATS), 3)
        for shape, request in static.items():
            request.infer(feeds[shape])
            got["static"][f"{shape[0]}x{shape[1]}"] = {
                "dynamic": round(cpu_ms(dynamic["bf16"], [feeds[shape]] * REPEATS), 3),
                "static": round(cpu_ms(request, [feeds[shape]] * REPEATS), 3)}
        shuffled = churn_shapes[:]
        rng.shuffle(shuffled)
        got["churn"] = {"random order": round(cpu_ms(dynamic["bf16"], [feeds[s] for s in shuffled]), 3),
                        "equal shapes together": round(cpu_ms(dynamic["bf16"], [feeds[s] for s in
                                                                                sorted(churn_shapes)]), 3)}
        rounds.append(got)
        print(f"round {round_no}: fixed {got['fixed']}\n  static {got['static']}\n  churn {got['churn']}", flush=True)
    nodes = {}
    for shape in ((1, 1), (4, 16)):
        times: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for _ in range(20):
            profiled.infer(feeds[shape])
        start = time.process_time()
        for _ in range(REPEATS):
            profiled.infer(feeds[shape])
            for node in profiled.get_profiling_info():
                key = f"{node.node_type} ({node.exec_type})"
                times[key] += node.real_time.total_seconds() * 1e3 / REPEATS
                counts[key] += 1
        total = (time.process_time() - start) / REPEATS * 1e3
        top = sorted(times.items(), key=lambda kv: -kv[1])[:6]
        nodes[f"{shape[0]}x{shape[1]}"] = {
            "infer_cpu_ms": round(total, 3), "in_nodes_ms": round(sum(times.values()), 3),
            "nodes": sum(counts.values()) // REPEATS,
            "top": {k: {"ms": round(v, 3), "count": counts[k] // REPEATS} for k, v in top}}
        print(f"nodes {shape}: {nodes[f'{shape[0]}x{shape[1]}']}", flush=True)

    def median(path: list[str]) -> float:
        values = []
        for got in rounds:
            value: Any = got
            for key in path:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    print("\nCPU ms per infer, medians over rounds (one stream, one thread):")
    for key in rounds[0]["fixed"]:
        print(f"  {key:12s} {median(['fixed', key]):7.2f}")
    for key in rounds[0]["static"]:
        print(f"  bf16 {key:7s} dynamic {median(['static', key, 'dynamic']):6.2f}  static "
              f"{median(['static', key, 'static']):6.2f}")
    print(f"  shape churn: random order {median(['churn', 'random order']):.2f}, equal shapes together "
          f"{median(['churn', 'equal shapes together']):.2f}")
    write_json(args.out, {"commit": short_commit(), "ir": str(ir), "openvino": ov.get_version(), "rounds": rounds,
                          "nodes": nodes})
    print(f"wrote {args.out}")
