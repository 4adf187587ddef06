"""Bulk embedding of a whole corpus on Ray Data, with the server's model, tokenizer, length grouping and token
budget: `embed_corpus` (and `embserve embed`) plans deterministic shards, and a Ray Data actor pool reads,
embeds and writes each one to its own part file.

The shards travel through Ray Data (`from_items` → `map_batches` with an actor pool), and each actor reads its
shard's byte range or row groups itself with pyarrow. Ray Data's own readers (`read_json`, `read_text`,
`read_parquet`) cut files into blocks that depend on the cluster's size and number no rows, so rows read
through them could not keep the same id from one run to the next, and a shard could not be written whole.
Each actor holds one shard at a time, so memory is bounded by `shard_rows`, whatever the corpus's size.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embserve.api.errors import InputTooLong, NonFiniteOutput
from embserve.bulk.options import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS
from embserve.bulk.shards import (
    REJECTS_DIR,
    BulkInputError,
    Shard,
    ShardRows,
    done_parts,
    list_inputs,
    open_fs,
    pending,
    plan_shards,
    prepare_output,
    read_shard,
    save_plan,
    tmp_path,
    write_atomically,
)
from embserve.engine.batching import Plan, plan_batches, plan_stats
from embserve.settings import BatchingConfig, ModelSpec, Settings

# Small enough that the run's last shards, which leave the other actors idle, are a short tail (10,000-row
# shards left one of two CPU actors idle through a fifth of a 50,000-row run: docs/benchmarks.md, "Bulk
# embedding"); large enough that a shard's fixed cost (a task, a file) is noise beside its forwards.
# On a CPU, one single-thread actor per core: measured faster than one actor on every core (docs/benchmarks.md,
# "Bulk embedding"), as no forward waits at an OpenMP barrier for a descheduled thread; it is the layout the
# server's replica uses for its forward workers too.
CPU_THREADS_PER_ACTOR = 1

log = logging.getLogger(__name__)


def settings_from_config(path: str, app: str | None = None) -> Settings:
    """The Settings a `serve_config.yaml` application's `args` give (EMB_PROVIDER_* and .env fill the rest),
    as `serve run` would build them. `app`: the application's name; the first one when None."""
    import yaml

    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    apps = config.get("applications") or []
    found = next((a for a in apps if app is None or a.get("name") == app), None)
    if found is None:
        raise BulkInputError(f"{path} has no application {app!r}" if app else f"{path} has no application")
    return Settings(**(found.get("args") or {}))


def pick_spec(settings: Settings, model: str | None = None) -> ModelSpec:
    """The model to embed with: the settings' first model, the one named (or aliased) `model`, or else
    `model` read as a source (a folder or hub id), named after its last path part."""
    specs = settings.model_specs()
    found = specs[0] if model is None else next(
        (s for s in specs if model == s.name or model in s.aliases), None)
    if found is not None and found.task != "embed":
        raise BulkInputError(f"model {found.name!r} is a {found.task} model: embserve embed runs embedding "
                             "models only (bulk reranking is not supported)")
    if found is not None:
        return found
    return ModelSpec(name=posixpath.basename(model.rstrip("/")) or model, source=model)


@dataclass(frozen=True)
class ActorLayout:
    """The actor pool: between `min_actors` and `max_actors` actors, each reserving `num_cpus` CPUs and
    `num_gpus` GPUs and running its forwards on `threads` torch threads."""

    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float
    threads: int

    def describe(self) -> str:
        count = str(self.min_actors) if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        where = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        return f"{count} actors x ({where}, {self.threads} torch threads)"


def actor_layout(cluster: dict[str, float], settings: Settings, *, actors: int | tuple[int, int] | None = None,
                 cpus_per_actor: float | None = None, num_gpus: float | None = None) -> ActorLayout:
    """One actor per GPU where there are GPUs (or `num_gpus` / the `num_gpus` setting asks for them), else
    one single-thread actor per CPU of the cluster `cluster` (ray.cluster_resources()). `actors` and
    `cpus_per_actor` override the count and the size."""
    gpus = num_gpus if num_gpus is not None else settings.num_gpus
    if not gpus and (settings.device == "cuda" or (settings.device == "auto" and cluster.get("GPU", 0) > 0)):
        gpus = 1
    if gpus:
        per = cpus_per_actor if cpus_per_actor is not None else 1.0
        fit = max(1, int(cluster.get("GPU", 0) // gpus))
    else:
        per = cpus_per_actor if cpus_per_actor is not None else float(CPU_THREADS_PER_ACTOR)
        fit = max(1, int(cluster.get("CPU", 1) // per)) if per else 1
    lo, hi = (actors, actors) if isinstance(actors, int) else actors or (fit, fit)
    return ActorLayout(lo, hi, num_cpus=per, num_gpus=float(gpus), threads=max(1, round(per)))


def tokenize_and_plan(tokenizer: Any, texts: Sequence[str], truncate: bool, cfg: BatchingConfig, budget: int,
                      group_cost: int) -> tuple[list[list[int]], list[int], dict[int, str], Plan]:
    """What the server does to a run's texts: one tokenizer call, special tokens and the length limit, then
    its plan of length groups within the token budget. Returns the model-ready sequences, the index (into
    `texts`) of each, the texts refused as too long (index -> message), and the plan (indices into the
    sequences)."""
    sequences: list[list[int]] = []
    kept: list[int] = []
    too_long: dict[int, str] = {}
    # The model's default prompt, as the server puts it before a request's texts that name none.
    for i, ids in enumerate(tokenizer.content_ids(tokenizer.model_texts(list(texts), tokenizer.prompt(None)))):
        try:
            sequences.append(tokenizer.finish(ids, i, truncate))
            kept.append(i)
        except InputTooLong as err:
            too_long[i] = (f"the text has {err.tokens} tokens, more than this model's maximum of {err.maximum}; "
                           "shorten it or pass --truncate")
    plan = plan_batches([len(s) for s in sequences], max_batch_tokens=budget,
                        group_by_length=cfg.enable_length_grouping, tolerance=cfg.length_group_tolerance,
                        min_group_size=cfg.min_batch_size, group_cost_tokens=group_cost) if sequences else []
    return sequences, kept, too_long, plan


@dataclass
class ShardReport:
    index: int
    rows: int = 0
    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    forwards: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    pid: int = 0


class ShardEmbedder:
    """A Ray Data actor (a callable class for map_batches): owns a model and its tokenizer, and turns each
    shard it is given into `OUT/part-XXXXX.parquet` (and its refused rows into `OUT/_rejects/`). Usable
    without Ray too: `embed_shard(shard)`."""

    def __init__(self, spec: ModelSpec, settings: Settings, in_fs: pafs.FileSystem, out_fs: pafs.FileSystem,
                 out: str, column: str, id_column: str | None, truncate: bool, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 threads: int | None = None) -> None:
        import torch

        from embserve.engine.hardware import assigned_gpu_share, assigned_gpus, start_replica

        # The server's replica start, for one forward at a time per actor on the actor's threads (one OpenVINO
        # stream on all of them): device, model, token budget, warm-up and group cost as a replica has them.
        actor = {"forward_workers": 1} | ({"torch_threads": threads} if threads is not None else {})
        start = start_replica(spec, settings.model_copy(update=actor), torch.cuda.is_available(), assigned_gpus(),
                              assigned_gpu_share())
        for warning in start.warnings:
            log.warning(warning)
        self.model, self.profile = start.model, start.profile
        self.tokenizer = self.model.request_tokenizer()
        self.budget = start.batch_tokens
        self.cfg = settings.batching(start.batch_size, start.batch_tokens)
        if not start.tolerance_wall:  # as the server's scheduler: a measured group cost alone weighs padding
            self.cfg = self.cfg.model_copy(update={"length_group_tolerance": 1.0})
        # What one more forward costs in the plan: as the server's engine weighs it on this device.
        self.group_cost = start.group_cost_tokens
        self.settings, self.in_fs, self.out_fs, self.out = settings, in_fs, out_fs, out
        self.column, self.id_column, self.truncate, self.chunk_rows = column, id_column, truncate, chunk_rows
        self.dim = self.model.info.dimensions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        reports = [self.embed_shard(Shard.from_row({k: v[i] for k, v in batch.items()}))
                   for i in range(len(batch["index"]))]
        return {"index": [r.index for r in reports], "rows": [r.rows for r in reports],
                "texts": [r.texts for r in reports], "tokens": [r.tokens for r in reports],
                "padded_tokens": [r.padded_tokens for r in reports], "forwards": [r.forwards for r in reports],
                "rejects": [json.dumps(r.rejects) for r in reports], "seconds": [r.seconds for r in reports],
                "pid": [r.pid for r in reports]}

    def embed_shard(self, shard: Shard) -> ShardReport:
        """Read, embed and write one shard. Its part file appears only once complete (written under
        `_tmp/`, then moved), after its rejects file, so a part file means the whole shard is done."""
        t0 = time.perf_counter()
        rows = read_shard(self.in_fs, shard, self.column, self.id_column, self.settings.max_input_chars)
        report = ShardReport(index=shard.index, rows=len(rows.texts), pid=os.getpid())
        schema = pa.schema([(self.id_column or "id", rows.ids.type), ("embedding", pa.list_(pa.float32(), self.dim))],
                           metadata={"embserve.engine.model": self.model.info.name, "embserve.dtype": self.model.info.dtype,
                                     "embserve.runtime": self.model.runtime})
        todo = [k for k, text in enumerate(rows.texts) if text is not None]
        tmp = tmp_path(self.out, shard.part)
        with pq.ParquetWriter(tmp, schema, filesystem=self.out_fs) as writer:
            for start in range(0, len(todo), self.chunk_rows):
                table = self._embed_chunk(rows, todo[start : start + self.chunk_rows], schema, report)
                if table.num_rows:
                    writer.write_table(table)
        if rows.refused:
            write_atomically(self.out_fs, rejects_table(rows), posixpath.join(self.out, REJECTS_DIR, shard.part), self.out)
        self.out_fs.move(tmp, posixpath.join(self.out, shard.part))
        report.rejects = dict(Counter(reason for reason, _ in rows.refused.values()))
        report.seconds = time.perf_counter() - t0
        return report

    def _embed_chunk(self, rows: ShardRows, chunk: list[int], schema: pa.Schema, report: ShardReport) -> pa.Table:
        sequences, kept, too_long, plan = tokenize_and_plan(
            self.tokenizer, [rows.texts[k] for k in chunk], self.truncate, self.cfg, self.budget, self.group_cost)
        for i, message in too_long.items():
            rows.refuse(chunk[i], "too_long", message)
        vectors = np.empty((len(sequences), self.dim), dtype=np.float32)
        failed: list[int] = []
        for group in plan:
            try:
                vectors[group] = self.model.forward([sequences[i] for i in group])
            except NonFiniteOutput as exc:  # a row the model cannot embed is a reject, not the job's end
                vectors[group] = exc.vectors
                for row in exc.rows:
                    failed.append(group[row])
                    rows.refuse(chunk[kept[group[row]]], "non_finite_output", str(exc))
        if failed:
            good = sorted(set(range(len(sequences))) - set(failed))
            vectors, kept = vectors[good], [kept[i] for i in good]
        stats = plan_stats([len(s) for s in sequences], plan)
        report.texts += stats.inputs - len(failed)
        report.tokens += stats.tokens
        report.padded_tokens += stats.padded_tokens
        report.forwards += stats.groups
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), self.dim)
        ids = rows.ids.take(pa.array([chunk[i] for i in kept], pa.int64()))
        return pa.Table.from_arrays([ids, embedding], schema=schema)


def rejects_table(rows: ShardRows) -> pa.Table:
    """The refused rows of a shard: id (as a string; null where the row had none), position, reason, message."""
    at = sorted(rows.refused)
    ids = [rows.ids[k].as_py() for k in at]
    return pa.table({
        "id": pa.array([None if i is None else str(i) for i in ids], pa.string()),
        "row": pa.array([rows.positions[k] for k in at], pa.string()),
        "reason": pa.array([rows.refused[k][0] for k in at], pa.string()),
        "message": pa.array([rows.refused[k][1] for k in at], pa.string()),
    })


@dataclass
class BulkSummary:
    """What one `embed_corpus` call did. `texts`, `tokens`, ... count this run's shards only; shards that an
    earlier run had finished are `shards_skipped`."""

    output: str
    model: str
    layout: str
    shards: int  # in the whole plan
    shards_skipped: int  # done by an earlier run
    shards_run: int
    shards_left: int  # neither done before nor in this run (max_shards)
    rows: int = 0
    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    forwards: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of this run, actors' start and model loading included
    shard_seconds: float = 0.0  # time the actors spent on shards (read, embed, write), all actors together

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0

    def add(self, report: ShardReport) -> None:
        self.shards_run += 1
        self.rows += report.rows
        self.texts += report.texts
        self.tokens += report.tokens
        self.padded_tokens += report.padded_tokens
        self.forwards += report.forwards
        self.shard_seconds += report.seconds
        for reason, n in report.rejects.items():
            self.rejects[reason] = self.rejects.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "rejected": self.rejected,
                "texts_per_s": round(self.texts_per_s, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "padding_efficiency": round(self.padding_efficiency, 4)}

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejects.items())) or "none"
        left = f", {self.shards_left} left for a rerun" if self.shards_left else ""
        return "\n".join([
            f"embedded {self.texts} texts ({self.tokens} tokens) with {self.model} in {self.seconds:.1f} s: "
            f"{self.texts_per_s:.1f} texts/s, {self.tokens_per_s:.0f} tokens/s",
            f"padding efficiency {self.padding_efficiency:.3f} over {self.forwards} forwards; {self.layout}",
            f"rejects: {self.rejected} ({reasons}), in {posixpath.join(self.output, REJECTS_DIR)}",
            f"shards: {self.shards_run} run, {self.shards_skipped} done before{left}, of {self.shards}; "
            f"output in {self.output}",
        ])


def embed_corpus(input: str | Sequence[str], output: str, *, column: str = "text", id_column: str | None = None,
                 settings: Settings | None = None, model: str | None = None, truncate: bool | None = None,
                 format: str | None = None, shard_rows: int = DEFAULT_SHARD_ROWS, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 actors: int | tuple[int, int] | None = None, cpus_per_actor: float | None = None,
                 num_gpus: float | None = None, max_shards: int | None = None, progress: bool = True) -> BulkSummary:
    """Embed every row of `input` into Parquet files under `output`, as the server would embed each text.

    - `input`: a file, a directory, or a list of them; local paths or URIs pyarrow understands (s3://,
      gs://, file://). JSONL (`.jsonl`, `.ndjson`, `.json`), Parquet (`.parquet`, `.pq`) or plain text
      (`.txt`, one text per line); `format` ("jsonl", "parquet", "text") for other names.
    - `column`: the text field (JSONL, Parquet). `id_column`: the id field; without it a row's id is
      "<file>:<line>" (text and JSONL, lines from 1) or "<file>:<row>" (Parquet, rows from 0), where
      <file> is the path under the input directory, or the file's name.
    - `output`: a directory (local or URI) that gets `part-XXXXX.parquet` files with the id (column
      `id_column` or `id`) and `embedding`, a fixed-size list of float32, and `_rejects/part-XXXXX.parquet`
      with the rows that were refused (id, row, reason, message).
    - `settings`: the server's Settings (EMB_PROVIDER_* and .env when None; `settings_from_config` reads a
      serve_config.yaml): model, dtype, device, token budget, length grouping, truncate, max_input_chars.
      `model` picks one of its models by name or alias, or names another model folder or hub id.
    - `truncate`: cut over-long texts instead of refusing them (None: the `truncate` setting).
    - The work runs as a Ray Data actor pool (`actor_layout`: one actor per GPU, or one single-thread actor
      per CPU); Ray is started locally unless already initialized or RAY_ADDRESS names a cluster.
    - Resumable: a rerun into the same `output` skips the shards whose part file exists. `max_shards` stops
      this run after that many shards.

    (Over 50 lines for this documentation of a public entry point; the body is its steps: inputs, the plan,
    what is left to do, the actor layout, `embed_on_actors`.)
    """
    import ray

    settings = settings if settings is not None else Settings()
    spec = pick_spec(settings, model)
    truncate = settings.truncate if truncate is None else truncate
    in_fs, files = list_inputs([input] if isinstance(input, str) else list(input), format)
    if files[0].format == "text" and id_column:
        raise BulkInputError("plain text has no id column: its rows are named by file and line")
    out_fs, out = open_fs(output)
    key = {"inputs": [[f.name, f.size, f.format] for f in files], "column": column, "id_column": id_column,
           "shard_rows": shard_rows, "truncate": truncate, "model": spec.model_dump(exclude={"deployment", "aliases"})}
    shards = prepare_output(out_fs, out, key)
    if shards is None:
        shards = plan_shards(in_fs, files, shard_rows, [column] + ([id_column] if id_column else []))
        save_plan(out_fs, out, key, shards)
    todo = pending(shards, done_parts(out_fs, out))
    run = todo if max_shards is None else todo[:max_shards]
    summary = BulkSummary(output=output, model=spec.name, layout="no actors: nothing to run", shards=len(shards),
                          shards_skipped=len(shards) - len(todo), shards_run=0, shards_left=len(todo) - len(run))
    if not run:
        return summary
    if not ray.is_initialized():
        ray.init()
    layout = actor_layout(ray.cluster_resources(), settings, actors=actors, cpus_per_actor=cpus_per_actor,
                          num_gpus=num_gpus)
    summary.layout = layout.describe()
    embedder = dict(spec=spec, settings=settings, in_fs=in_fs, out_fs=out_fs, out=out, column=column,
                    id_column=id_column, truncate=truncate, chunk_rows=chunk_rows, threads=layout.threads)
    t0 = time.perf_counter()
    for report in embed_on_actors(run, layout, embedder, progress):
        summary.add(report)
    summary.seconds = time.perf_counter() - t0
    return summary


def embed_on_actors(run: Sequence[Shard], layout: ActorLayout, embedder: dict[str, Any],
                    progress: bool) -> Iterator[ShardReport]:
    """Each shard of `run` embedded by a Ray Data pool of `layout`'s ShardEmbedder actors (built with the
    `embedder` arguments), one shard in flight per actor; their reports as they finish."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = progress
    size = min(layout.max_actors, len(run))
    results = ray.data.from_items([s.to_row() for s in run], override_num_blocks=len(run)).map_batches(
        ShardEmbedder, batch_size=1, fn_constructor_kwargs=embedder,
        # One shard in flight per actor: the last shards go to whichever actor is free.
        compute=ActorPoolStrategy(min_size=min(layout.min_actors, size), max_size=size,
                                  max_tasks_in_flight_per_actor=1),
        num_cpus=layout.num_cpus, num_gpus=layout.num_gpus or None)
    for row in results.iter_rows():
        yield ShardReport(index=row["index"], rows=row["rows"], texts=row["texts"], tokens=row["tokens"],
                          padded_tokens=row["padded_tokens"], forwards=row["forwards"],
                          rejects=json.loads(row["rejects"]), seconds=row["seconds"], pid=row["pid"])
