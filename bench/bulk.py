"""Bulk embedding against the offline limit: `embserve embed`'s Ray Data job on N generated rows, its texts/s
and tokens/s beside the same model in-process on the same kind of texts, and the peak memory (RSS) of the
driver and of the embedding actors, sampled from /proc, at two corpus sizes to show that it does not grow.

    python -m bench bulk                          # 200,000 rows against 50,000 (long on 2 cores)
    python -m bench bulk --rows 50000 --compare 20000
    python -m bench bulk --rows 4000 --compare 0 --cpus-per-actor 2   # one actor on both cores

Rows are the benchmark corpus's queries and passages, shuffled (bench.corpus `mixed`), written as JSONL with
an id. The offline limit is measured before the first run and again after each (the best layout found first,
on the same texts, with Ray shut down), so that each run is compared with the limit measured on either side
of it: the ratio is to their mean, and the range is to each. The cores each process used during a run come
from /proc (the driver, Ray's own processes, the actors, and what no process used). Linux only. Starts its own
local Ray: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import cpu_snapshot, cpu_usage, descendants, process_stat
from embserve.bulk.options import DEFAULT_SHARD_ROWS


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def is_actor(pid: int) -> bool:
    try:
        return b"ShardEmbedder" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class MemoryPeaks:
    """Peak RSS of this (driver) process, of the embedding actors together, and of the largest one; and the
    last CPU ticks seen of every process of the run (pid -> (role, ticks)), so that the CPU of one that exits
    before the run's end (Ray Data's actors go when the dataset is done) is still counted."""

    driver: int = 0
    actors: int = 0
    one_actor: int = 0
    samples: int = 0
    last_ticks: dict[int, tuple[str, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def sample(self) -> None:
        found = descendants()
        actors = [rss_bytes(pid) for pid in found if is_actor(pid)]
        for pid, role in found.items():
            stat = process_stat(pid)
            if stat is not None:
                self.last_ticks[pid] = (role, stat[1])
        self.driver = max(self.driver, rss_bytes(os.getpid()))
        self.actors = max(self.actors, sum(actors))
        self.one_actor = max(self.one_actor, max(actors, default=0))
        self.samples += 1

    def run(self, every_s: float = 0.5) -> None:
        while not self._stop.wait(every_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def to_dict(self) -> dict[str, float]:
        mib = 1 << 20
        return {"driver_mib": round(self.driver / mib, 1), "actors_mib": round(self.actors / mib, 1),
                "one_actor_mib": round(self.one_actor / mib, 1), "samples": self.samples}


def write_rows(texts: list[str], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


def corpus_texts(n: int, seed: int) -> list[str]:
    from bench.corpus import load_or_build

    return load_or_build(Path("build/bench-corpus.json"), seed).mixed(n, seed)


@dataclass
class OfflineLimit:
    """The same model in this process: the fastest of the tried sorted-batching layouts (one forward on every
    core, or one single-thread forward per core), as bench.offline measures the server; `again` measures that
    layout once more on the same texts."""

    texts: list[str]
    dtype: str
    model: object = None
    best: object = None

    def first(self) -> dict:
        from bench.offline import OfflineModel

        cores = len(os.sched_getaffinity(0))
        # The runtime `embserve embed` runs at its default (runtime: auto), so the ratio is to the same engine.
        self.model = OfflineModel(dtype=self.dtype, runtime="auto")
        self.best, _ = self.model.best(self.texts, batch_sizes=(32, 128), layouts=((cores, 1), (1, cores)))
        return self.best.to_dict()

    def again(self) -> dict:
        b = self.best
        return self.model.sorted_batches(self.texts, b.batch_size, b.threads, streams=b.streams).to_dict()


def against(tokens_per_s: float, before: dict, after: dict) -> dict:
    """A run's tokens/s against the offline limit measured before and after it: to their mean, and to each."""
    limits = (before["tokens_per_s"], after["tokens_per_s"])
    return {"vs_offline_tokens": round(tokens_per_s / (sum(limits) / 2), 3),
            "vs_offline_tokens_range": [round(tokens_per_s / max(limits), 3), round(tokens_per_s / min(limits), 3)],
            "offline_tokens_per_s": list(limits)}


def cores_by_process(usage) -> dict:
    """Cores each kind of process used during a run (2.0 = both cores for the whole run), from bench.procs."""
    d = usage.to_dict()
    roles = {("driver" if role == "load generator" else role): v for role, v in d["by_role"].items()}
    return {"by_role": roles, "other processes": d["foreign"], "idle": d["idle"], "window_s": d["window_s"]}


def bulk_run(texts: list[str], work: Path, args: argparse.Namespace) -> dict:
    from embserve.bulk.job import embed_corpus
    from embserve.settings import Settings

    src = work / f"rows-{len(texts)}.jsonl"
    write_rows(texts, src)
    out = work / f"out-{len(texts)}"
    peaks = MemoryPeaks()
    driver_before = rss_bytes(os.getpid())
    sampler = threading.Thread(target=peaks.run, name="rss-sampler", daemon=True)
    sampler.start()
    before = cpu_snapshot()
    try:
        summary = embed_corpus(str(src), str(out), id_column="id", settings=Settings(dtype=args.dtype),
                               shard_rows=args.shard_rows, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                               progress=args.progress)
    finally:
        peaks.stop()
        sampler.join()
    after = cpu_snapshot()
    after.per_pid = {**peaks.last_ticks, **after.per_pid}  # and those that exited since the last sample
    cores = cores_by_process(cpu_usage(before, after))
    shutil.rmtree(out, ignore_errors=True)
    src.unlink()
    actors = int(summary.layout.split()[0].split("-")[-1])
    # Texts/s while the actors work: their shard time, spread over the pool, leaves out their start.
    working = summary.texts / (summary.shard_seconds / actors) if summary.shard_seconds else 0.0
    memory = {**peaks.to_dict(), "driver_before_mib": round(driver_before / (1 << 20), 1)}
    return {"rows": len(texts), "summary": summary.to_dict(), "memory": memory, "actors": actors, "cores": cores,
            "working_texts_per_s": round(working, 2),
            "working_tokens_per_s": round(working * summary.tokens / max(1, summary.texts), 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--compare", type=int, default=50_000, help="a second, smaller run for the memory peak; 0: none")
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="the shipped default unless set")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--cpus-per-actor", type=float, default=None)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--offline-texts", type=int, default=2000, help="texts for the offline limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show Ray Data's progress bars")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    texts = corpus_texts(args.rows, args.seed)
    limit = OfflineLimit(texts[: args.offline_texts], args.dtype)
    offline = [limit.first()]
    print("offline limit:", json.dumps(offline[0]), flush=True)
    import ray

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        for n in [n for n in (args.compare, args.rows) if n]:
            ray.init(include_dashboard=False, log_to_driver=False)
            t0 = time.perf_counter()
            run = bulk_run(texts[:n], Path(tmp), args)
            run["wall_s"] = round(time.perf_counter() - t0, 1)
            ray.shutdown()
            time.sleep(3)  # Ray's processes exit after shutdown returns: the limit is measured without them
            offline.append(limit.again())
            print("offline limit again:", json.dumps(offline[-1]), flush=True)
            s = run["summary"]
            run.update(against(s["tokens_per_s"], offline[-2], offline[-1]))
            working = against(run["working_tokens_per_s"], offline[-2], offline[-1])
            run["working_vs_offline_tokens"] = working["vs_offline_tokens"]
            run["working_vs_offline_tokens_range"] = working["vs_offline_tokens_range"]
            runs.append(run)
            print(f"{n} rows: {s['texts_per_s']} texts/s, {s['tokens_per_s']} tokens/s "
                  f"({run['vs_offline_tokens']}x offline, {run['vs_offline_tokens_range']}) over {s['seconds']:.0f} s; "
                  f"while the actors work {run['working_texts_per_s']} texts/s ({run['working_vs_offline_tokens']}x); "
                  f"padding {s['padding_efficiency']}, {s['layout']}; cores {json.dumps(run['cores'])}; "
                  f"peak RSS {json.dumps(run['memory'])}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "cores": len(os.sched_getaffinity(0)), "offline": offline[0],
              "offline_rounds": offline, "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("bulk", argv)


if __name__ == "__main__":
    raise SystemExit(main())
