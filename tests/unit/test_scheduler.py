"""The replica's scheduler with the real bundled model and tokenizer, no Ray: vectors, errors that stay with
their request, cancelled callers, the order groups run in, and what it reports."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from embserve.api.contracts import EmbedJob
from embserve.api.errors import Cancelled, InputTooLong, InvalidRequest, NonFiniteOutput, OutOfMemory, Unavailable
from embserve.engine.batching import next_group, plan_batches
from embserve.engine.forward_cost import ForwardCost
from embserve.engine.scheduler import (PASSED_OVER_TAKES, Arrival, ForwardLayout, Scheduler, embed_jobs,
                                      forward_layout)
from embserve.metrics.events import Admitted, Answered, Forward
from embserve.settings import BatchingConfig
from tests.texts import mixed_texts

COS_MIN = 0.9999
ABS_TOL = 1e-5


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []

    def __call__(self, event: object) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def make(model, workers: int = 1, cfg: BatchingConfig | None = None, budget: int = 8192) -> tuple[Scheduler, Recorder]:
    config = cfg or BatchingConfig()
    recorder = Recorder()
    return Scheduler(model, ForwardLayout(workers, 1), config=lambda: config, max_batch_tokens=budget,
                     report=recorder), recorder


@pytest.fixture(scope="module")
def scheduler(float32_model):
    """float32 explicitly: these tests hold the scheduler to sentence-transformers within 1e-5."""
    s, _ = make(float32_model, workers=2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return mixed_texts(16, seed=11)


@pytest.fixture(scope="module")
def reference(reference):
    cache: dict[str, np.ndarray] = {}

    def encode(batch: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(batch) if t not in cache]
        if missing:
            cache.update(zip(missing, reference(missing)))
        return np.stack([cache[t] for t in batch])

    return encode


@pytest.fixture(scope="module")
def too_long(float32_model) -> str:
    return " ".join(["hello"] * (float32_model.max_length + 10))


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > COS_MIN
    assert np.abs(got - want).max() <= ABS_TOL


def test_vectors_match_sentence_transformers(scheduler, reference, texts):
    jobs = [EmbedJob(texts=texts[i : i + 4], truncate=True) for i in range(0, len(texts), 4)]
    for job, result in zip(jobs, embed_jobs(scheduler, jobs)):
        assert result.error is None
        assert_close(result.vectors, reference(job.texts))
        assert result.prompt_tokens > len(job.texts)


def test_token_ids_embed_like_their_text(scheduler, reference):
    ids = scheduler.tokenizer.content_ids(["hello world"])[0]
    by_ids, by_text = embed_jobs(scheduler, [EmbedJob(token_ids=[list(ids)]), EmbedJob(texts=["hello world"])])
    np.testing.assert_allclose(by_ids.vectors, by_text.vectors, atol=ABS_TOL)


def test_an_invalid_request_fails_alone_and_is_never_queued(float32_model, reference, texts, too_long):
    s, seen = make(float32_model)
    try:
        jobs = [EmbedJob(texts=texts[:3]), EmbedJob(texts=["short", too_long]), EmbedJob(token_ids=[[7592], [-1]]),
                EmbedJob(texts=texts[3:5])]
        results = embed_jobs(s, jobs)
    finally:
        s.close()
    assert isinstance(results[1].error, InputTooLong) and "input[1]" in results[1].error.message
    assert isinstance(results[2].error, InvalidRequest) and results[2].error.code == "invalid_token_id"
    assert_close(results[0].vectors, reference(texts[:3]))
    assert_close(results[3].vectors, reference(texts[3:5]))
    assert sum(f.inputs for f in seen.of(Forward)) == 5, "the refused requests' inputs are never embedded"
    assert seen.of(Admitted) == [Admitted(requests=4, inputs=9, tokenize_s=seen.of(Admitted)[0].tokenize_s)]
    assert sorted(a.error or "" for a in seen.of(Answered)) == ["", "", "InputTooLong", "InvalidRequest"]
    assert s.admitted == 4, "a refused request was admitted too: the live count is what the metrics count"


def test_truncation_cuts_to_the_model_maximum(scheduler, too_long):
    [result] = embed_jobs(scheduler, [EmbedJob(texts=[too_long], truncate=True)])
    assert result.error is None and result.prompt_tokens == scheduler.tokenizer.max_length


def test_a_failed_forward_fails_only_the_requests_with_inputs_in_it(float32_model, reference):
    # A budget past the model's 512 positions and a max_length the model cannot take: a real failure.
    s, seen = make(float32_model)
    s.tokenizer.max_length, s.tokenizer._room = 600, 598
    try:
        huge = " ".join(["word"] * 580)
        results = embed_jobs(s, [EmbedJob(texts=["hello"]), EmbedJob(texts=["world", huge]), EmbedJob(texts=["good"])])
    finally:
        s.close()
    assert isinstance(results[1].error, Unavailable)
    assert_close(results[0].vectors, reference(["hello"]))
    assert_close(results[2].vectors, reference(["good"]))


def test_a_cancelled_request_is_dropped_before_its_inputs_run(float32_model, texts):
    s, seen = make(float32_model)
    gate = threading.Event()
    forward = s.model.forward
    s.model.forward = lambda seqs: (gate.wait(10), forward(seqs))[1]  # hold the worker in its first forward
    try:
        answers: dict[str, object] = {}
        first = EmbedJob(texts=texts[:1])
        gone = Arrival(EmbedJob(texts=texts[1:9]))
        s.admit([first], [lambda r: answers.setdefault("first", r)])
        while s.pending:  # the worker holds the first request at the gate
            threading.Event().wait(0.01)
        s.admit([gone], [lambda r: answers.setdefault("gone", r)])
        gone.cancelled = True
        gate.set()
        done = threading.Event()
        s.admit([EmbedJob(texts=["after"])], [lambda r: done.set()])
        assert done.wait(10)
    finally:
        s.model.forward = forward
        s.close()
    assert isinstance(answers["gone"].error, Cancelled)
    assert sum(f.inputs for f in seen.of(Forward)) == 2, "only the first and the last request ran"


def test_the_group_holding_the_oldest_input_runs_first():
    lengths = [40, 5, 6, 41, 5]
    group = next_group(lengths, max_batch_tokens=8192)
    assert 0 in group and set(group) == {0, 3}  # the oldest input, with the input it pads least beside
    assert group in plan_batches(lengths, max_batch_tokens=8192)
    assert next_group([], max_batch_tokens=8192) == []


def test_requests_run_in_arrival_order_and_are_answered_when_their_own_inputs_are_done(float32_model, texts):
    long_docs = [" ".join(mixed_texts(30, seed=s)) for s in range(8)]
    s, seen = make(float32_model, budget=1024)
    order: list[str] = []
    try:
        done = threading.Event()
        s.admit([EmbedJob(texts=long_docs, truncate=True)], [lambda r: order.append("docs")])
        s.admit([EmbedJob(texts=["a short query"])], [lambda r: (order.append("query"), done.set())])
        assert done.wait(30)
    finally:
        s.close()
    assert order == ["docs", "query"]  # nothing overtakes an older input
    assert len(seen.of(Forward)) >= 3  # the documents ran as several groups within the budget
    assert all(f.padded_tokens <= 1024 for f in seen.of(Forward))


def test_no_forward_holds_more_than_max_batch_size_inputs_whatever_the_token_budget(float32_model):
    s, seen = make(float32_model, cfg=BatchingConfig(max_batch_size=4), budget=8192)
    try:
        [one] = embed_jobs(s, [EmbedJob(texts=["the same short text"] * 10)])
    finally:
        s.close()
    assert one.error is None and one.vectors.shape[0] == 10
    assert sorted(f.inputs for f in seen.of(Forward)) == [2, 4, 4]


def test_next_group_caps_its_inputs_at_max_inputs():
    assert len(next_group([7] * 20, max_batch_tokens=8192)) == 20  # the token budget alone allows all
    group = next_group([7] * 20, max_batch_tokens=8192, max_inputs=6)
    assert 0 in group and 1 <= len(group) <= 6


def test_without_the_tolerance_wall_a_large_group_cost_puts_far_lengths_in_one_forward(float32_model):
    texts = ["short", " ".join(["a much longer text"] * 12)]  # lengths far outside a 20% tolerance
    cfg = BatchingConfig(group_cost_tokens=4096)
    for wall, forwards in ((True, 2), (False, 1)):
        config = cfg
        seen = []
        s = Scheduler(float32_model, ForwardLayout(1, 1), config=lambda: config, max_batch_tokens=8192,
                      report=seen.append, tolerance_wall=wall)
        try:
            [one] = embed_jobs(s, [EmbedJob(texts=texts)])
        finally:
            s.close()
        assert one.error is None
        assert len([e for e in seen if isinstance(e, Forward)]) == forwards


def test_without_dynamic_batching_no_forward_mixes_requests(float32_model):
    s, seen = make(float32_model, cfg=BatchingConfig(enable_dynamic_batching=False))
    try:
        embed_jobs(s, [EmbedJob(texts=["one"]), EmbedJob(texts=["two"]), EmbedJob(texts=["three", "four"])])
    finally:
        s.close()
    assert sorted(f.inputs for f in seen.of(Forward)) == [1, 1, 2]


def test_forward_workers_run_groups_at_once_and_give_the_same_vectors(float32_model, texts):
    jobs = [[EmbedJob(texts=texts[k : k + 4], truncate=True)] for k in range(0, 16, 4)] * 3
    single, _ = make(float32_model, workers=1)
    double, _ = make(float32_model, workers=2)
    try:
        serial = [embed_jobs(single, j)[0].vectors for j in jobs]
        with cf.ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(lambda j: embed_jobs(double, j)[0].vectors, jobs))
    finally:
        single.close()
        double.close()
    for a, b in zip(serial, concurrent):
        np.testing.assert_allclose(a, b, atol=ABS_TOL)
    assert double.threads_seen == {1}


def test_close_answers_what_is_still_pending(float32_model):
    s, _ = make(float32_model)
    gate = threading.Event()
    forward = s.model.forward
    s.model.forward = lambda seqs: (gate.wait(10), forward(seqs))[1]
    answers = []
    try:
        s.admit([EmbedJob(texts=["running"])], [answers.append])
        while s.pending:  # the worker has taken it and waits at the gate
            threading.Event().wait(0.01)
        # The running forward goes on once close() has answered the waiting request: no timer whose 0.2 s a
        # stalled test thread could outlast.
        s.admit([EmbedJob(texts=["waiting"])], [lambda answer: (answers.append(answer), gate.set())])
        s.close()
    finally:
        s.model.forward = forward
    assert [a.error is None for a in answers] == [False, True]  # answered as unavailable, then the one running
    assert isinstance(answers[0].error, Unavailable)


def test_an_empty_job_is_answered_at_once(scheduler):
    [result] = embed_jobs(scheduler, [EmbedJob(texts=[])])
    assert result.error is None and result.vectors.shape[0] == 0


@pytest.mark.parametrize("device, threads, workers, want", [
    ("cpu", 2, None, ForwardLayout(2, 1)),   # on a CPU, by default one single-thread forward per core
    ("cpu", 1, None, ForwardLayout(1, 1)),
    ("cpu", 4, 2, ForwardLayout(2, 2)),      # the threads are split among the workers asked for
    ("cpu", 2, 1, ForwardLayout(1, 2)),      # one forward on every thread
    ("cpu", 1, 3, ForwardLayout(3, 1)),      # never fewer than one thread per forward
    ("cuda", 8, None, ForwardLayout(1, 8)),  # a GPU runs one forward at a time unless asked otherwise
    ("cuda", 8, 2, ForwardLayout(2, 4)),
])
def test_forward_layout_splits_the_replicas_threads_among_its_forwards(device, threads, workers, want):
    layout = forward_layout(device, threads, workers)
    assert layout == want and layout.threads == want.workers * want.threads_per_forward


def test_job_length_counts_its_inputs():
    assert len(EmbedJob(texts=["a", "b"])) == 2
    assert len(EmbedJob(token_ids=[[1], [2], [3]])) == 3
    assert len(EmbedJob()) == 0


class OutOfMemoryAbove:
    """The real model's forward, raising CUDA's out-of-memory error (as a card would) for a group of more than
    `inputs` inputs or with an input longer than `tokens`. Records the group sizes that ran, and checks at
    each call that the previous out-of-memory error is gone (its traceback holds a forward's activations)."""

    def __init__(self, forward, inputs: int = 10**9, tokens: int = 10**9) -> None:
        self.forward, self.inputs, self.tokens = forward, inputs, tokens
        self.ran: list[int] = []
        self.raised: list[weakref.ref] = []
        self.kept_alive = 0

    def _error(self) -> torch.cuda.OutOfMemoryError:
        err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
        self.raised.append(weakref.ref(err))
        return err

    def __call__(self, seqs: list[list[int]]) -> np.ndarray:
        self.kept_alive += sum(ref() is not None for ref in self.raised)
        if len(seqs) > self.inputs or max(map(len, seqs)) > self.tokens:
            raise self._error()
        self.ran.append(len(seqs))
        return self.forward(seqs)


# One group of all of them: no length grouping splits them before the out-of-memory does.
ONE_GROUP = BatchingConfig(enable_length_grouping=False)


def test_out_of_memory_splits_the_group_and_every_vector_is_the_normal_ones(float32_model, reference, texts, caplog):
    s, seen = make(float32_model, cfg=ONE_GROUP, budget=8192)
    oom = OutOfMemoryAbove(float32_model.forward, inputs=3)
    s.model.forward = oom
    try:
        with caplog.at_level(logging.WARNING, logger="embserve.engine.scheduler"):
            jobs = [EmbedJob(texts=texts[:10], truncate=True), EmbedJob(texts=texts[10:13], truncate=True)]
            results = embed_jobs(s, jobs)
    finally:
        del s.model.forward
        s.close()
    for job, result in zip(jobs, results):
        assert result.error is None
        assert_close(result.vectors, reference(job.texts))
    assert len(seen.of(Forward)) == 1 and oom.raised, "one group of 13, out of memory at first"
    assert max(oom.ran) <= 3 and sum(oom.ran) == 13
    assert oom.kept_alive == 0, "an out-of-memory error was still alive when its halves were retried"
    assert s.memory_cap is not None and s.memory_cap < 8192  # lowered for the replica's life
    lowered = [r.getMessage() for r in caplog.records if "max_batch_tokens lowered from" in r.getMessage()]
    assert lowered and "lowered from 8192 to" in lowered[0]
    assert lowered[-1].endswith(f"to {s.memory_cap} for this replica's life")
    assert len(lowered) == len(set(lowered)), "each lowering is logged once"


def test_later_groups_are_planned_within_the_lowered_budget(float32_model, texts):
    s, seen = make(float32_model, cfg=ONE_GROUP, budget=8192)
    s.model.forward = OutOfMemoryAbove(float32_model.forward, inputs=2)
    try:
        embed_jobs(s, [EmbedJob(texts=texts[:8], truncate=True)])
        cap = s.memory_cap
        before = len(seen.of(Forward))
        embed_jobs(s, [EmbedJob(texts=texts[8:16], truncate=True)])
    finally:
        del s.model.forward
        s.close()
    assert cap is not None and s.memory_cap <= cap
    assert all(f.padded_tokens <= cap or f.inputs == 1 for f in seen.of(Forward)[before:])


def test_an_input_out_of_memory_alone_is_a_clean_503_and_its_group_is_still_answered(float32_model, reference):
    s, seen = make(float32_model, cfg=ONE_GROUP)
    long_text = " ".join(["parse the date string"] * 20)
    s.model.forward = OutOfMemoryAbove(float32_model.forward, tokens=40)
    try:
        results = embed_jobs(s, [EmbedJob(texts=["hello"]), EmbedJob(texts=["world", long_text]),
                                 EmbedJob(texts=["good"])])
    finally:
        del s.model.forward
        s.close()
    err = results[1].error
    assert isinstance(err, OutOfMemory) and (err.status, err.type, err.code) == (503, "server_error", "out_of_memory")
    assert err.message.startswith("out of GPU memory for one input of ") and "CUDA" not in err.message
    assert_close(results[0].vectors, reference(["hello"]))
    assert_close(results[2].vectors, reference(["good"]))
    assert [a.error for a in seen.of(Answered)].count("OutOfMemory") == 1
    assert len(seen.of(Forward)) == 1, "the long input shared its group with the others"


def test_a_non_finite_vector_fails_its_request_and_the_others_in_its_group_are_answered(nan_model, reference):
    from tests.unit.conftest import POISON

    s, seen = make(nan_model, cfg=ONE_GROUP)
    try:
        results = embed_jobs(s, [EmbedJob(texts=["hello there"]), EmbedJob(texts=["fine", f"a {POISON} split"]),
                                 EmbedJob(texts=["good night"])])
    finally:
        s.close()
    assert len(seen.of(Forward)) == 1, "the three requests shared one forward"
    err = results[1].error
    assert isinstance(err, NonFiniteOutput) and (err.status, err.type) == (500, "server_error")
    assert "input[1]" in err.message and "non-finite" in err.message and "float32" in err.message
    assert results[1].vectors is None
    assert_close(results[0].vectors, reference(["hello there"]))
    assert_close(results[2].vectors, reference(["good night"]))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux names threads in /proc")
def test_forward_workers_carry_their_name_where_the_os_shows_threads(scheduler):
    """`top -H`, py-spy and bench.procs tell a replica's forward workers from Ray's threads by it."""
    names = {(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()}
    assert {"forward-0", "forward-1"} <= names


# The pipelined worker (one forward worker on a GPU): a simulated device whose forwards run on a thread of
# their own, as on a CUDA stream, and the real model on the CPU, where the same code runs without streams.

@pytest.fixture(scope="module")
def simulated():
    from bench.simulated_gpu import SimulatedGpu

    device = SimulatedGpu(fixed_s=0.001, per_token_s=0.0)
    yield device
    device.close()


def pipelined(model, cfg: BatchingConfig | None = None,
              cost: ForwardCost | None = None) -> tuple[Scheduler, Recorder]:
    config = cfg or BatchingConfig()
    recorder = Recorder()
    return Scheduler(model, ForwardLayout(1, 1), config=lambda: config, max_batch_tokens=8192, report=recorder,
                     pipelined=True, forward_cost=cost), recorder


def launched_at_least(device, n: int) -> list[int]:
    """The sizes of the groups launched on `device`, once it has `n` (or after ten seconds)."""
    for _ in range(1000):
        if len(device.launches) >= n:
            break
        threading.Event().wait(0.01)
    return [inputs for _, inputs in device.launches]


# A cost line by which a launched forward ends an hour later: the worker never takes a group for want of
# time left, only when the pending inputs fill one.
AN_HOUR = ForwardCost(fixed_s=3600.0, per_token_s=0.0)


@contextlib.contextmanager
def gated_card(cfg: BatchingConfig, cost: ForwardCost):
    """A pipelined scheduler on a simulated card whose every forward waits for `gate`; the gate is opened
    and both are closed on the way out."""
    from bench.simulated_gpu import SimulatedGpu

    gate = threading.Event()
    device = SimulatedGpu(fixed_s=0.0, per_token_s=0.0, gate=gate)
    s, seen = pipelined(device, cfg, cost)
    try:
        yield s, seen, device, gate
    finally:
        gate.set()
        s.close()
        device.close()


def test_the_next_group_is_launched_while_the_first_still_computes():
    from bench.simulated_gpu import SimulatedGpu

    gate = threading.Event()
    device = SimulatedGpu(fixed_s=0.0, per_token_s=0.0, gate=gate)  # every forward waits for the gate
    s, seen = pipelined(device, BatchingConfig(max_batch_size=2))
    futures = [cf.Future() for _ in range(3)]
    try:
        s.admit([EmbedJob(texts=["one two", "three four", "five six"])], [futures[0].set_result])
        # Two groups launched (the second planned, padded and queued) while the first cannot end.
        deadline = threading.Event()
        for _ in range(200):
            if len(device.launches) >= 2:
                break
            deadline.wait(0.01)
        assert len(device.launches) == 2 and not device.runs and not futures[0].done()
        gate.set()
        result = futures[0].result(10)
    finally:
        gate.set()
        s.close()
        device.close()
    assert result.error is None and result.vectors.shape == (3, 4)
    assert sorted(n for _, n in device.launches) == [1, 2] and len(seen.of(Forward)) == 2


@pytest.mark.parametrize("cost", [None, ForwardCost(fixed_s=0.001, per_token_s=0.0)], ids=["at-once", "just-in-time"])
def test_pipelined_groups_end_in_order_and_each_request_gets_its_own_vectors(simulated, cost):
    s, seen = pipelined(simulated, BatchingConfig(max_batch_size=3), cost)
    texts = [f"text number {k} " + "word " * (k % 7) for k in range(20)]
    order: list[int] = []
    try:
        futures = [cf.Future() for _ in texts]
        s.admit([EmbedJob(texts=[t]) for t in texts],
                [lambda r, k=k, f=f: (order.append(k), f.set_result(r)) for k, f in enumerate(futures)])
        results = [f.result(10) for f in futures]
    finally:
        s.close()
    ids = s.tokenizer.content_ids(texts)
    for k, result in enumerate(results):
        finished = s.tokenizer.finish(ids[k], 0, False, s.tokenizer.prompt(None))
        assert result.error is None
        assert result.vectors[0].tolist() == [len(finished), finished[0], finished[-1], 1.0]
    assert all(f.inputs <= 3 for f in seen.of(Forward)) and sum(f.inputs for f in seen.of(Forward)) == 20
    if cost is None:  # the first-admitted input's group runs first: arrival order holds across launched groups
        assert order[0] == 0


def test_closing_a_pipelined_scheduler_lets_launched_groups_end_and_answers_the_rest():
    from bench.simulated_gpu import SimulatedGpu

    gate = threading.Event()
    device = SimulatedGpu(fixed_s=0.0, per_token_s=0.0, gate=gate)
    s, _ = pipelined(device, BatchingConfig(max_batch_size=1))
    futures = [cf.Future() for _ in range(5)]
    s.admit([EmbedJob(texts=[f"t{k}"]) for k in range(5)], [f.set_result for f in futures])
    for _ in range(200):
        if len(device.launches) >= 2:
            break
        threading.Event().wait(0.01)
    closer = threading.Thread(target=s.close)
    closer.start()
    gate.set()
    closer.join(10)
    device.close()
    results = [f.result(1) for f in futures]
    assert sum(r.error is None for r in results) == len(device.launches)  # launched groups finished
    assert all(isinstance(r.error, Unavailable) for r in results if r.error is not None)


def test_the_pipelined_worker_on_a_cpu_gives_the_models_own_vectors(float32_model, reference, texts):
    s, seen = pipelined(float32_model, BatchingConfig(max_batch_size=4))
    try:
        results = embed_jobs(s, [EmbedJob(texts=texts[:6]), EmbedJob(texts=texts[6:9])])
    finally:
        s.close()
    assert_close(np.concatenate([r.vectors for r in results]), reference(texts[:9]))
    assert all(f.inputs <= 4 for f in seen.of(Forward))


def test_a_pipelined_group_out_of_memory_at_launch_is_split_and_every_input_answered():
    from bench.simulated_gpu import SimulatedGpu

    class SmallCard(SimulatedGpu):
        def launch(self, sequences):
            if len(sequences) > 1:  # as a card too small for more than one input at a time
                raise torch.cuda.OutOfMemoryError("simulated: out of memory")
            return super().launch(sequences)

    device = SmallCard(fixed_s=0.0, per_token_s=0.0)
    s, seen = pipelined(device)
    try:
        [result] = embed_jobs(s, [EmbedJob(texts=["alpha beta", "gamma", "delta epsilon zeta"])])
    finally:
        s.close()
        device.close()
    assert result.error is None and result.vectors.shape == (3, 4)
    assert [int(v[0]) for v in result.vectors] == [4, 3, 5]  # each input's own vector: length with [CLS]/[SEP]
    assert s.memory_cap is not None  # the budget was lowered, as after any out-of-memory forward


def test_with_a_cost_line_the_next_group_holds_what_arrived_while_the_first_computed():
    futures = [cf.Future() for _ in range(4)]
    with gated_card(BatchingConfig(max_batch_size=3), AN_HOUR) as (s, seen, device, gate):
        s.admit([EmbedJob(texts=["first"])], [futures[0].set_result])
        assert launched_at_least(device, 1) == [1]  # nothing in flight: launched at once
        for k in range(1, 4):  # one by one while the first computes, as closed-loop clients come back
            s.admit([EmbedJob(texts=[f"late {k}"])], [futures[k].set_result])
            threading.Event().wait(0.05)  # time enough for a worker that takes at once to take this one alone
        # Not one group per arrival: the second group waited until the pending inputs filled it.
        assert launched_at_least(device, 2) == [1, 3]
        gate.set()
        assert futures[0].result(10).error is None
    assert all(f.result(1).error is None for f in futures)
    assert [f.inputs for f in seen.of(Forward)] == [1, 3]


def test_with_a_cost_line_a_lone_input_on_an_idle_device_is_launched_at_once():
    future = cf.Future()
    with gated_card(BatchingConfig(max_batch_size=256), AN_HOUR) as (s, _, device, _gate):
        s.admit([EmbedJob(texts=["alone"])], [future.set_result])
        # Far from filling a group, and no wait for one: nothing was in flight.
        assert launched_at_least(device, 1) == [1] and s.pending == 0
    assert future.result(1).error is None


def test_with_a_cost_line_a_group_is_taken_at_once_when_the_work_in_flight_is_due_to_end():
    # Forwards that cost nothing by the line: the launched one is due to end now, so the next one cannot wait.
    future = cf.Future()
    with gated_card(BatchingConfig(max_batch_size=256), ForwardCost(fixed_s=0.0, per_token_s=0.0)) as (
            s, _, device, gate):
        # Lengths too far apart for one group (the tolerance wall): two groups of one input each.
        s.admit([EmbedJob(texts=["short", "long " * 40])], [future.set_result])
        assert launched_at_least(device, 2) == [1, 1]  # the second far from a full group, and taken anyway
        gate.set()
        result = future.result(10)
    assert result.error is None and result.vectors.shape == (2, 4)


def test_with_a_cost_line_a_group_short_of_full_waits_while_the_work_in_flight_is_far_from_its_end():
    future = cf.Future()
    with gated_card(BatchingConfig(max_batch_size=256), AN_HOUR) as (s, _, device, _gate):
        s.admit([EmbedJob(texts=["short", "long " * 40])], [future.set_result])
        assert launched_at_least(device, 1) == [1]
        threading.Event().wait(0.05)  # time enough for a worker that takes at once to launch the second
        assert len(device.launches) == 1 and s.pending == 1
    # Closing ends the wait: the launched group is answered with its vectors, the waiting input as unavailable.
    assert isinstance(future.result(1).error, Unavailable)


def test_with_a_cost_line_an_input_passed_over_for_cheaper_groups_runs_once_enough_takes_have_passed(simulated):
    # One long input first, then short ones of one length, all admitted at once, groups of three: by cost per
    # input the short ones go first (a third of a forward's fixed cost each, no padding), the long one last;
    # once PASSED_OVER_TAKES takes have passed since it arrived, the oldest input's group goes first again.
    shorts = 3 * (PASSED_OVER_TAKES + 2)
    s, seen = pipelined(simulated, BatchingConfig(max_batch_size=3), ForwardCost(fixed_s=0.0, per_token_s=0.0))
    try:
        results = embed_jobs(s, [EmbedJob(texts=["long " * 40])] + [EmbedJob(texts=["short"])] * shorts)
    finally:
        s.close()
    assert all(r.error is None for r in results)
    forwards = seen.of(Forward)  # reported in the order the groups were taken
    assert [f.inputs for f in forwards] == [3] * PASSED_OVER_TAKES + [1] + [3] * 2
    assert forwards[PASSED_OVER_TAKES].tokens == results[0].vectors[0][0] == 42  # the long input, 40 words + 2


def test_without_a_cost_line_the_oldest_input_runs_first_even_where_others_pad_less(simulated):
    s, seen = pipelined(simulated, BatchingConfig(max_batch_size=3))
    try:
        embed_jobs(s, [EmbedJob(texts=["long " * 40])] + [EmbedJob(texts=["short"])] * 6)
    finally:
        s.close()
    assert [f.inputs for f in seen.of(Forward)] == [1, 3, 3] and seen.of(Forward)[0].tokens == 42
