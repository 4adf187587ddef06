"""Sharding, ids, refusing bad rows and resuming (embserve.bulk.shards): plain files, no model, no Ray."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from embserve.bulk.shards import (
    PLAN_FILE,
    TMP_DIR,
    BulkInputError,
    classify_text,
    done_parts,
    group_spans,
    line_spans,
    list_inputs,
    open_fs,
    pending,
    plan_shards,
    prepare_output,
    read_shard,
    save_plan,
)

LOCAL = pafs.LocalFileSystem()


def blocks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 1000])
def test_line_spans_cover_every_line_once_whatever_the_read_size(size):
    data = b"a\nbb\n\nccc\ndddd\ne"  # an empty line is a row; the last line has no newline
    spans = line_spans(blocks(data, size), 2)
    assert spans == [(0, 2, 0, 5), (2, 2, 5, 10), (4, 2, 10, 16)]
    assert b"".join(data[a:b] for _, _, a, b in spans) == data


def test_line_spans_count_a_trailing_newline_as_no_row_and_an_empty_file_as_no_shard():
    assert line_spans([b"a\nb\n"], 10) == [(0, 2, 0, 4)]
    assert line_spans([b"a\nb\n"], 2) == [(0, 2, 0, 4)]
    assert line_spans([], 3) == []
    assert line_spans([b"\n"], 3) == [(0, 1, 0, 1)]
    with pytest.raises(ValueError):
        line_spans([b"a"], 0)


def test_group_spans_join_row_groups_up_to_the_shard_size_and_keep_a_big_one_whole():
    assert group_spans([3, 3, 3, 3, 1], 6) == [(0, 6, 0, 2), (6, 6, 2, 4), (12, 1, 4, 5)]
    assert group_spans([100, 2], 10) == [(0, 100, 0, 1), (100, 2, 1, 2)]
    assert group_spans([], 10) == []


@pytest.mark.parametrize("value, reason", [
    (None, "null"), (3, "not_text"), ("", "empty"), ("  \n", "empty"), ("a\x00b", "invalid_text"),
    ("\ud800", "invalid_text"), ("x" * 11, "too_many_chars"),
])
def test_a_text_the_server_would_refuse_is_refused_with_its_reason(value, reason):
    assert classify_text(value, max_chars=10)[0] == reason
    assert classify_text("fine", max_chars=10) is None


def test_inputs_are_listed_in_name_order_with_names_relative_to_their_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z\n")
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / ".hidden.txt").write_text("h\n")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "x.txt").write_text("x\n")
    (tmp_path / "notes.md").write_text("not an input\n")
    fs, files = list_inputs([str(tmp_path)])
    assert [(f.name, f.format) for f in files] == [("a.txt", "text"), ("b/z.txt", "text")]
    _, one = list_inputs([f"file://{tmp_path}/a.txt"])  # a URI works as a path does
    assert one[0].name == "a.txt" and one[0].size == 2


def test_inputs_of_two_formats_or_unknown_names_or_same_names_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    (tmp_path / "c.csv").write_text("c\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a\n")
    with pytest.raises(BulkInputError, match="several formats"):
        list_inputs([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    with pytest.raises(BulkInputError, match="cannot tell the format"):
        list_inputs([str(tmp_path / "c.csv")])
    assert list_inputs([str(tmp_path / "c.csv")], "text")[1][0].format == "text"
    with pytest.raises(BulkInputError, match="same ids"):
        list_inputs([str(tmp_path / "a.txt"), str(tmp_path / "d" / "a.txt")])
    with pytest.raises(BulkInputError, match="does not exist"):
        list_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(BulkInputError, match="unknown format"):
        list_inputs([str(tmp_path)], "csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BulkInputError, match="no input files"):
        list_inputs([str(tmp_path / "empty")])


def test_text_rows_get_file_and_line_ids_that_a_second_plan_gives_again(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"one\r\ntwo\n\nfour\nfive")
    fs, files = list_inputs([str(path)])
    shards = plan_shards(fs, files, 2, ["text"])
    assert shards == plan_shards(fs, files, 2, ["text"])
    rows = [read_shard(fs, s, "text", None, 100) for s in shards]
    assert [r.ids.to_pylist() for r in rows] == [["corpus.txt:1", "corpus.txt:2"], ["corpus.txt:3", "corpus.txt:4"],
                                                 ["corpus.txt:5"]]
    assert [r.texts for r in rows] == [["one", "two"], [None, "four"], ["five"]]
    assert rows[1].refused == {0: ("empty", "the text is empty or only whitespace")}


def test_jsonl_rows_that_cannot_be_read_are_refused_each_with_its_reason(tmp_path):
    lines = [json.dumps({"id": 1, "text": "fine"}), "not json", json.dumps([1, 2]), "",
             json.dumps({"id": None, "text": "no id"}), json.dumps({"id": "x"}), json.dumps({"id": [1], "text": "t"}),
             json.dumps({"id": "y", "text": 5}), json.dumps({"id": "z", "text": "ok"})]
    path = tmp_path / "c.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    fs, files = list_inputs([str(path)])
    [shard] = plan_shards(fs, files, 100, ["text"])
    rows = read_shard(fs, shard, "text", "id", 100)
    assert rows.texts[0] == "fine" and rows.texts[8] == "ok"
    assert rows.ids.to_pylist()[0] == "1" and rows.ids.to_pylist()[8] == "z"  # JSON ids become strings
    assert {k: reason for k, (reason, _) in rows.refused.items()} == {
        1: "invalid_json", 2: "invalid_json", 3: "empty", 4: "null_id", 5: "null", 6: "invalid_id", 7: "not_text",
        9: "invalid_utf8"}
    assert rows.positions[9] == "c.jsonl:10"


def test_parquet_rows_keep_their_id_type_and_are_sharded_by_row_group(tmp_path):
    table = pa.table({"doc": pa.array(range(10), pa.int64()), "body": [f"text {i}" for i in range(9)] + [None]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=3)
    fs, files = list_inputs([str(tmp_path / "p.parquet")])
    shards = plan_shards(fs, files, 5, ["body", "doc"])
    assert [(s.first_row, s.rows, s.start, s.stop) for s in shards] == [(0, 6, 0, 2), (6, 4, 2, 4)]
    rows = read_shard(fs, shards[1], "body", "doc", 100)
    assert rows.ids.type == pa.int64() and rows.ids.to_pylist() == [6, 7, 8, 9]
    assert rows.positions == ["p.parquet:6", "p.parquet:7", "p.parquet:8", "p.parquet:9"]
    assert rows.refused == {3: ("null", "no text (null or missing)")}
    no_ids = read_shard(fs, shards[0], "body", None, 100)
    assert no_ids.ids.to_pylist()[:2] == ["p.parquet:0", "p.parquet:1"]
    with pytest.raises(BulkInputError, match="no column 'text'"):
        plan_shards(fs, files, 5, ["text"])


def test_a_file_changed_since_it_was_planned_is_refused(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a\nb\n")
    fs, files = list_inputs([str(path)])
    [shard] = plan_shards(fs, files, 10, ["text"])
    path.write_text("a\n\nb\n")
    with pytest.raises(BulkInputError, match="changed since it was planned"):
        read_shard(fs, shard, "text", None, 100)


def test_a_rerun_skips_shards_whose_part_exists_and_ignores_what_a_killed_run_left(tmp_path):
    (tmp_path / "c.txt").write_text("".join(f"line {i}\n" for i in range(10)))
    fs, files = list_inputs([str(tmp_path / "c.txt")])
    out = str(tmp_path / "out")
    key = {"inputs": [[f.name, f.size, f.format] for f in files], "shard_rows": 3}
    assert prepare_output(fs, out, key) is None
    shards = plan_shards(fs, files, 3, ["text"])
    save_plan(fs, out, key, shards)
    (Path(out) / "part-00001.parquet").write_bytes(b"done")
    (Path(out) / TMP_DIR / "part-00002.parquet.abc").write_bytes(b"half")  # a killed run's half-written part
    assert prepare_output(fs, out, key) == shards  # the saved plan, not a new one
    assert not any((Path(out) / TMP_DIR).iterdir())
    assert done_parts(fs, out) == {"part-00001.parquet"}
    assert [s.index for s in pending(shards, done_parts(fs, out))] == [0, 2, 3]
    assert (Path(out) / PLAN_FILE).is_file()
    with pytest.raises(BulkInputError, match="another job.*shard_rows"):
        prepare_output(fs, out, {**key, "shard_rows": 4})


def test_open_fs_takes_local_paths_and_uris(tmp_path):
    fs, path = open_fs("relative/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path.endswith("/relative/dir") and path.startswith("/")
    fs, path = open_fs(f"file://{tmp_path}")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
