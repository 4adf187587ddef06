"""One batch run over the real bundled model: vectors as sentence-transformers gives them, errors kept
with the request that caused them, and a report that says what the plan did."""

from __future__ import annotations

import concurrent.futures as cf
import time

import numpy as np
import pytest

from embserve.batching import plan_batches, plan_stats
from embserve.engine import EmbedJob, Engine, ForwardLayout, default_token_budget, forward_layout
from embserve.errors import Cancelled, InputTooLong, InvalidRequest, Unavailable
from embserve.forwards import ForwardPool
from embserve.settings import BatchingConfig
from embserve.tokenize import Tokenizer
from tests.texts import mixed_texts

COS_MIN = 0.9999
ABS_TOL = 1e-5


@pytest.fixture(scope="module")
def engine(float32_model) -> Engine:
    """float32 explicitly: these tests hold the engine to sentence-transformers within 1e-5."""
    return Engine(float32_model, max_batch_tokens=8192)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return mixed_texts(16, seed=11)


@pytest.fixture(scope="module")
def reference(reference):
    """sentence-transformers' vectors, each text encoded once per module."""
    cache: dict[str, np.ndarray] = {}

    def encode(batch: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(batch) if t not in cache]
        if missing:
            cache.update(zip(missing, reference(missing)))
        return np.stack([cache[t] for t in batch])

    return encode


@pytest.fixture(scope="module")
def too_long(bundled_model) -> str:
    return " ".join(["hello"] * (bundled_model.max_length + 10))


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > COS_MIN
    assert np.abs(got - want).max() <= ABS_TOL


def test_vectors_match_sentence_transformers(engine, reference, texts):
    jobs = [EmbedJob(texts=texts[i : i + 4], truncate=True) for i in range(0, len(texts), 4)]
    results, report = engine.run(jobs, BatchingConfig())
    want = reference(texts)
    got = np.concatenate([r.vectors for r in results])
    assert all(r.error is None for r in results)
    assert got.dtype == np.float32
    assert_close(got, want)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert report.errors == {}


def test_truncated_long_input_matches_sentence_transformers_truncation(engine, reference, too_long):
    [result], _ = engine.run([EmbedJob(texts=[too_long + " tail words"], truncate=True)], BatchingConfig())
    assert result.error is None
    assert result.prompt_tokens == engine.tokenizer.max_length
    assert_close(result.vectors, reference([too_long + " tail words"]))


def test_token_id_input_embeds_like_the_same_text(engine, bundled_model, reference):
    text = "The quick brown fox jumps over the lazy dog."
    ids = bundled_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    results, _ = engine.run([EmbedJob(token_ids=[ids]), EmbedJob(texts=[text])], BatchingConfig())
    np.testing.assert_allclose(results[0].vectors, results[1].vectors, atol=ABS_TOL)
    assert_close(results[0].vectors, reference([text]))
    assert results[0].prompt_tokens == results[1].prompt_tokens == len(ids) + 2


def test_too_long_input_without_truncate_fails_only_its_own_request(engine, reference, texts, too_long):
    jobs = [
        EmbedJob(texts=texts[:3]),
        EmbedJob(texts=["short", too_long]),
        EmbedJob(texts=texts[3:5]),
    ]
    results, report = engine.run(jobs, BatchingConfig())
    assert isinstance(results[1].error, InputTooLong)
    assert "input[1]" in results[1].error.message
    assert results[1].vectors is None and results[1].prompt_tokens == 0
    for result, wanted in ((results[0], texts[:3]), (results[2], texts[3:5])):
        assert result.error is None
        assert_close(result.vectors, reference(wanted))
    assert report.errors == {"InputTooLong": 1}
    assert report.requests == 3
    assert report.inputs == 5, "the failed request's inputs are not embedded"


def test_bad_token_id_fails_only_its_own_request(engine, reference, texts):
    jobs = [EmbedJob(texts=texts[:2]), EmbedJob(token_ids=[[7592], [2088, 30522]]), EmbedJob(token_ids=[[-1]]),
            EmbedJob(texts=texts[2:3])]
    results, report = engine.run(jobs, BatchingConfig())
    assert isinstance(results[1].error, InvalidRequest) and results[1].error.code == "invalid_token_id"
    assert "input[1]" in results[1].error.message
    assert isinstance(results[2].error, InvalidRequest) and "input[0]" in results[2].error.message
    assert_close(results[0].vectors, reference(texts[:2]))
    assert_close(results[3].vectors, reference(texts[2:3]))
    assert report.errors == {"InvalidRequest": 2}


def test_cancelled_request_is_skipped_without_touching_the_others(engine, reference, texts):
    jobs = [EmbedJob(texts=texts[:2]), EmbedJob(texts=texts[2:6], cancelled=True), EmbedJob(token_ids=[[7592]]),
            EmbedJob(texts=texts[6:8])]
    results, report = engine.run(jobs, BatchingConfig())
    assert isinstance(results[1].error, Cancelled) and results[1].vectors is None
    assert_close(results[0].vectors, reference(texts[:2]))
    assert results[2].error is None and results[2].prompt_tokens == 3
    # The texts after a cancelled request still line up with their own tokens.
    assert_close(results[3].vectors, reference(texts[6:8]))
    assert report.inputs == 5, "the cancelled request's inputs are not embedded"
    assert report.errors == {"Cancelled": 1}


def test_failed_forward_fails_only_the_requests_with_inputs_in_that_group(float32_model, reference):
    # A limit past the model's 512 positions lets a 582-token input reach the model, whose forward
    # then raises: a real failure of one group, with the model and tokenizer unchanged.
    wide = Engine(float32_model, max_batch_tokens=8192)
    wide.tokenizer = Tokenizer(float32_model.tokenizer, 600, float32_model.vocab_size)
    huge = " ".join(["hello"] * 580)
    jobs = [EmbedJob(texts=["hello"]), EmbedJob(texts=["world", huge]), EmbedJob(texts=["good", "day"])]
    results, report = wide.run(jobs, BatchingConfig())
    assert isinstance(results[1].error, Unavailable) and results[1].vectors is None
    assert results[1].error.status == 503
    assert_close(results[0].vectors, reference(["hello"]))
    assert_close(results[2].vectors, reference(["good", "day"]))
    assert report.errors == {"Unavailable": 1}
    # Only what was embedded counts: one forward of the four short inputs, not the failed one.
    assert (report.forwards, report.inputs) == (1, 4)


def test_a_batch_of_only_failing_requests_runs_no_forward(engine, too_long):
    results, report = engine.run([EmbedJob(texts=[too_long]), EmbedJob(token_ids=[[99999]])], BatchingConfig())
    assert [type(r.error) for r in results] == [InputTooLong, InvalidRequest]
    assert (report.inputs, report.tokens, report.padded_tokens, report.forwards) == (0, 0, 0, 0)


def test_results_come_back_in_request_and_input_order(engine, reference):
    # Lengths that the planner reorders: long, short, long, short across and within requests.
    long_a = " ".join(mixed_texts(200, seed=2)[:6])[:600]
    long_b = " ".join(mixed_texts(200, seed=4)[:6])[:500]
    jobs = [EmbedJob(texts=[long_a, "hi"], truncate=True), EmbedJob(texts=["ok"]),
            EmbedJob(texts=[long_b, "yes", "no"], truncate=True)]
    results, report = engine.run(jobs, BatchingConfig(length_group_tolerance=0.1))
    assert report.forwards >= 2, "the planner did group by length"
    for job, result in zip(jobs, results):
        assert result.vectors.shape == (len(job.texts), 384)
        assert_close(result.vectors, reference(job.texts))


def test_request_vectors_are_the_same_alone_and_inside_a_mixed_batch(engine, texts):
    mine = EmbedJob(texts=[texts[0], texts[5], "a short query"], truncate=True)
    [alone], _ = engine.run([mine], BatchingConfig())
    others = [EmbedJob(texts=texts[6:12], truncate=True), EmbedJob(texts=texts[12:16], truncate=True)]
    for cfg in (BatchingConfig(), BatchingConfig(enable_length_grouping=False), BatchingConfig(min_batch_size=8)):
        results, _ = engine.run([others[0], mine, others[1]], cfg)
        assert np.abs(results[1].vectors - alone.vectors).max() <= ABS_TOL
        assert results[1].prompt_tokens == alone.prompt_tokens


def _lengths(engine: Engine, texts: list[str]) -> list[int]:
    return [len(engine.tokenizer.finish(c, 0, True)) for c in engine.tokenizer.content_ids(texts)]


@pytest.mark.parametrize(
    "cfg",
    [
        BatchingConfig(),
        BatchingConfig(enable_length_grouping=False, max_batch_tokens=2048),
        BatchingConfig(min_batch_size=4, length_group_tolerance=0.05),
        BatchingConfig(max_batch_tokens=512, group_cost_tokens=0),
    ],
    ids=["default", "arrival-order", "min-group", "small-budget"],
)
def test_report_counts_agree_with_the_plan(engine, texts, cfg):
    jobs = [EmbedJob(texts=texts[:10], truncate=True), EmbedJob(texts=texts[10:], truncate=True)]
    results, report = engine.run(jobs, cfg)
    lengths = _lengths(engine, texts)
    plan = plan_batches(lengths, max_batch_tokens=cfg.max_batch_tokens or 8192,
                        group_by_length=cfg.enable_length_grouping, tolerance=cfg.length_group_tolerance,
                        min_group_size=cfg.min_batch_size,
                        group_cost_tokens=32 if cfg.group_cost_tokens is None else cfg.group_cost_tokens)
    stats = plan_stats(lengths, plan)
    assert report.requests == 2
    assert (report.inputs, report.tokens, report.padded_tokens, report.forwards) == (
        stats.inputs, stats.tokens, stats.padded_tokens, stats.groups)
    assert report.tokens == sum(r.prompt_tokens for r in results)
    assert report.tokenize_s >= 0 and report.forward_s > 0


def test_length_grouping_pads_less_on_a_mixed_length_batch(engine):
    mixed = mixed_texts(24, seed=7)
    jobs = [EmbedJob(texts=mixed[i : i + 4], truncate=True) for i in range(0, 24, 4)]
    _, plain = engine.run(jobs, BatchingConfig(enable_length_grouping=False))
    _, grouped = engine.run(jobs, BatchingConfig(enable_length_grouping=True))
    assert plain.tokens == grouped.tokens
    assert grouped.tokens / grouped.padded_tokens > plain.tokens / plain.padded_tokens
    assert grouped.padded_tokens < plain.padded_tokens


def test_prompt_tokens_count_the_special_tokens(engine, bundled_model):
    [result], report = engine.run([EmbedJob(texts=["hello world", "hello"])], BatchingConfig())
    # "hello world" -> [CLS] hello world [SEP]; "hello" -> [CLS] hello [SEP]
    assert result.prompt_tokens == 4 + 3
    assert report.tokens == 7
    [ids_result], _ = engine.run([EmbedJob(token_ids=[[7592, 2088]])], BatchingConfig())
    assert ids_result.prompt_tokens == 4


def test_queue_time_is_measured_from_enqueue_to_run(engine):
    jobs = [EmbedJob(texts=["a"], enqueued_at=1000.0), EmbedJob(texts=["b"], enqueued_at=1000.5), EmbedJob(texts=["c"])]
    results, report = engine.run(jobs, BatchingConfig(), now=1002.0)
    assert [r.queue_s for r in results] == [2.0, 1.5, 0.0]
    assert report.queue_s == [2.0, 1.5, 0.0]
    assert all(0 < r.forward_s <= report.forward_s and r.tokenize_s == report.tokenize_s for r in results)


def test_an_empty_run_does_nothing(engine):
    results, report = engine.run([], BatchingConfig())
    assert results == []
    assert (report.requests, report.inputs, report.forwards, report.errors) == (0, 0, 0, {})


def test_job_length_counts_its_inputs():
    assert len(EmbedJob(texts=["a", "b"])) == 2
    assert len(EmbedJob(token_ids=[[1], [2], [3]])) == 3
    assert len(EmbedJob()) == 0


def test_group_cost_defaults_to_the_cpu_figure(bundled_model):
    assert Engine(bundled_model, max_batch_tokens=1024).default_group_cost == 32
    assert Engine(bundled_model, max_batch_tokens=1024, group_cost_tokens=7).default_group_cost == 7


def test_cpu_token_budget_is_fixed():
    assert default_token_budget("cpu") == 8192


def test_each_job_is_handed_over_when_its_last_group_is_computed(engine, reference, too_long, monkeypatch):
    forwards = []  # the real forward, counted
    real = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda seqs: forwards.append(len(seqs)) or real(seqs))
    long_doc = " ".join(mixed_texts(60, seed=5))
    jobs = [EmbedJob(texts=[long_doc, "a short query"], truncate=True), EmbedJob(texts=["what is a socket"]),
            EmbedJob(texts=[too_long]), EmbedJob(texts=["open a file", "read lines"])]
    handed: list[tuple[int, object, float]] = []
    results, report = engine.run(jobs, BatchingConfig(),
                                 on_done=lambda j, result: handed.append((j, result, len(forwards))))
    order = [j for j, _, _ in handed]
    assert sorted(order) == [0, 1, 2, 3], "every job exactly once"
    assert order[0] == 2, "a refused input is answered before any forward"
    assert order[-1] == 0, "the job with a long document waits for the long group, which runs last"
    assert all(result is results[j] for j, result, _ in handed)
    assert isinstance(results[2].error, InputTooLong)
    assert_close(results[1].vectors, reference(["what is a socket"]))
    assert_close(results[3].vectors, reference(["open a file", "read lines"]))
    assert report.forwards >= 2
    early = [forwards for j, _, forwards in handed if j in (1, 3)]
    assert max(early) < report.forwards, "the short jobs were handed over before the last forward"
    assert results[1].forward_s < results[0].forward_s <= report.forward_s


def test_a_job_whose_caller_leaves_mid_run_is_dropped_from_the_forwards_still_to_come(engine, reference,
                                                                                     monkeypatch):
    long_doc = " ".join(mixed_texts(60, seed=7))
    short, gone = EmbedJob(texts=["a short query"]), EmbedJob(texts=[long_doc, "another short one"], truncate=True)
    forwarded: list[int] = []
    real = engine.model.forward

    def leave_after_first(j, result):  # the short job's answer goes out; then gone's client hangs up
        gone.cancelled = True

    monkeypatch.setattr(engine.model, "forward", lambda seqs: forwarded.append(len(seqs)) or real(seqs))
    results, report = engine.run([short, gone], BatchingConfig(), on_done=leave_after_first)
    assert_close(results[0].vectors, reference(["a short query"]))
    assert isinstance(results[1].error, Cancelled) and results[1].vectors is None
    assert report.inputs == sum(forwarded) < 3, "the long document was never computed"


@pytest.mark.parametrize(("device", "threads", "workers", "want"), [
    ("cpu", 2, None, ForwardLayout(2, 1)),   # on a CPU, by default one single-thread forward per core
    ("cpu", 1, None, ForwardLayout(1, 1)),
    ("cpu", 4, 2, ForwardLayout(2, 2)),      # the threads are split among the workers asked for
    ("cpu", 2, 1, ForwardLayout(1, 2)),      # one forward on every thread, as before forward_workers
    ("cpu", 1, 3, ForwardLayout(3, 1)),      # never fewer than one thread per forward
    ("cuda", 8, None, ForwardLayout(1, 8)),  # a GPU runs one forward at a time unless asked otherwise
    ("cuda", 8, 2, ForwardLayout(2, 4)),
])
def test_forward_layout_splits_the_replicas_threads_among_its_forwards(device, threads, workers, want):
    layout = forward_layout(device, threads, workers)
    assert layout == want
    assert layout.threads == want.workers * want.threads_per_forward


def test_runs_on_several_threads_at_once_give_the_vectors_of_one_thread(engine, texts):
    """What a replica's forward workers do: concurrent runs share the model and the tokenizer."""
    jobs = [[EmbedJob(texts=texts[k : k + 4], truncate=True)] for k in range(0, 16, 4)] * 3
    serial = [engine.run(j, BatchingConfig())[0][0].vectors for j in jobs]
    with cf.ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda j: engine.run(j, BatchingConfig())[0][0].vectors, jobs))
    for got, want in zip(concurrent, serial):
        assert np.abs(got - want).max() <= ABS_TOL


def test_a_runs_groups_share_the_forward_workers_and_come_back_in_plan_order(engine, reference, monkeypatch):
    """With a pool, a lone run's groups go to every forward worker at once (the first two forwards must
    meet at a barrier, which a run computing one group at a time never reaches), and each job is still
    handed over when its own groups are done, with the vectors of a run on one thread."""
    import threading

    medium = " ".join(" ".join(mixed_texts(30, seed=8)).split()[:60])
    texts = ["a short query", "what is a socket", medium, " ".join(mixed_texts(60, seed=9))]
    jobs = lambda: [EmbedJob(texts=[t], truncate=True) for t in texts]  # noqa: E731
    alone, alone_report = engine.run(jobs(), BatchingConfig())
    meet = threading.Barrier(2, timeout=10)
    calls, threads = [], set()
    real = engine.model.forward

    def forward(seqs):
        calls.append(len(seqs))
        threads.add(threading.current_thread().name)
        if len(calls) <= 2:
            meet.wait()  # both workers are inside a forward at the same time
        return real(seqs)

    monkeypatch.setattr(engine.model, "forward", forward)
    handed = []
    pool = ForwardPool(2, name="forward")
    results, report = engine.run(jobs(), BatchingConfig(), forwards=pool, on_done=lambda j, result: handed.append(j))
    pool.shutdown()
    assert len(threads) == 2 and all(name.startswith("forward") for name in threads)
    assert report.forwards == alone_report.forwards >= 3 and report.padded_tokens == alone_report.padded_tokens
    assert handed[-1] == 3, "the longest text is in the last group"
    for got, want in zip(results, alone):
        assert np.abs(got.vectors - want.vectors).max() <= ABS_TOL
    assert_close(np.concatenate([r.vectors for r in results]), reference(texts))


def test_a_caller_that_left_is_skipped_by_the_forward_workers_too(engine, texts):
    gone = EmbedJob(texts=texts[:3], truncate=True)
    gone.cancelled = True
    stays = EmbedJob(texts=texts[3:6], truncate=True)
    pool = ForwardPool(2)
    [left, kept], report = engine.run([gone, stays], BatchingConfig(), forwards=pool)
    pool.shutdown()
    assert isinstance(left.error, Cancelled) and left.vectors is None
    assert kept.error is None and kept.vectors.shape == (3, 384) and report.inputs == 3


def test_a_later_runs_first_group_goes_ahead_of_an_earlier_runs_later_groups(engine, monkeypatch):
    """One forward worker, held: run A queues three groups, then run B one; B's group comes second."""
    import threading

    real = engine.model.forward
    longest = []
    monkeypatch.setattr(engine.model, "forward", lambda seqs: longest.append(max(map(len, seqs))) or real(seqs))
    pool = ForwardPool(1)
    gate, held = threading.Event(), threading.Event()
    pool.submit(lambda: held.set() or gate.wait(10))
    held.wait(10)
    words = " ".join(mixed_texts(60, seed=12)).split()
    run_a = [EmbedJob(texts=["short one", " ".join(words[:60]), " ".join(words[:400])], truncate=True)]
    run_b = [EmbedJob(texts=[" ".join(words[100:125])], truncate=True)]
    with cf.ThreadPoolExecutor(2) as runs:
        a = runs.submit(engine.run, run_a, BatchingConfig(), forwards=pool)
        while pool.waiting < 3:
            time.sleep(0.01)
        b = runs.submit(engine.run, run_b, BatchingConfig(), forwards=pool)
        while pool.waiting < 4:
            time.sleep(0.01)
        gate.set()
        [result_b], _ = b.result(timeout=60)
        results_a, report_a = a.result(timeout=60)
    pool.shutdown()
    assert report_a.forwards == 3
    b_length = len(engine.tokenizer.finish(engine.tokenizer.content_ids(run_b[0].texts)[0], 0, True))
    assert longest[1] == b_length, longest  # A's first group, then B's, then A's other two
    assert longest[0] < longest[2] < longest[3]
    assert result_b.error is None and all(r.error is None for r in results_a)
