"""The `embserve` console command: one argparse subcommand per task, each a `cmd_<name>` function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from embserve.bulk.options import FORMATS, BulkInputError, missing_bulk_extra


def _add_embed(commands: argparse._SubParsersAction) -> None:
    from embserve.bulk.options import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS, parse_actors

    p = commands.add_parser(
        "embed", help="embed a whole corpus into Parquet files, on Ray Data, as the server would embed each text",
        description="Embed every row of INPUT (JSONL, Parquet or plain text files; local paths or URIs such as "
        "s3://bucket/dir) into OUT/part-XXXXX.parquet (id, embedding) with the server's model and batching. "
        "Refused rows go to OUT/_rejects/. A rerun into the same OUT skips the shards already done. Settings "
        "(model, dtype, device, token budget, truncate, ...) come from EMB_PROVIDER_* and .env, or --config.")
    p.add_argument("input", nargs="+", help="input files or directories")
    p.add_argument("--output", "-o", required=True, help="output directory (local path or URI)")
    p.add_argument("--column", default="text", help="the text column or JSON key (default: text)")
    p.add_argument("--id-column", default=None, help="the id column or JSON key (default: <file>:<line or row>)")
    p.add_argument("--format", choices=FORMATS, default=None, help="input format (default: from the extension)")
    p.add_argument("--config", default=None, help="a serve_config.yaml whose application args give the settings")
    p.add_argument("--app", default=None, help="the application of --config (default: its first)")
    p.add_argument("--model", default=None, help="a model name or alias of the settings, or a model folder or hub id")
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=None,
                   help="cut over-long texts instead of refusing them (default: the truncate setting)")
    p.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                   help=f"rows per shard and part file (default: {DEFAULT_SHARD_ROWS})")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                   help=f"texts sorted and grouped by length at once (default: {DEFAULT_CHUNK_ROWS})")
    p.add_argument("--actors", type=parse_actors, default=None,
                   help="N actors, or MIN-MAX to grow with the cluster (default: one per GPU, else one per CPU)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs each actor reserves and runs torch threads on (default: 1)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: the num_gpus setting, "
                   "or 1 where the cluster has GPUs)")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards; a rerun goes on")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(run=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    try:
        from embserve.bulk.job import embed_corpus, settings_from_config
    except ModuleNotFoundError as err:
        message = missing_bulk_extra(err)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        return 2

    settings = settings_from_config(args.config, args.app) if args.config else None
    actors = args.actors if args.actors is None or args.actors[0] != args.actors[1] else args.actors[0]
    summary = embed_corpus(
        args.input, args.output, column=args.column, id_column=args.id_column, settings=settings, model=args.model,
        truncate=args.truncate, format=args.format, shard_rows=args.shard_rows, chunk_rows=args.chunk_rows,
        actors=actors, cpus_per_actor=args.cpus_per_actor, num_gpus=args.num_gpus, max_shards=args.max_shards)
    print(json.dumps(summary.to_dict()) if args.json else summary, flush=True)
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve", help="serve a Serve config (serve_config.yaml) on Serve's fast path; stops all it started",
        description="Run `serve run CONFIG` with Serve's fast path (embserve/launch/serve_env.py; a variable you set "
        "wins). Refuses to start when a port it needs is taken, naming the process that holds it. On Ctrl-C, "
        "SIGTERM or SIGHUP it asks Serve to shut down, then stops every process the run started, HAProxy "
        "included; an HAProxy whose Ray went away (`ray stop`) is stopped at once. Other options are passed to "
        "`serve run`.")
    p.add_argument("config", nargs="?", default="serve_config.yaml", help="a Serve config file (default: "
                   "serve_config.yaml)")
    p.add_argument("--grace-s", type=float, default=60.0, help="how long Serve may take to shut down before its "
                   "processes are killed (default: 60)")
    p.set_defaults(run=cmd_serve, passes_unknown=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from embserve.launch.serving import serve

    return serve(args.config, args.extra, grace_s=args.grace_s)


def _add_stop(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "stop", help="stop this user's `embserve serve` runs and whatever a killed one left",
        description="Ask every `embserve serve` of this user to stop (SIGTERM) and wait for it; then stop what "
        "a run whose `embserve serve` is gone (killed with SIGKILL, say) left: its `serve run`, the local Ray "
        "that started, and HAProxy. Touches no other HAProxy and no Ray cluster that `embserve serve` did not "
        "start.")
    p.add_argument("--timeout-s", type=float, default=90.0, help="how long to wait for each run (default: 90)")
    p.set_defaults(run=cmd_stop)


def cmd_stop(args: argparse.Namespace) -> int:
    from embserve.launch.serving import StillRuns, stop

    done = stop(timeout_s=args.timeout_s)
    print("\n".join(done) if done else "embserve stop: nothing to stop", flush=True)
    return 1 if any(isinstance(line, StillRuns) for line in done) else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="embserve", description="An OpenAI-compatible text-embedding service.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(commands)
    _add_serve(commands)
    _add_stop(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra and not getattr(args, "passes_unknown", False):
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.run(args)
    except BulkInputError as err:
        print(f"embserve {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
