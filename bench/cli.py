"""`python -m bench`: one argparse subcommand per benchmark, each module's `add_arguments` and `run`.

Only the chosen subcommand's module is imported, so `python -m bench --help` lists everything without
loading torch or Ray. Each module also keeps `python -m bench.<module>` working through `main`, which
goes through the same parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    help: str


# The maintained suite: what docs/benchmarks.md's tables come from, rerun when the server changes.
SUITE: dict[str, Command] = {
    "run": Command("bench.run", "the whole benchmark: offline limit, served configurations, docs/benchmarks.md"),
    "ab": Command("bench.ab", "same-run A/B of checkouts and settings, in interleaved rounds"),
    "soak": Command("bench.soak", "the replica's memory under a steady load"),
    "load": Command("bench.load", "load any running OpenAI-compatible embeddings server"),
    "offline": Command("bench.offline", "the in-process (offline) embedding limit alone"),
    "report": Command("bench.report", "re-render docs/benchmarks.md from a results.json"),
    "corpus": Command("bench.corpus", "build the benchmark corpus and print its statistics"),
    "bulk": Command("bench.bulk", "embserve embed against the offline limit, and its peak memory"),
    "peers": Command("bench.peers", "embserve's shipped defaults against Infinity, same run"),
    "rerank": Command("bench.rerank", "POST /v1/rerank against the cross-encoder's offline limit"),
    "client-cost": Command("bench.client_cost", "the load generator's own CPU per request"),
    "gpu": Command("bench.gpu", "the GPU path without Ray: batch sweep, offline limit, the scheduler"),
    "simulated-gpu": Command("bench.simulated_gpu", "the GPU worker on a simulated card (no GPU, no Ray)"),
    "planner": Command("bench.planner", "one batch plan's time at 64 to 512 pending inputs (no Ray)"),
}
# One-off studies: each answered a design question once (bench/studies/); kept runnable, not maintained
# figures.
STUDIES: dict[str, Command] = {
    "experiments": Command("bench.studies.experiments", "study: Serve flags, torch threads, engine knobs vs defaults"),
    "cpu-dtypes": Command("bench.studies.cpu_dtypes", "study: float32 against bf16 autocast and bf16 weights"),
    "heap-shapes": Command("bench.studies.heap_shapes", "study: a CPU model's RSS under ever new shapes"),
    "record-cost": Command("bench.studies.record_cost", "study: what one metrics event costs, in ns"),
    "gpu-take-model": Command("bench.studies.gpu_take_model",
                              "study: the GPU worker's closed loop as an event model, by clients and group choice"),
    "serve-floor": Command("bench.studies.serve_floor",
                           "study: Serve's two hops per request with no model behind them, beside the shipped service"),
    "ov-forward": Command("bench.studies.ov_forward",
                          "study: one OpenVINO forward's fixed cost, static shapes, nodes and shape churn"),
    "idle-cost": Command("bench.studies.idle_cost", "study: what an idle service spends, by process, per environment"),
}
COMMANDS: dict[str, Command] = {**SUITE, **STUDIES}


def first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0]


def parser(chosen: str | None) -> argparse.ArgumentParser:
    """The top parser; only `chosen`'s module is imported to add its options."""
    top = argparse.ArgumentParser(prog="python -m bench", description="embserve's benchmarks. Studies are "
                                  "one-off experiments (bench/studies/); the rest is the maintained suite.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if name != chosen:
            commands.add_parser(name, help=command.help)
            continue
        module = importlib.import_module(command.module)
        sub = commands.add_parser(name, help=command.help, description=first_line(module.__doc__),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; the servers this bench started were stopped", file=sys.stderr)
        return 130


def module_main(command: str, argv: Sequence[str] | None = None) -> int:
    """`python -m bench.<module> ARGS` is `python -m bench <command> ARGS`."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])
