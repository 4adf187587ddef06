"""The bulk job's parts that need no Ray (embserve.bulk.job, embserve.launch.cli): the actor layout, model and settings
choice, the summary, and a shard embedded by ShardEmbedder in this process with the real bundled model."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from embserve.bulk.job import (
    BulkSummary,
    ShardEmbedder,
    ShardReport,
    actor_layout,
    pick_spec,
    settings_from_config,
    tokenize_and_plan,
)
from embserve.bulk.options import BulkInputError, parse_actors
from embserve.bulk.shards import PLAN_FILE, REJECTS_DIR, list_inputs, plan_shards, prepare_output
from embserve.engine.tokenize import Tokenizer
from embserve.launch.cli import main, parser
from embserve.settings import CPU_GROUP_COST_TOKENS, CPU_MAX_BATCH_TOKENS, ModelSpec, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_cpus_get_one_single_thread_actor_each_unless_told_otherwise():
    s = Settings()
    assert actor_layout({"CPU": 4.0}, s) == actor_layout({"CPU": 4.0}, s, cpus_per_actor=1)
    layout = actor_layout({"CPU": 4.0}, s)
    assert (layout.min_actors, layout.max_actors, layout.num_cpus, layout.num_gpus, layout.threads) == (4, 4, 1, 0, 1)
    one = actor_layout({"CPU": 4.0}, s, cpus_per_actor=4)
    assert (one.max_actors, one.threads) == (1, 4)
    assert actor_layout({"CPU": 2.0}, s, actors=1, cpus_per_actor=0.5).describe() == "1 actors x (0.5 CPU, 1 torch threads)"


def test_gpus_get_one_actor_each_and_a_pool_can_grow_with_the_cluster():
    s = Settings()
    layout = actor_layout({"CPU": 16.0, "GPU": 4.0}, s)
    assert (layout.max_actors, layout.num_gpus, layout.num_cpus) == (4, 1.0, 1.0)
    assert actor_layout({"CPU": 16.0, "GPU": 4.0}, Settings(device="cpu")).num_gpus == 0
    # A head with no GPU yet (cluster.yaml): the num_gpus setting asks for them, the autoscaler adds them.
    grows = actor_layout({"CPU": 0.0}, Settings(num_gpus=1), actors=(1, 4))
    assert (grows.min_actors, grows.max_actors, grows.num_gpus) == (1, 4, 1.0)
    assert grows.describe() == "1-4 actors x (1 GPU, 1 torch threads)"
    assert actor_layout({"CPU": 8.0}, Settings(device="cuda")).num_gpus == 1
    assert parse_actors("3") == (3, 3) and parse_actors("1-4") == (1, 4)
    for bad in ("0", "4-1"):
        with pytest.raises(ValueError):
            parse_actors(bad)


def test_the_model_is_the_settings_first_or_the_one_named_or_a_source():
    s = Settings(models=[ModelSpec(name="a", aliases=["alias-a"]), ModelSpec(name="b", source="/m/b")])
    assert pick_spec(s).name == "a"
    assert pick_spec(s, "alias-a").name == "a" and pick_spec(s, "b").source == "/m/b"
    other = pick_spec(s, "/models/bge-small/")
    assert (other.name, other.source) == ("bge-small", "/models/bge-small/")


def test_bulk_refuses_a_rerank_model_saying_so(clean_env):
    s = Settings(models=[ModelSpec(name="r", task="rerank"), ModelSpec(name="e")])
    with pytest.raises(BulkInputError, match="bulk reranking is not supported"):
        pick_spec(s)
    assert pick_spec(s, "e").name == "e"


def test_settings_come_from_a_serve_config_applications_args(tmp_path):
    assert settings_from_config(str(ROOT / "serve_config.yaml")).model_specs()[0].name == "all-MiniLM-L6-v2"
    config = tmp_path / "c.yaml"
    config.write_text("applications:\n  - name: x\n    args: {max_batch_tokens: 2048, num_gpus: 1}\n")
    assert settings_from_config(str(config), "x").max_batch_tokens == 2048
    with pytest.raises(ValueError, match="no application 'y'"):
        settings_from_config(str(config), "y")


def test_the_summary_says_rates_padding_and_rejects():
    summary = BulkSummary(output="/o", model="m", layout="2 actors", shards=4, shards_skipped=1, shards_run=0, shards_left=1)
    summary.add(ShardReport(index=0, rows=10, texts=8, tokens=80, padded_tokens=100, forwards=2, rejects={"empty": 2}))
    summary.add(ShardReport(index=1, rows=5, texts=4, tokens=40, padded_tokens=50, forwards=1, rejects={"empty": 1}))
    summary.seconds = 2.0
    d = summary.to_dict()
    assert (d["texts"], d["rejected"], d["texts_per_s"], d["tokens_per_s"], d["padding_efficiency"]) == (12, 3, 6.0, 60.0, 0.8)
    text = str(summary)
    assert "6.0 texts/s" in text and "empty=3" in text and "1 left for a rerun" in text and "0.800" in text
    assert BulkSummary(output="/o", model="m", layout="", shards=0, shards_skipped=0, shards_run=0,
                       shards_left=0).texts_per_s == 0.0


def test_texts_are_tokenized_and_planned_as_the_server_plans_them(float32_model):
    tok = Tokenizer(float32_model.tokenizer, float32_model.max_length, float32_model.vocab_size)
    texts = ["short one", "word " * 400, "a somewhat longer sentence about cats and mats", "tiny"]
    cfg = Settings().batching(max_batch_tokens=8192)
    sequences, kept, too_long, plan = tokenize_and_plan(tok, texts, False, cfg, 8192, 32)
    assert kept == [0, 2, 3] and list(too_long) == [1]
    assert too_long[1] == (f"the text has 402 tokens, more than this model's maximum of {tok.max_length}; "
                           "shorten it or pass --truncate")
    assert sorted(i for g in plan for i in g) == [0, 1, 2]
    _, kept, too_long, _ = tokenize_and_plan(tok, texts, True, cfg, 8192, 32)
    assert kept == [0, 1, 2, 3] and not too_long


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bulk-out"))
    fs = pafs.LocalFileSystem()
    prepare_output(fs, out, {})
    return ShardEmbedder(ModelSpec(name="all-MiniLM-L6-v2"), Settings(dtype="float32"), fs, fs, out, "text", "id",
                         truncate=False, chunk_rows=3, threads=1)


def test_an_actor_starts_as_a_replica_does_with_one_forward_on_its_threads(embedder):
    shown = embedder.profile.as_dict()  # the profile the server's start_replica writes
    assert (shown["forward_workers"]["value"], shown["torch_threads"]["value"]) == (1, 1)
    assert (embedder.budget, embedder.group_cost) == (CPU_MAX_BATCH_TOKENS, CPU_GROUP_COST_TOKENS)
    assert shown["group_cost_tokens"] == {"value": CPU_GROUP_COST_TOKENS, "source": "auto: CPU default"}
    assert embedder.model.info.dtype == "float32" and embedder.model.device == "cpu"


def test_a_shard_embedded_in_process_equals_the_models_own_forward_and_writes_its_rejects(embedder, float32_model, tmp_path):
    texts = ["The cat sits on the mat.", "  ", "A dog runs.", "word " * 400, "Embeddings for everyone, at scale.",
             None, "x"]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    fs, files = list_inputs([str(path)])
    [shard] = plan_shards(fs, files, 100, ["text", "id"])
    report = embedder.embed_shard(shard)
    assert (report.rows, report.texts, report.rejects) == (7, 4, {"empty": 1, "too_long": 1, "null": 1})
    table = pq.read_table(Path(embedder.out) / shard.part)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert table["id"].to_pylist() == ["d0", "d2", "d4", "d6"]  # input order, chunk after chunk
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    tok = Tokenizer(float32_model.tokenizer, float32_model.max_length, float32_model.vocab_size)
    sequences = [tok.finish(ids, 0, False) for ids in tok.content_ids([texts[i] for i in (0, 2, 4, 6)])]
    for row, sequence in enumerate(sequences):  # each alone, as a lone request's forward
        np.testing.assert_allclose(vectors[row], float32_model.forward([sequence])[0], atol=1e-5)
    assert report.tokens == sum(map(len, sequences)) and report.padded_tokens >= report.tokens
    rejects = pq.read_table(Path(embedder.out) / REJECTS_DIR / shard.part).to_pylist()
    assert [(r["id"], r["row"], r["reason"]) for r in rejects] == [
        ("d1", "c.jsonl:2", "empty"), ("d3", "c.jsonl:4", "too_long"), ("d5", "c.jsonl:6", "null")]


def test_a_row_the_model_turns_to_nan_is_a_reject_and_the_rest_of_its_group_is_written(nan_model, tmp_path):
    from tests.unit.conftest import POISON

    out = str(tmp_path / "out")
    fs = pafs.LocalFileSystem()
    prepare_output(fs, out, {})
    poisoned = ShardEmbedder(ModelSpec(name="all-MiniLM-L6-v2"), Settings(dtype="float32"), fs, fs, out, "text",
                             "id", truncate=False, chunk_rows=10, threads=1)
    clean = poisoned.model
    poisoned.model = nan_model  # the same model with the POISON word's embedding row set to NaN
    texts = ["The cat sits.", f"A {POISON} split.", "A dog runs."]  # one length group, one forward
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    fs_in, files = list_inputs([str(path)])
    [shard] = plan_shards(fs_in, files, 100, ["text", "id"])
    report = poisoned.embed_shard(shard)
    assert (report.rows, report.texts, report.rejects) == (3, 2, {"non_finite_output": 1})
    table = pq.read_table(Path(out) / shard.part)
    assert table["id"].to_pylist() == ["d0", "d2"]
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert np.isfinite(vectors).all()
    tok = clean.request_tokenizer()
    for row, i in enumerate((0, 2)):
        [ids] = tok.content_ids([texts[i]])
        np.testing.assert_allclose(vectors[row], clean.forward([tok.finish(ids, 0, False)])[0], atol=1e-5)
    [reject] = pq.read_table(Path(out) / REJECTS_DIR / shard.part).to_pylist()
    assert (reject["id"], reject["reason"]) == ("d1", "non_finite_output") and "float32" in reject["message"]


def test_the_cli_has_an_embed_subcommand_and_says_why_it_cannot_start(tmp_path, capsys):
    args = parser().parse_args(["embed", "in.jsonl", "--output", "out", "--actors", "1-4", "--truncate"])
    assert (args.command, args.input, args.actors, args.truncate, args.column) == ("embed", ["in.jsonl"], (1, 4), True, "text")
    assert main(["embed", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("a\n")
    assert main(["embed", str(tmp_path / "t.txt"), "--id-column", "id", "--output", str(tmp_path / "o")]) == 2
    assert "plain text has no id column" in capsys.readouterr().err
    assert not (tmp_path / "o" / PLAN_FILE).exists()
