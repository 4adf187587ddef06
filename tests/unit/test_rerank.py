"""Cross-encoders built here (random classifier heads on the bundled encoder), served in-process through the
replica's scheduler, against sentence-transformers' own `CrossEncoder.predict`; pair tokenization and truncation
against the model's tokenizer; the models refused; and the rerank answer's shape."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest

from embserve.api.contracts import RerankJob
from embserve.api.errors import InputTooLong, InvalidRequest, PayloadTooLarge, UnsupportedModel
from embserve.api.inputs import Limits, check_rerank_input
from embserve.api.responses import rerank_body, tei_rerank_body
from embserve.engine.rerank import CrossEncoderModel, activate, longest_first, read_cross_encoder
from embserve.engine.scheduler import ForwardLayout, Scheduler, embed_jobs
from embserve.metrics.events import Admitted
from embserve.metrics.stats import Aggregate, Event
from embserve.settings import BatchingConfig, ModelSpec
from tests.cross_encoders import DOCUMENTS, LONG_DOCUMENT, QUERY, build_cross_encoder, set_config
from tests.texts import mixed_texts


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    """Sigmoid (saved by CrossEncoder), identity with a 64-token maximum, and a plain transformers folder (no
    sentence-transformers files: sigmoid by default)."""
    root = tmp_path_factory.mktemp("cross-encoders")
    return {
        "sigmoid": build_cross_encoder(root / "sigmoid", "sigmoid"),
        "identity": build_cross_encoder(root / "identity", "identity", max_length=64, seed=12),
        "plain": build_cross_encoder(root / "plain", sentence_transformers=False, seed=13),
    }


@pytest.fixture(scope="module")
def reference(built):
    from sentence_transformers import CrossEncoder

    return {name: CrossEncoder(path, device="cpu") for name, path in built.items()}


@pytest.fixture(scope="module")
def served(built):
    """embserve's cross-encoder and a scheduler for each built model, in float32."""
    cache: dict[str, Scheduler] = {}

    def get(name: str) -> Scheduler:
        if name not in cache:
            model = CrossEncoderModel(ModelSpec(name=name, source=built[name], task="rerank"), device="cpu",
                                      dtype="float32")
            cache[name] = Scheduler(model, ForwardLayout(1, 1), config=lambda: BatchingConfig(), max_batch_tokens=8192)
        return cache[name]

    yield get
    for scheduler in cache.values():
        scheduler.close()


def _scores(scheduler: Scheduler, query: str, documents: list[str], truncate: bool = False) -> np.ndarray:
    [result] = embed_jobs(scheduler, [RerankJob(query, documents, truncate)])
    assert result.error is None, result.error
    return activate(result.vectors, scheduler.model.info.activation)


@pytest.mark.parametrize("name", ["sigmoid", "identity", "plain"])
def test_scores_are_cross_encoder_predicts_within_1e_5(served, reference, name):
    documents = [*DOCUMENTS, LONG_DOCUMENT]  # the long one is truncated, by both, longest first
    got = _scores(served(name), QUERY, documents, truncate=True)
    want = reference[name].predict([(QUERY, d) for d in documents])
    assert got.shape == want.shape == (len(documents),)
    assert np.abs(got - want).max() <= 1e-5
    assert np.ptp(want) > 0.05  # scores that differ, so that the comparison means something


def test_each_model_runs_the_activation_its_cross_encoder_applies(served, reference):
    assert {n: served(n).model.info.activation for n in ("sigmoid", "identity", "plain")} == {
        "sigmoid": "sigmoid", "identity": "identity", "plain": "sigmoid"}
    import torch

    # What the replica answers is the logits (TEI's raw_scores); the activation is applied per request.
    logits = embed_jobs(served("sigmoid"), [RerankJob(QUERY, DOCUMENTS)])[0].vectors
    raw = reference["sigmoid"].predict([(QUERY, d) for d in DOCUMENTS], activation_fn=torch.nn.Identity())
    assert np.abs(logits - raw).max() <= 1e-5


def test_max_length_is_the_cross_encoders_own(served, reference):
    assert served("identity").model.max_length == reference["identity"].max_seq_length == 64
    assert served("sigmoid").model.max_length == reference["sigmoid"].max_seq_length


def test_pair_ids_are_the_tokenizers_own_with_longest_first_truncation(served):
    """Every split of the room between query and document, against the tokenizer called on the pair."""
    model = served("identity").model
    pairs = model.request_tokenizer()
    tok = model.tokenizer
    words = mixed_texts(40, seed=5)
    rng = random.Random(3)
    for _ in range(60):
        query = " ".join(rng.choice(words).split()[: rng.randint(1, 60)])
        document = " ".join(rng.choice(words).split()[: rng.randint(1, 120)])
        want = tok(query, document, truncation="longest_first", max_length=model.max_length)
        [[got]] = pairs.prepare([RerankJob(query, [document], truncate=True)])
        assert list(got) == want["input_ids"]
        types = [0] * got.first + [1] * (len(got) - got.first)
        assert types == want["token_type_ids"]


def test_longest_first_keeps_what_the_tokenizer_keeps(served):
    tok = served("sigmoid").model.tokenizer
    cat, dog = tok.convert_tokens_to_ids("cat"), tok.convert_tokens_to_ids("dog")
    for n1, n2 in itertools.product(range(1, 70, 3), range(1, 70, 4)):
        ids = tok(" ".join(["cat"] * n1), " ".join(["dog"] * n2), truncation="longest_first", max_length=40)["input_ids"]
        assert longest_first(n1, n2, 40 - 3) == (ids.count(cat), ids.count(dog)), (n1, n2)


def test_an_over_long_pair_without_truncate_fails_its_request_alone(served):
    scheduler = served("identity")
    long, fine = embed_jobs(scheduler, [RerankJob(QUERY, [DOCUMENTS[0], LONG_DOCUMENT]), RerankJob(QUERY, DOCUMENTS)])
    assert isinstance(long.error, InputTooLong)
    assert long.error.param == "documents" and long.error.code == "context_length_exceeded"
    assert "documents[1]" in long.error.message and "maximum of 64" in long.error.message
    assert fine.error is None and fine.vectors.shape == (len(DOCUMENTS),)
    [tei] = embed_jobs(scheduler, [RerankJob(QUERY, [LONG_DOCUMENT], field="texts")])
    assert tei.error.param == "texts" and "texts[0]" in tei.error.message


def test_a_pairs_score_does_not_depend_on_the_batch_it_shares(served, reference):
    """Alone, then among many pairs of other lengths in one admission (so in padded groups): within 1e-5."""
    scheduler = served("sigmoid")
    others = mixed_texts(48, seed=9)
    alone = [_scores(scheduler, QUERY, [d])[0] for d in DOCUMENTS]
    results = embed_jobs(scheduler, [RerankJob(QUERY, others[:24]), RerankJob(QUERY, DOCUMENTS),
                                     RerankJob("another query, longer than the first one", others[24:])])
    shared = activate(results[1].vectors, "sigmoid")
    assert np.abs(shared - np.array(alone)).max() <= 1e-5


def test_the_pipelined_scheduler_of_a_gpu_replica_scores_pairs_as_the_plain_one(built, reference):
    """A GPU replica's one worker is pipelined (Scheduler._pipeline): run here on the CPU, it must score pairs
    through the cross-encoder's own launch (the stream launcher runs an embedding model's pooling on a GPU), as
    the plain workers do."""
    from embserve.engine.gpu_pipeline import launcher_for

    model = CrossEncoderModel(ModelSpec(name="p", source=built["sigmoid"], task="rerank"), device="cpu",
                              dtype="float32")
    assert launcher_for(model) is model
    scheduler = Scheduler(model, ForwardLayout(1, 1), config=lambda: BatchingConfig(), max_batch_tokens=8192,
                          pipelined=True)
    try:
        got = _scores(scheduler, QUERY, [*DOCUMENTS, LONG_DOCUMENT], truncate=True)
    finally:
        scheduler.close()
    want = reference["sigmoid"].predict([(QUERY, d) for d in [*DOCUMENTS, LONG_DOCUMENT]])
    assert np.abs(got - want).max() <= 1e-5


def test_usage_counts_every_pairs_tokens(served, reference):
    [result] = embed_jobs(served("sigmoid"), [RerankJob(QUERY, DOCUMENTS)])
    tok = reference["sigmoid"].tokenizer
    assert result.prompt_tokens == sum(len(tok(QUERY, d)["input_ids"]) for d in DOCUMENTS)


def test_admission_reports_the_rerank_task(built):
    seen: list = []
    model = CrossEncoderModel(ModelSpec(name="r", source=built["plain"], task="rerank"), device="cpu", dtype="float32")
    scheduler = Scheduler(model, ForwardLayout(1, 1), config=lambda: BatchingConfig(), max_batch_tokens=8192,
                          report=seen.append)
    try:
        embed_jobs(scheduler, [RerankJob(QUERY, DOCUMENTS[:3])])
    finally:
        scheduler.close()
    [admitted] = [e for e in seen if isinstance(e, Admitted)]
    assert (admitted.task, admitted.requests, admitted.inputs) == ("rerank", 1, 3)


def test_rerank_requests_and_pairs_are_counted_per_model():
    from embserve.metrics.prometheus import render

    aggregate = Aggregate()
    events = [Event(1.0, Admitted(2, 7, 0.001, "rerank"))]
    aggregate.record("replica-a", "replica", "my-reranker", events, now=2.0)
    aggregate.record("replica-b", "replica", "minilm", [Event(1.0, Admitted(3, 5, 0.001))], now=2.0)
    snap = aggregate.snapshot(now=2.0)
    assert snap["models"]["my-reranker"]["totals"]["rerank_requests"] == 2
    assert snap["models"]["my-reranker"]["totals"]["rerank_pairs"] == 7
    assert snap["models"]["minilm"]["totals"]["rerank_requests"] == 0
    assert (snap["totals"]["rerank_requests"], snap["totals"]["requests"]) == (2, 5)
    text = render(aggregate).decode()
    assert 'embserve_rerank_pairs_total{model="my-reranker"} 7.0' in text
    assert 'embserve_rerank_requests_total{model="minilm"} 0.0' in text


def test_activation_is_read_where_sentence_transformers_reads_it(built, tmp_path):
    assert read_cross_encoder(built["identity"]).activation == "identity"  # config_sentence_transformers.json
    plain = tmp_path / "plain"
    shutil.copytree(built["plain"], plain)
    assert read_cross_encoder(str(plain)).activation == "sigmoid"  # one label, nothing saved: sigmoid
    set_config(str(plain), sbert_ce_default_activation_function="torch.nn.modules.linear.Identity")
    assert read_cross_encoder(str(plain)).activation == "identity"  # before sentence-transformers 4
    set_config(str(plain), sentence_transformers={"activation_fn": "torch.nn.modules.activation.Tanh"})
    assert read_cross_encoder(str(plain)).activation == "tanh"  # wins over the legacy key
    set_config(str(plain), sentence_transformers={"activation_fn": "my_package.Scaled"})
    assert read_cross_encoder(str(plain)).activation == "identity"  # not torch's: skipped, as without remote code


def test_activation_tanh_and_sigmoid_match_torch():
    import torch

    x = np.linspace(-30, 30, 601, dtype=np.float32)
    # within a float32 ulp of 1 or two: far inside the 1e-5 the scores are held to
    assert np.abs(activate(x, "sigmoid") - torch.sigmoid(torch.from_numpy(x)).numpy()).max() <= 3e-7
    assert np.abs(activate(x, "tanh") - torch.tanh(torch.from_numpy(x)).numpy()).max() <= 3e-7
    assert np.array_equal(activate(x, "identity"), x)


def test_models_that_are_not_one_label_cross_encoders_are_refused(built, tmp_path):
    from embserve.engine.model import resolve_source

    with pytest.raises(UnsupportedModel, match="ForSequenceClassification"):
        read_cross_encoder(resolve_source("bundled"))  # an embedding model
    two = tmp_path / "two"
    shutil.copytree(built["plain"], two)
    set_config(str(two), id2label={"0": "no", "1": "yes"})
    with pytest.raises(UnsupportedModel, match="2 labels"):
        read_cross_encoder(str(two))
    softmax = tmp_path / "softmax"
    shutil.copytree(built["sigmoid"], softmax)
    cfg = json.loads((softmax / "config_sentence_transformers.json").read_text())
    cfg["activation_fn"] = "torch.nn.modules.activation.Softmax"
    (softmax / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="Softmax"):
        read_cross_encoder(str(softmax))
    extra = tmp_path / "extra"
    shutil.copytree(built["sigmoid"], extra)
    modules = json.loads((extra / "modules.json").read_text())
    (extra / "modules.json").write_text(json.dumps([*modules, {"idx": 1, "name": "1", "path": "1_Dense",
                                                               "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UnsupportedModel, match="one Transformer module"):
        read_cross_encoder(str(extra))


def test_rerank_input_errors_are_the_embeddings_kinds():
    limits = Limits(max_inputs=3, max_chars=100)
    with pytest.raises(InvalidRequest, match="nothing to rerank") as empty:
        check_rerank_input("q", [], limits)
    assert (empty.value.param, empty.value.code) == ("documents", "empty_input")
    with pytest.raises(PayloadTooLarge) as many:
        check_rerank_input("q", ["a"] * 4, limits, field="texts")
    assert many.value.param == "texts" and many.value.code == "too_many_inputs"
    with pytest.raises(InvalidRequest, match=r"documents\[1\] is empty"):
        check_rerank_input("q", ["a", "  "], limits)
    with pytest.raises(InvalidRequest, match="query is empty") as query:
        check_rerank_input(" ", ["a"], limits)
    assert query.value.param == "query"
    with pytest.raises(InvalidRequest, match="NUL"):
        check_rerank_input("q", ["a\x00"], limits)


def test_rerank_body_sorts_by_score_cuts_top_n_and_returns_documents():
    scores = np.array([0.1, 0.9, 0.5, 0.9], dtype=np.float32)
    body = json.loads(rerank_body(scores, ["a", "b", "c", "d"], "m", 12, top_n=3, return_documents=True))
    assert [r["index"] for r in body["results"]] == [1, 3, 2]  # ties keep document order
    assert [r["document"]["text"] for r in body["results"]] == ["b", "d", "c"]
    assert body["results"][0]["relevance_score"] == pytest.approx(0.9)
    assert body["usage"] == {"prompt_tokens": 12, "total_tokens": 12} and body["model"] == "m"
    plain = json.loads(rerank_body(scores, ["a", "b", "c", "d"], "m", 12, top_n=None, return_documents=False))
    assert len(plain["results"]) == 4 and "document" not in plain["results"][0]
    tei = json.loads(tei_rerank_body(scores, ["a", "b", "c", "d"], return_text=True))
    assert tei[0] == {"index": 1, "score": pytest.approx(0.9), "text": "b"} and [t["index"] for t in tei] == [1, 3, 2, 0]
