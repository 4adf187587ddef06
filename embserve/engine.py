"""One coalesced run as plain code: tokenize all inputs once, plan groups, one forward per group (shortest
first when grouping by length), and hand each request its vectors as soon as its own inputs are done.
Errors stay with the request that caused them; a request whose caller left is dropped from the forwards
still to come."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from embserve.batching import plan_batches, plan_stats
from embserve.errors import Cancelled, EmbservError, Unavailable
from embserve.forwards import ForwardPool
from embserve.model import EmbeddingModel
from embserve.settings import BatchingConfig
from embserve.tokenize import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class EmbedJob:
    """One HTTP request's inputs, as the ingress normalized them."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    truncate: bool = False
    enqueued_at: float = 0.0  # time.time() when the replica queued it; set by the replica
    weight: int = 1  # what it counts for in max_batch_size; set by the replica
    cancelled: bool = False  # the caller went away: skip it rather than compute for nobody

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass
class EmbedResult:
    vectors: np.ndarray | None
    prompt_tokens: int = 0
    error: EmbservError | None = None
    queue_s: float = 0.0
    tokenize_s: float = 0.0
    forward_s: float = 0.0


@dataclass
class BatchReport:
    """What one batch did, for the metrics."""

    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    forwards: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    queue_s: list[float] = field(default_factory=list)
    tokenize_s: float = 0.0
    forward_s: float = 0.0


@dataclass(frozen=True)
class ForwardLayout:
    """How a replica spends its CPU threads: `workers` forwards at once, each on `threads_per_forward`."""

    workers: int
    threads_per_forward: int

    @property
    def threads(self) -> int:
        return self.workers * self.threads_per_forward


def forward_layout(device: str, threads: int, workers: int | None = None) -> ForwardLayout:
    """Split a replica's `threads` (torch_threads, or what Ray gave it) among concurrent forwards.

    `workers` None picks: one forward per thread on a CPU, so that no forward waits at an OpenMP barrier
    for a thread the OS has descheduled and each core keeps busy on its own inputs (measured in
    bench/profile.md); one forward at a time on a GPU, where a forward already fills the card.
    """
    threads = max(1, threads)
    if workers is None:
        workers = 1 if device == "cuda" else threads
    return ForwardLayout(workers=max(1, workers), threads_per_forward=max(1, threads // max(1, workers)))


class Engine:
    """Owns the model and its tokenizer. `run` may be called from several threads at once (a replica's
    runs in flight): the tokenizer is locked, and an inference-mode forward keeps no state."""

    def __init__(self, model: EmbeddingModel, max_batch_tokens: int, group_cost_tokens: int | None = None) -> None:
        self.model = model
        self.tokenizer = Tokenizer(model.tokenizer, model.max_length, model.vocab_size)
        self.default_max_batch_tokens = max_batch_tokens
        # A forward's fixed cost dwarfs per-token cost on a GPU; on a CPU it is a few dozen tokens.
        self.default_group_cost = group_cost_tokens if group_cost_tokens is not None else (
            512 if model.device == "cuda" else 32)

    def run(self, jobs: list[EmbedJob], cfg: BatchingConfig, now: float | None = None,
            on_done: Callable[[int, EmbedResult], None] | None = None,
            forwards: ForwardPool | None = None) -> tuple[list[EmbedResult], BatchReport]:
        """Every job's result, in order, and what the run did. `on_done(index, result)` hears of each job
        as soon as its last input is computed: with length grouping, groups run shortest first, so a short
        query in a run with long documents is answered after its own forward, not after the whole run.
        The forwards run on this thread, or on `forwards` (a replica's forward workers, which other runs
        share) when given; never call it from one of that pool's own workers, which would wait on itself."""
        started = time.time() if now is None else now
        report = BatchReport(requests=len(jobs))
        results = [EmbedResult(vectors=None, queue_s=max(0.0, started - j.enqueued_at) if j.enqueued_at else 0.0)
                   for j in jobs]
        report.queue_s = [r.queue_s for r in results]

        t0 = time.perf_counter()
        sequences, owners = self._tokenize(jobs, results)
        tokenize_s = time.perf_counter() - t0
        report.tokenize_s = tokenize_s

        lengths = [len(s) for s in sequences]
        budget = cfg.max_batch_tokens or self.default_max_batch_tokens
        plan = plan_batches(lengths, max_batch_tokens=budget, group_by_length=cfg.enable_length_grouping,
                            tolerance=cfg.length_group_tolerance, min_group_size=cfg.min_batch_size,
                            group_cost_tokens=self.default_group_cost if cfg.group_cost_tokens is None
                            else cfg.group_cost_tokens)
        vectors: list[np.ndarray | None] = [None] * len(sequences)
        inputs_of: dict[int, list[int]] = {}  # job -> its sequences, in input order
        for i, (j, _pos) in enumerate(owners):
            inputs_of.setdefault(j, []).append(i)
        left = {j: len(seqs) for j, seqs in inputs_of.items()}
        t1 = time.perf_counter()

        def finish(j: int) -> None:
            result = results[j]
            result.tokenize_s, result.forward_s = tokenize_s, time.perf_counter() - t1
            if result.error is None and j in inputs_of:
                result.vectors = np.stack([vectors[i] for i in inputs_of[j]]).astype(np.float32, copy=False)
                result.prompt_tokens = sum(lengths[i] for i in inputs_of[j])
            if on_done is not None:
                on_done(j, result)

        for j in range(len(jobs)):
            if j not in left:  # nothing to compute: refused at tokenization, or went away
                finish(j)
        def compute(planned: list[int]) -> tuple[list[int], np.ndarray | None, Exception | None]:
            """One forward (on a forward worker when there is a pool): the planned inputs whose callers
            are still there, and their vectors or what failed."""
            group = [i for i in planned if not jobs[owners[i][0]].cancelled]
            try:
                return group, (self.model.forward([sequences[i] for i in group]) if group else None), None
            except Exception as exc:  # a failed forward fails only the requests that had inputs in it
                log.exception("forward of %d inputs failed", len(group))
                return group, None, exc

        # With a pool, every group is queued at once, ranked by its place in the plan: free forward workers
        # share a lone run's groups, and the first groups of a run that comes later go ahead of this run's
        # later ones. The outcomes are taken in plan order.
        if forwards is None:
            outcomes: Iterator[tuple[list[int], np.ndarray | None, Exception | None]] = map(compute, plan)
        else:
            pending = [forwards.submit(compute, planned, rank=k) for k, planned in enumerate(plan)]
            outcomes = (f.result() for f in pending)
        done = []
        for planned, (group, out, exc) in zip(plan, outcomes):
            for i in set(planned) - set(group):  # a caller that went away while the run went on
                j = owners[i][0]
                if results[j].error is None:
                    results[j].error = Cancelled("the client went away before its inputs ran")
            if exc is not None:
                for i in group:
                    job = owners[i][0]
                    if results[job].error is None:
                        results[job].error = Unavailable(f"the model failed on this batch: {exc}")
            elif group:
                for row, i in enumerate(group):
                    vectors[i] = out[row]
                done.append(group)
            for i in planned:
                j = owners[i][0]
                left[j] -= 1
                if left[j] == 0:
                    finish(j)
        report.forward_s = time.perf_counter() - t1

        stats = plan_stats(lengths, done)  # what was actually embedded
        report.forwards, report.tokens, report.padded_tokens = stats.groups, stats.tokens, stats.padded_tokens
        report.inputs = stats.inputs
        for r in results:
            if r.error is not None:
                kind = type(r.error).__name__
                report.errors[kind] = report.errors.get(kind, 0) + 1
        return results, report

    def _tokenize(self, jobs: list[EmbedJob], results: list[EmbedResult]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Model-ready ids of every valid input, and (job, position) of each. Invalid jobs get an error."""
        texts = [t for job in jobs if job.texts is not None for t in job.texts]
        content = iter(self.tokenizer.content_ids(texts))
        sequences: list[list[int]] = []
        owners: list[tuple[int, int]] = []
        for j, job in enumerate(jobs):
            raw = [next(content) for _ in job.texts] if job.texts is not None else list(job.token_ids or [])
            if job.cancelled:
                results[j].error = Cancelled("the client went away before its batch ran")
                continue
            try:
                finished = []
                for pos, ids in enumerate(raw):
                    if job.token_ids is not None:
                        self.tokenizer.check_ids(ids, pos)
                    finished.append(self.tokenizer.finish(ids, pos, job.truncate))
            except EmbservError as err:
                results[j].error = err
                continue
            owners.extend((j, pos) for pos in range(len(finished)))
            sequences.extend(finished)
        return sequences, owners


def default_token_budget(device: str, memory_fraction: float = 0.8, hidden_size: int = 384,
                         layers: int = 6, forwards_at_once: int = 1) -> int:
    """A forward's token budget: fixed on CPU (cache-friendly), sized from free memory on a GPU, where
    `forwards_at_once` forwards share it."""
    if device != "cuda":
        return 8192
    import torch

    free, _total = torch.cuda.mem_get_info()
    # Activations per token per layer, with attention and the MLP's 4x expansion, in 2-byte floats,
    # doubled for allocator slack; the weights are already resident and counted in `free`.
    bytes_per_token = hidden_size * 2 * 16 * max(layers, 1) // 4
    usable = (int(free * memory_fraction) - (torch.cuda.memory_reserved() or 0) // 10) // max(1, forwards_at_once)
    return int(max(2048, min(usable // max(bytes_per_token, 1), 1 << 20)))
