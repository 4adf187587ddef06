"""The `embserve` console command: one argparse subcommand per task, each a `cmd_<name>` function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from embserve.shards import FORMATS


def _add_embed(commands: argparse._SubParsersAction) -> None:
    from embserve.bulk import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS, parse_actors

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
    from embserve.bulk import embed_corpus, settings_from_config

    settings = settings_from_config(args.config, args.app) if args.config else None
    actors = args.actors if args.actors is None or args.actors[0] != args.actors[1] else args.actors[0]
    summary = embed_corpus(
        args.input, args.output, column=args.column, id_column=args.id_column, settings=settings, model=args.model,
        truncate=args.truncate, format=args.format, shard_rows=args.shard_rows, chunk_rows=args.chunk_rows,
        actors=actors, cpus_per_actor=args.cpus_per_actor, num_gpus=args.num_gpus, max_shards=args.max_shards)
    print(json.dumps(summary.to_dict()) if args.json else summary, flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="embserve", description="An OpenAI-compatible text-embedding service.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    from embserve.shards import BulkInputError

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except BulkInputError as err:
        print(f"embserve {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
