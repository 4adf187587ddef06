"""Bulk embedding on the session's Ray (embserve.bulk.job, `embserve embed`): real Ray Data actor pools and the real
bundled model. Vectors equal the model's own forward (float32), and the server's /v1/embeddings; a killed run
is finished by a rerun with every id once; bad rows go to the rejects; JSONL, Parquet and plain text inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embserve.bulk.job import embed_corpus
from embserve.bulk.shards import REJECTS_DIR
from embserve.engine.tokenize import Tokenizer
from embserve.launch import procfs
from embserve.settings import Settings
from tests.doc_blocks import fenced_blocks
from tests.integration.conftest import ROOT, set_env

pytestmark = pytest.mark.integration
F32 = Settings(dtype="float32")
CLI = [sys.executable, "-m", "embserve.launch.cli"]
WORDS = "the cat sits on a mat while dogs run through green fields under a wide blue sky".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 60)))) for _ in range(n)]


def output(out: Path) -> dict:
    """id -> vector of every part file; no id twice."""
    table = pq.read_table(out)  # OUT as any Parquet reader sees it: _rejects and _tmp are skipped
    ids = table.column(0).to_pylist()
    assert len(ids) == len(set(ids)), "an id is written twice"
    return dict(zip(ids, np.stack(table["embedding"].to_numpy(zero_copy_only=False))))


def rejects(out: Path) -> list[dict]:
    return pq.read_table(out / REJECTS_DIR).to_pylist() if (out / REJECTS_DIR).exists() and any(
        (out / REJECTS_DIR).iterdir()) else []


def expected(model, texts: list[str], truncate: bool = False) -> np.ndarray:
    """Each text alone through the model's own forward, as a lone /v1/embeddings request computes it."""
    tok = Tokenizer(model.tokenizer, model.max_length, model.vocab_size)
    return np.stack([model.forward([tok.finish(ids, 0, truncate)])[0] for ids in tok.content_ids(texts)])


def cli_env() -> dict:
    import ray

    # The venv's bin first, as for a user who activated it: that is where `embserve` is installed.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1"}


def test_jsonl_vectors_equal_the_models_own_and_bad_rows_go_to_the_rejects(ray_cluster, float32_model, tmp_path):
    texts = sentences(50)
    bad = {7: "   ", 19: None, 33: "word " * 300, 41: "nul\x00byte"}
    rows = [{"id": f"doc-{i}", "text": bad.get(i, t)} for i, t in enumerate(texts)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(25, "{not json")
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    summary = embed_corpus(str(tmp_path / "corpus.jsonl"), str(tmp_path / "out"), id_column="id", settings=F32,
                           shard_rows=12, chunk_rows=8, progress=False)
    assert (summary.shards, summary.shards_run, summary.rows, summary.texts) == (5, 5, 51, 46)
    assert summary.rejects == {"empty": 1, "null": 1, "too_long": 1, "invalid_text": 1, "invalid_json": 1}
    assert 0.5 < summary.padding_efficiency <= 1.0 and summary.tokens_per_s > 0
    got = output(tmp_path / "out")
    good = [i for i in range(50) if i not in bad]
    assert sorted(got) == sorted(f"doc-{i}" for i in good)
    want = expected(float32_model, [texts[i] for i in good])
    np.testing.assert_allclose(np.stack([got[f"doc-{i}"] for i in good]), want, atol=1e-5)
    refused = {(r["id"], r["row"], r["reason"]) for r in rejects(tmp_path / "out")}
    assert refused == {("doc-7", "corpus.jsonl:8", "empty"), ("doc-19", "corpus.jsonl:20", "null"),
                       (None, "corpus.jsonl:26", "invalid_json"), ("doc-33", "corpus.jsonl:35", "too_long"),
                       ("doc-41", "corpus.jsonl:43", "invalid_text")}


def test_parquet_rows_keep_their_integer_ids_over_many_row_groups(ray_cluster, float32_model, tmp_path):
    texts = sentences(40, seed=1)
    table = pa.table({"doc": pa.array(range(1000, 1040), pa.int64()), "body": texts})
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 25), tmp_path / "in" / "a.parquet", row_group_size=6)
    pq.write_table(table.slice(25), tmp_path / "in" / "b.parquet", row_group_size=6)
    summary = embed_corpus(str(tmp_path / "in"), str(tmp_path / "out"), column="body", id_column="doc",
                           settings=F32, shard_rows=10, progress=False)
    assert (summary.shards, summary.texts, summary.rejected) == (5, 40, 0)  # a: 12+12+1 rows, b: 12+3
    written = pq.read_table(tmp_path / "out")
    assert written.schema.field("doc").type == pa.int64()
    got = output(tmp_path / "out")
    assert sorted(got) == list(range(1000, 1040))
    np.testing.assert_allclose(np.stack([got[1000 + i] for i in range(40)]), expected(float32_model, texts), atol=1e-5)


def test_plain_text_rows_are_named_by_file_and_line_and_truncate_keeps_long_ones(ray_cluster, float32_model, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("first line\n\nthird line\n")
    long = "word " * 300
    (tmp_path / "in" / "sub" / "b.txt").write_text(f"{long}\nlast line without newline")
    summary = embed_corpus(f"file://{tmp_path}/in", str(tmp_path / "out"), settings=F32, truncate=True,
                           progress=False)
    assert (summary.texts, summary.rejects) == (4, {"empty": 1})
    got = output(tmp_path / "out")
    assert sorted(got) == ["a.txt:1", "a.txt:3", "sub/b.txt:1", "sub/b.txt:2"]
    want = expected(float32_model, [long], truncate=True)[0]
    np.testing.assert_allclose(got["sub/b.txt:1"], want, atol=1e-5)
    assert [r["row"] for r in rejects(tmp_path / "out")] == ["a.txt:2"]


def test_a_run_stopped_after_some_shards_is_finished_by_a_rerun_with_every_id_once(ray_cluster, tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(sentences(60, seed=2)) + "\n")
    first = embed_corpus(str(tmp_path / "c.txt"), str(tmp_path / "out"), settings=F32, shard_rows=10, max_shards=2,
                         progress=False)
    assert (first.shards, first.shards_run, first.shards_left, first.texts) == (6, 2, 4, 20)
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet")}
    assert sorted(done) == ["part-00000.parquet", "part-00001.parquet"]
    second = embed_corpus(str(tmp_path / "c.txt"), str(tmp_path / "out"), settings=F32, shard_rows=10, progress=False)
    assert (second.shards_skipped, second.shards_run, second.texts) == (2, 4, 40)
    assert {p: (tmp_path / "out" / p).stat().st_mtime_ns for p in done} == done  # not written again
    assert sorted(output(tmp_path / "out")) == sorted(f"c.txt:{i}" for i in range(1, 61))
    third = embed_corpus(str(tmp_path / "c.txt"), str(tmp_path / "out"), settings=F32, shard_rows=10, progress=False)
    assert (third.shards_skipped, third.shards_run) == (6, 0)


def actors() -> dict[str, tuple[str, int, str]]:
    """Actor id -> (state, worker pid, class) of every actor the session's Ray knows of, the dead included;
    detached ones (Ray Data's own, which outlive any driver) left out."""
    from ray._private import state

    return {actor_id: (info["State"], info["Pid"], info["ActorClassName"])
            for actor_id, info in state.actors().items() if not info["IsDetached"]}


def wait_until_gone(actor_ids: set[str], timeout_s: float = 60) -> None:
    """Returns once Ray has declared each of `actor_ids` dead and its worker process has exited: Ray ends a
    killed driver's actors after the driver, and one of them may still finish a shard meanwhile."""
    deadline = time.monotonic() + timeout_s
    while any(state != "DEAD" or procfs.alive(pid)
              for actor_id, (state, pid, _) in actors().items() if actor_id in actor_ids):
        assert time.monotonic() < deadline, f"the killed run's actors outlived it: {actors()}"
        time.sleep(0.1)


def test_a_killed_cli_run_is_finished_by_a_rerun_with_every_id_once(ray_cluster, tmp_path):
    rows = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(sentences(300, seed=3))]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = CLI + ["embed", "corpus.jsonl", "--output", "vectors", "--id-column", "id", "--shard-rows", "10",
                     "--actors", "1"]
    before = set(actors())
    run = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not list((tmp_path / "vectors").glob("part-*.parquet")) and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)  # as a crash would: no clean-up of any kind
    run.wait()
    # Its actors may finish a shard or two after the driver's death, and write it whole: count once they're gone.
    started = set(actors()) - before
    assert started, "the killed run started no actor of its own"
    wait_until_gone(started)
    parts = len(list((tmp_path / "vectors").glob("part-*.parquet")))
    assert 1 <= parts < 30, f"{parts} shards done before the kill"
    again = subprocess.run(command + ["--json"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == parts and summary["shards_run"] == 30 - parts
    assert sorted(output(tmp_path / "vectors")) == sorted(r["id"] for r in rows)
    assert not list((tmp_path / "vectors" / "_tmp").iterdir())  # what the killed run left half-written is gone


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Bulk embedding"): readme.index("## Operate")]


def test_the_readme_bulk_examples_run_as_written(ray_cluster, float32_model, tmp_path):
    section = readme_section()
    [command] = [line for line in section.splitlines() if line.startswith("embserve embed ")]
    [python] = fenced_blocks("docs/bulk.md", "python")  # the README's command, docs/bulk.md's Python
    texts = ["The cat sits on the mat.", "A dog runs.", ""]
    for where in ("cli", "python"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "corpus.jsonl").write_text(
            "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    done = subprocess.run(command, shell=True, cwd=tmp_path / "cli", env={**cli_env(), "EMB_PROVIDER_DTYPE": "float32"},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "embedded 2 texts" in done.stdout and "rejects: 1 (empty=1)" in done.stdout
    cwd = os.getcwd()
    os.chdir(tmp_path / "python")
    try:
        os.environ["EMB_PROVIDER_DTYPE"] = "float32"
        scope: dict = {}
        exec(compile(python, "docs/bulk.md", "exec"), scope)
    finally:
        os.environ.pop("EMB_PROVIDER_DTYPE")
        os.chdir(cwd)
    assert scope["summary"].texts == 2
    want = expected(float32_model, texts[:2])
    for where in ("cli", "python"):
        got = output(tmp_path / where / "vectors")
        np.testing.assert_allclose(np.stack([got["doc-0"], got["doc-1"]]), want, atol=1e-5)


def test_bulk_vectors_equal_the_servers_v1_embeddings(serve_app, client, tmp_path):
    """Last in the module: the app takes 1.25 of the test cluster's 2 CPUs, the bulk actor half of one."""
    serve_app(lambda config: set_env(config, dtype="float32"))
    texts = sentences(12, seed=4) + ["The cat sits on the mat."]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    summary = embed_corpus(str(tmp_path / "c.txt"), str(tmp_path / "out"), settings=F32, actors=1,
                           cpus_per_actor=0.5, progress=False)
    assert summary.texts == len(texts)
    response = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts,
                                                   "encoding_format": "float"})
    assert response.status_code == 200, response.text
    served = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    assert summary.tokens == response.json()["usage"]["prompt_tokens"]
    got = output(tmp_path / "out")
    np.testing.assert_allclose(np.stack([got[f"c.txt:{i + 1}"] for i in range(len(texts))]), served, atol=1e-5)
