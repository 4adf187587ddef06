"""The offline limit: the same texts embedded in this process by the same model, with the best batching
there is when everything is known in advance (sort by length, then batch), and the raw latency of one
short query's forward (the floor under a single client's p50).

The model and tokenizer are embserve's own (EmbeddingModel, Tokenizer), so the limit counts the same
tokenization and the same padded forward the replicas run, and nothing else. The limit is measured in
float32 and in bf16 in the same run (DTYPES); which one the replicas run is `dtype: auto`'s call.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embserve.engine.model import EmbeddingModel
from embserve.engine.tokenize import Tokenizer
from embserve.settings import ModelSpec

if TYPE_CHECKING:
    from bench.corpus import Corpus
    from bench.measure import Mode

# A replica's runs at 32 clients hold about 20 one-text jobs (20.45 inputs per run measured in full runs).
ENGINE_RUN_INPUTS = 20
MAX_BATCH_TOKENS = 8192  # the replicas' CPU token budget (embserve.settings.CPU_MAX_BATCH_TOKENS)
# The limit is measured in both: float32 (sentence-transformers' numbers) and bf16 autocast (the default
# where the CPU multiplies bf16 natively), set explicitly so that both are measured on any CPU.
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class OfflineResult:
    texts: int
    tokens: int  # real tokens, special tokens included (what `usage.prompt_tokens` counts)
    padded_tokens: int
    seconds: float  # tokenize + forward
    tokenize_s: float
    batch_size: int
    threads: int
    streams: int = 1  # forwards at once, each on `threads` torch threads (a replica's forward_workers)
    dtype: str = ""  # what the matrix products ran in (EmbeddingModel.info.dtype)
    cpu_s: float | None = None  # this process's CPU over `seconds`' window (its warm-up left out, as there)

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 3),
                "texts_per_s": round(self.texts_per_s, 2),
                "tokens_per_s": round(self.tokens_per_s, 1),
                "padding_efficiency": round(self.tokens / self.padded_tokens, 4)}


class OfflineModel:
    """The bundled model and its tokenizer, loaded the way a replica loads them."""

    def __init__(self, source: str = "bundled", dtype: str = "auto", runtime: str = "torch") -> None:
        # OpenVINO's streams are fixed when it compiles: one per core, as a replica's forward workers.
        cores = os.cpu_count() or 1
        self.model = EmbeddingModel(ModelSpec(name="offline", source=source), device="cpu", dtype=dtype,
                                    runtime=runtime, streams=cores, threads=cores)
        self.runtime = self.model.runtime
        self.tokenizer = Tokenizer(self.model.tokenizer, self.model.max_length, self.model.vocab_size)

    def ids(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        return [self.tokenizer.finish(c, i, truncate) for i, c in enumerate(self.tokenizer.content_ids(texts))]

    def sorted_batches(self, texts: list[str], batch_size: int, threads: int,
                       max_batch_tokens: int = MAX_BATCH_TOKENS, streams: int = 1) -> OfflineResult:
        """Tokenize all, sort by length, forward in batches of `batch_size` (within the token budget);
        `streams` threads take the batches in turn from one list, each forward on `threads` torch threads."""
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self.model.forward(self.ids(texts[:4]))  # warm the allocator and kernels at this thread count
            t0, cpu0 = time.perf_counter(), time.process_time()
            ids = self.ids(texts)
            tokenize_s = time.perf_counter() - t0
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            groups: list[list[list[int]]] = []
            start = 0
            while start < len(order):
                end = start + 1
                # Longest is the last one (sorted), so the budget check is one multiplication.
                while (end < len(order) and end - start < batch_size
                       and (end - start + 1) * len(ids[order[end]]) <= max_batch_tokens):
                    end += 1
                groups.append([ids[i] for i in order[start:end]])
                start = end
            if streams == 1:
                for group in groups:
                    self.model.forward(group)
            else:
                with concurrent.futures.ThreadPoolExecutor(streams, initializer=torch.set_num_threads,
                                                           initargs=(threads,)) as pool:
                    list(pool.map(self.model.forward, groups))  # each free thread takes the next batch
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            torch.set_num_threads(previous)
        padded = sum(len(g) * len(g[-1]) for g in groups)
        return OfflineResult(texts=len(ids), tokens=sum(map(len, ids)), padded_tokens=padded, seconds=seconds,
                             tokenize_s=tokenize_s, batch_size=batch_size, threads=threads, streams=streams,
                             dtype=self.model.info.dtype, cpu_s=cpu_s)

    def engine_runs(self, texts: list[str], run_inputs: int, threads: int = 1) -> OfflineResult:
        """embserve's own scheduler (default batching settings) over consecutive admissions of `run_inputs`
        one-text jobs, laid out as a replica with `threads` torch threads lays it out on a CPU (one
        single-thread forward worker per thread), with as many admissions in flight as workers. What the
        replica's scheduler could do with what it is given under load, with no serving around it.
        `batch_size` in the result is `run_inputs`, `streams` the forward workers, `threads` the torch
        threads of each."""
        from embserve.api.contracts import EmbedJob
        from embserve.engine.scheduler import Scheduler, embed_jobs, forward_layout
        from embserve.metrics.events import Forward
        from embserve.settings import BatchingConfig

        layout = forward_layout("cpu", threads)
        forwards: list[Forward] = []
        cfg = BatchingConfig()
        scheduler = Scheduler(self.model, layout, config=lambda: cfg, max_batch_tokens=MAX_BATCH_TOKENS,
                              report=lambda r: forwards.append(r) if isinstance(r, Forward) else None)
        runs = [[EmbedJob(texts=[t]) for t in texts[start : start + run_inputs]]
                for start in range(0, len(texts), run_inputs)]
        try:
            with concurrent.futures.ThreadPoolExecutor(layout.workers) as runners:
                embed_jobs(scheduler, [EmbedJob(texts=[t]) for t in texts[:4]])  # warms the forward workers
                forwards.clear()
                t0 = time.perf_counter()
                t_tok = 0.0
                for results in runners.map(lambda jobs: embed_jobs(scheduler, jobs), runs):
                    t_tok += results[0].tokenize_s
                seconds = time.perf_counter() - t0
        finally:
            scheduler.close()
        return OfflineResult(texts=len(texts), tokens=sum(f.tokens for f in forwards),
                             padded_tokens=sum(f.padded_tokens for f in forwards), seconds=seconds,
                             tokenize_s=t_tok, batch_size=run_inputs,
                             threads=layout.threads_per_forward, streams=layout.workers,
                             dtype=self.model.info.dtype)

    def best(self, texts: list[str], batch_sizes: tuple[int, ...] = (8, 32, 128),
             layouts: tuple[tuple[int, int], ...] = ((1, 1), (2, 1)),
             rounds: int = 1) -> tuple[OfflineResult, list[OfflineResult]]:
        """The fastest of the tried (batch size, (torch threads, streams)) pairs, and the best of `rounds`
        for each.

        Rounds go over every pair in turn, so that a burst of other load (which only ever slows a pass
        down, and two torch threads on a shared 2-core box a lot) spoils one pass of a pair, not all."""
        best: dict[tuple[int, int, int], OfflineResult] = {}
        for _ in range(rounds):
            for t, n in layouts:
                for b in batch_sizes:
                    r = self.sorted_batches(texts, b, t, streams=n)
                    if (t, n, b) not in best or r.texts_per_s > best[(t, n, b)].texts_per_s:
                        best[(t, n, b)] = r
        tried = list(best.values())
        return max(tried, key=lambda r: r.texts_per_s), tried

    def single_latency_ms(self, texts: list[str], threads: int, repeats: int = 3,
                          gap_s: float = 0.0) -> dict[str, float]:
        """Tokenize + forward of one text at a time, as a replica does for a lone request: the floor
        under a single client's latency. Median over `texts`, each run `repeats` times; `gap_s` of
        idle time before each (a lone client's forwards are that far apart, and caches go cold)."""
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for text in texts[:5]:
                self.model.forward(self.ids([text]))
            times = []
            for text in texts:
                for _ in range(repeats):
                    if gap_s:
                        time.sleep(gap_s)  # idle on purpose: the gap is what is being measured
                    t0 = time.perf_counter()
                    self.model.forward(self.ids([text]))
                    times.append((time.perf_counter() - t0) * 1000)
        finally:
            torch.set_num_threads(previous)
        a = np.array(times)
        return {"p50": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3),
                "min": round(float(a.min()), 3), "threads": threads, "gap_ms": gap_s * 1000,
                "tokens_mean": round(float(np.mean([len(i) for i in self.ids(texts)])), 1)}


def best_by_dtype(models: dict[str, OfflineModel], texts: list[str], batch_sizes: tuple[int, ...],
                  layouts: tuple[tuple[int, int], ...],
                  rounds: int = 1) -> dict[str, tuple[OfflineResult, list[OfflineResult]]]:
    """`OfflineModel.best` for each dtype's model, its rounds interleaved with the other dtypes' so that a
    burst of other load spoils one pass of one dtype, not the whole of one."""
    kept: dict[str, dict[tuple[int, int, int], OfflineResult]] = {d: {} for d in models}
    for _ in range(rounds):
        for dtype, model in models.items():
            for r in model.best(texts, batch_sizes, layouts)[1]:
                key = (r.threads, r.streams, r.batch_size)
                if key not in kept[dtype] or r.texts_per_s > kept[dtype][key].texts_per_s:
                    kept[dtype][key] = r
    return {d: (max(found.values(), key=lambda r: r.texts_per_s), list(found.values())) for d, found in kept.items()}


def measure_offline(corpus: Corpus, mixed: list[str], mode: Mode) -> dict[str, Any]:
    """The limits every served figure is compared with, measured before Ray starts (nothing else runs)."""
    from bench import procs
    from embserve.engine.hardware import cpu_cores
    from embserve.engine.model import choose_dtype

    print("offline limit (in-process, sorted batching) ...", flush=True)
    before = procs.cpu_snapshot()
    # The replicas run `dtype: auto`; the limit is measured in both dtypes, and the served default's is the
    # one every ratio below is to (the others are set against both in the report).
    served = choose_dtype("auto", "cpu")
    models = offline_arms(served.autocast)
    # The arm the replicas run: OpenVINO where it converts, else (it fell back) torch's of the same dtype.
    served_label = next((label for label, m in models.items()
                         if m.model.info.dtype == served.name and m.runtime == served_runtime()),
                        f"torch {served.name}")
    model = models[served_label]
    threads = tuple(sorted({1, os.cpu_count() or 1}))
    # One forward at a time on 1 or all threads, and one single-thread forward per core at once (what a
    # replica's forward_workers do): the limit is the best of them.
    layouts = tuple(sorted({(t, 1) for t in threads} | {(1, max(threads))}))
    limits = best_by_dtype(models, mixed[: mode.offline_texts], mode.offline_batch_sizes, layouts, mode.offline_rounds)
    best, tried = limits[served_label]
    out: dict[str, Any] = {"mixed": best.to_dict(), "mixed_tried": [r.to_dict() for r in tried],
                           "served_dtype": served_label, "served_dtype_reason": served.reason,
                           "mixed_by_dtype": {d: b.to_dict() for d, (b, _) in limits.items()}}
    for d, (b, _) in limits.items():
        print(f"  mixed, {d}{' (served default)' if d == served_label else ''}: {b.texts_per_s:.1f} texts/s, "
              f"{b.tokens_per_s:.0f} tokens/s (batch {b.batch_size}, {b.streams} x {b.threads} threads)", flush=True)
    # The short-text mix (queries of 10-20 tokens, ~50-token passage heads): where a request's cost around
    # its forward shows most.
    short = best_by_dtype(models, corpus.short(mode.offline_texts, 0), mode.offline_batch_sizes, layouts,
                          mode.offline_rounds)
    out["short"] = short[served_label][0].to_dict()
    out["short_by_dtype"] = {d: b.to_dict() for d, (b, _) in short.items()}
    for d, (b, _) in short.items():
        print(f"  short, {d}{' (served default)' if d == served_label else ''}: {b.texts_per_s:.1f} texts/s",
              flush=True)
    if mode.extras:
        docs, _ = model.best(corpus.documents[:48], (8, 32), ((best.threads, best.streams),))
        out["documents"] = docs.to_dict()
        print(f"  documents (truncated to 256 tokens): {docs.texts_per_s:.1f} texts/s", flush=True)
    # The replica under 32 clients gets runs of about 20 one-text jobs (the rest of the clients are in
    # the other run in flight, or on their way): the same texts through embserve's Engine in such runs,
    # on the replica's forward layout for these threads.
    engine = max((model.engine_runs(mixed[: mode.offline_texts], ENGINE_RUN_INPUTS, threads=mode.torch_threads or cpu_cores())
                  for _ in range(mode.offline_rounds)), key=lambda r: r.texts_per_s)
    out["engine_runs"] = engine.to_dict()
    print(f"  embserve Engine, runs of {ENGINE_RUN_INPUTS} texts, {engine.streams} forward worker(s) x "
          f"{engine.threads} thread(s): {engine.texts_per_s:.1f} texts/s",
          flush=True)
    floors = {t: model.single_latency_ms(corpus.queries[:40], t) for t in threads}
    out["single_forward"] = {str(t): v for t, v in floors.items()}
    out["single_forward_floor_ms"] = min(v["p50"] for v in floors.values())
    cold = model.single_latency_ms(corpus.queries[:20], 1, repeats=2, gap_s=0.03)
    out["single_forward_cold"] = cold
    print(f"  one short query, tokenize + forward: p50 {out['single_forward_floor_ms']:.1f} ms "
          f"({cold['p50']:.1f} ms at 1 thread with 30 ms idle before each)", flush=True)
    del model, models
    out["other_load"] = procs.cpu_usage(before, procs.cpu_snapshot()).foreign
    return out


def served_runtime() -> str:
    """The runtime `runtime: auto` gives a CPU replica here (embserve.engine.openvino_runtime.choose_runtime)."""
    from embserve.engine.openvino_runtime import choose_runtime, openvino_installed

    return choose_runtime("auto", "cpu", True, openvino_installed())[0]


def offline_arms(native_bf16: bool) -> dict[str, OfflineModel]:
    """The offline limit's models: torch in float32 and bf16, OpenVINO in float32, and OpenVINO in bf16 where
    the CPU multiplies bf16 natively (elsewhere OpenVINO emulates it at a tenth of float32's speed, which
    no replica runs: `dtype: auto` is float32 there)."""
    arms = {f"torch {d}": OfflineModel(dtype=d, runtime="torch") for d in DTYPES}
    if served_runtime() == "openvino":
        for d in DTYPES:
            if d == "float32" or native_bf16:
                arms[f"openvino {d}"] = OfflineModel(dtype=d, runtime="openvino")
    return arms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", default="mixed", choices=("mixed", "queries", "passages", "documents"))
    parser.add_argument("--n", type=int, default=512, help="texts per pass")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 32, 128])
    parser.add_argument("--threads", type=int, nargs="*", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--rounds", type=int, default=1, help="passes over every pair, interleaved across dtypes")


def run(args: argparse.Namespace) -> None:
    from bench.corpus import load_or_build

    corpus = load_or_build(None, args.seed)
    texts = corpus.mixed(args.n, args.seed) if args.kind == "mixed" else corpus.kind(args.kind)[: args.n]
    models = {d: OfflineModel(dtype=d) for d in args.dtypes}
    layouts = tuple(sorted({(t, 1) for t in args.threads} | {(1, max(args.threads))}))
    limits = best_by_dtype(models, texts, tuple(args.batch_sizes), layouts, args.rounds)
    for dtype, (best, tried) in limits.items():
        for r in tried:
            print(json.dumps(r.to_dict()))
        print(f"best {dtype} ({models[dtype].model.dtype_reason}):", json.dumps(best.to_dict()))
    for dtype, offline in models.items():
        for t in args.threads:
            print(f"single query forward, {dtype}:", json.dumps(offline.single_latency_ms(corpus.queries[:40], t)))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("offline", argv)


if __name__ == "__main__":
    raise SystemExit(main())
