"""A corpus as deterministic shards: which rows of which input file each shard holds, the rows' ids, reading a
shard back, refusing bad rows, and the part files that mark a shard done. pyarrow only: no model, no Ray.

A shard is a byte range of whole lines (text and JSONL) or a run of row groups (Parquet), about `shard_rows`
rows, found by one pass over the input. The plan depends only on the input files and `shard_rows`, so a rerun
finds the same shards, skips those whose part file exists, and gives every row the same id.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embserve.api.errors import InvalidRequest
from embserve.api.inputs import check_text
from embserve.bulk.options import FORMATS, BulkInputError

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
              ".txt": "text", ".text": "text"}
PLAN_FILE = "_embserve_plan.json"
TMP_DIR = "_tmp"
REJECTS_DIR = "_rejects"  # "_": readers of OUT (pyarrow, pandas, Ray Data, Spark) skip it, as they skip _tmp
_READ_BLOCK = 8 << 20  # bytes read at a time while counting lines

# Why a row was refused: its `reason` in the rejects file. `check_text`'s codes are the server's 400s.
REASON_OF_CODE = {"empty_input": "empty", "input_too_large": "too_many_chars", "invalid_text": "invalid_text"}


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or any URI pyarrow understands (file://, s3://, gs://, ...)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@dataclass(frozen=True)
class InputFile:
    path: str  # in its filesystem
    name: str  # what row ids start with: relative to the input directory, or the file's own name
    size: int
    format: str


def format_of(path: str, fmt: str | None) -> str | None:
    if fmt is not None:
        return fmt
    return EXTENSIONS.get(posixpath.splitext(path)[1].lower())


def list_inputs(inputs: Sequence[str], fmt: str | None = None) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Every input file, in name order: files as given, and the data files under directories (hidden and
    `_`-prefixed names skipped). All must share one filesystem and one format."""
    if fmt is not None and fmt not in FORMATS:
        raise BulkInputError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if not inputs:
        raise BulkInputError("no input given")
    found: list[InputFile] = []
    fs = None
    for uri in inputs:
        this_fs, root = open_fs(uri)
        if fs is not None and this_fs.type_name != fs.type_name:
            raise BulkInputError(f"inputs on two filesystems ({fs.type_name}, {this_fs.type_name}); run one job each")
        fs = this_fs
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise BulkInputError(f"input {uri!r} does not exist")
        if info.type == pafs.FileType.Directory:
            for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
                rel = posixpath.relpath(entry.path, root)
                hidden = any(part.startswith((".", "_")) for part in rel.split("/"))
                if entry.type == pafs.FileType.File and not hidden and format_of(entry.path, fmt):
                    found.append(InputFile(entry.path, rel, entry.size, format_of(entry.path, fmt) or ""))
        else:
            kind = format_of(info.path, fmt)
            if kind is None:
                raise BulkInputError(f"cannot tell the format of {uri!r} from its extension; pass a format "
                                     f"({', '.join(FORMATS)})")
            found.append(InputFile(info.path, posixpath.basename(info.path), info.size, kind))
    if not found:
        raise BulkInputError(f"no input files in {', '.join(inputs)}")
    formats = {f.format for f in found}
    if len(formats) > 1:
        raise BulkInputError(f"inputs of several formats ({', '.join(sorted(formats))}); run one job per format")
    names = [f.name for f in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BulkInputError(f"two inputs would give rows the same ids ({', '.join(twice)}); put them in one directory")
    assert fs is not None
    return fs, sorted(found, key=lambda f: f.name)


@dataclass(frozen=True)
class Shard:
    """`rows` rows of one file, from row `first_row` (0-based): bytes [start, stop) of a text or JSONL file,
    or row groups [start, stop) of a Parquet file."""

    index: int
    path: str
    name: str
    format: str
    first_row: int
    rows: int
    start: int
    stop: int

    @property
    def part(self) -> str:
        return f"part-{self.index:05d}.parquet"

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Shard":
        return cls(**{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items() if k in cls.__dataclass_fields__})


def line_spans(blocks: Any, shard_rows: int) -> list[tuple[int, int, int, int]]:
    """(first_row, rows, start_byte, stop_byte) of each run of `shard_rows` lines in a stream of byte blocks.
    A last line without a newline is a row; nothing after the last newline is not."""
    if shard_rows < 1:
        raise ValueError("shard_rows must be positive")
    spans: list[tuple[int, int, int, int]] = []
    first_row = rows = start = pos = 0
    last = b""
    for block in blocks:
        if not block:
            continue
        offset = 0
        while True:
            newlines = block.count(b"\n", offset)
            if rows + newlines < shard_rows:
                rows += newlines
                break
            at = offset - 1
            for _ in range(shard_rows - rows):
                at = block.index(b"\n", at + 1)
            spans.append((first_row, shard_rows, start, pos + at + 1))
            first_row, rows, start, offset = first_row + shard_rows, 0, pos + at + 1, at + 1
        pos += len(block)
        last = block[-1:]
    if pos > start:
        spans.append((first_row, rows + (last != b"\n"), start, pos))
    return spans


def group_spans(group_rows: Sequence[int], shard_rows: int) -> list[tuple[int, int, int, int]]:
    """(first_row, rows, first_group, stop_group) of each run of Parquet row groups holding about
    `shard_rows` rows; a row group larger than that is a shard of its own (a row group is read whole)."""
    spans: list[tuple[int, int, int, int]] = []
    first_row = rows = start = 0
    for g, n in enumerate(group_rows):
        rows += n
        if rows >= shard_rows:
            spans.append((first_row, rows, start, g + 1))
            first_row, rows, start = first_row + rows, 0, g + 1
    if start < len(group_rows) and rows:
        spans.append((first_row, rows, start, len(group_rows)))
    return spans


def _read_blocks(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        while block := f.read(_READ_BLOCK):
            yield block


def _file_spans(fs: pafs.FileSystem, f: InputFile, shard_rows: int, columns: Sequence[str]) -> list[tuple[int, int, int, int]]:
    if f.format != "parquet":
        return line_spans(_read_blocks(fs, f.path), shard_rows)
    with fs.open_input_file(f.path) as handle:
        meta = pq.ParquetFile(handle)
        missing = [c for c in columns if c not in meta.schema_arrow.names]
        if missing:
            raise BulkInputError(f"{f.name} has no column {missing[0]!r} (it has {', '.join(meta.schema_arrow.names)})")
        return group_spans([meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)], shard_rows)


def plan_shards(fs: pafs.FileSystem, files: Sequence[InputFile], shard_rows: int, columns: Sequence[str]) -> list[Shard]:
    """The shards of every file, numbered in file order. Files are scanned in parallel (I/O bound)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        spans = list(pool.map(lambda f: _file_spans(fs, f, shard_rows, columns), files))
    shards = []
    for f, file_spans in zip(files, spans):
        for first_row, rows, start, stop in file_spans:
            shards.append(Shard(len(shards), f.path, f.name, f.format, first_row, rows, start, stop))
    return shards


@dataclass
class ShardRows:
    """One shard's rows, in file order: each row's id and position, its text, and why it was refused."""

    ids: pa.Array  # the id column's values (its type), or the positions; null where a row has none
    positions: list[str]  # "<file name>:<line>" (from 1) or "<file name>:<row>" (Parquet, from 0)
    texts: list[str | None]  # None where refused
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (reason, message)

    def refuse(self, row: int, reason: str, message: str) -> None:
        self.refused[row] = (reason, message)
        self.texts[row] = None


def classify_text(value: Any, max_chars: int) -> tuple[str, str] | None:
    """Why the server would refuse this value as an input (reason, message), or None when it takes it."""
    if value is None:
        return "null", "no text (null or missing)"
    if not isinstance(value, str):
        return "not_text", f"the text is a {type(value).__name__}, not a string"
    try:
        check_text(value, 0, max_chars)
    except InvalidRequest as err:
        return REASON_OF_CODE.get(err.code or "", err.code or "invalid"), err.message.replace("input[0] ", "the text ")
    return None


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _parse_line(line: bytes, fmt: str, column: str, id_column: str | None,
                position: str) -> tuple[Any, str | None, tuple[str, str] | None]:
    """A text or JSONL line's text value, its id (a string), and why it cannot be read, if it cannot."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, None, ("invalid_utf8", f"the line is not valid UTF-8 ({err.reason} at byte {err.start})")
    if fmt == "text":
        return text, position, None
    if not text.strip():
        return None, None, ("empty", "an empty line")
    try:
        obj = json.loads(text)
    except ValueError as err:
        return None, None, ("invalid_json", f"the line is not JSON ({err})")
    if not isinstance(obj, dict):
        return None, None, ("invalid_json", "the line is not a JSON object")
    ident = obj.get(id_column) if id_column else position
    if isinstance(ident, bool) or not isinstance(ident, (str, int, type(None))):
        return None, None, ("invalid_id", f"the id is a {type(ident).__name__}, not a string or an integer")
    return obj.get(column), None if ident is None else str(ident), None


def read_shard(fs: pafs.FileSystem, shard: Shard, column: str, id_column: str | None, max_chars: int) -> ShardRows:
    """A shard's rows with their ids, each text checked as the server checks an input."""
    if shard.format == "parquet":
        with fs.open_input_file(shard.path) as handle:
            table = pq.ParquetFile(handle).read_row_groups(
                range(shard.start, shard.stop), columns=[column] + ([id_column] if id_column else []))
        values: list[Any] = table[column].to_pylist()
        positions = [f"{shard.name}:{shard.first_row + k}" for k in range(table.num_rows)]
        ids = table[id_column].combine_chunks() if id_column else pa.array(positions, pa.string())
        rows = ShardRows(ids, positions, [None] * len(values))
        unreadable: dict[int, tuple[str, str]] = {}
    else:
        with fs.open_input_file(shard.path) as handle:
            raw = _lines(handle.read_at(shard.stop - shard.start, shard.start))
        if len(raw) != shard.rows:
            raise BulkInputError(f"{shard.name} changed since it was planned: {len(raw)} rows where "
                                 f"{shard.rows} were (shard {shard.index})")
        positions = [f"{shard.name}:{shard.first_row + k + 1}" for k in range(len(raw))]
        parsed = [_parse_line(line, shard.format, column, id_column, at) for line, at in zip(raw, positions)]
        values = [value for value, _, _ in parsed]
        unreadable = {k: problem for k, (_, _, problem) in enumerate(parsed) if problem}
        rows = ShardRows(pa.array([i for _, i, _ in parsed], pa.string()), positions, [None] * len(values))
    for k, value in enumerate(values):
        if k in unreadable:
            rows.refuse(k, *unreadable[k])
        elif id_column and not rows.ids[k].is_valid:
            rows.refuse(k, "null_id", f"no {id_column!r} (null or missing)")
        elif (why := classify_text(value, max_chars)) is not None:
            rows.refuse(k, *why)
        else:
            rows.texts[k] = value
    return rows


def done_parts(fs: pafs.FileSystem, out: str) -> set[str]:
    """The part files in `out`. A part appears only once complete (written elsewhere, then moved there)."""
    info = fs.get_file_info(pafs.FileSelector(out, allow_not_found=True))
    return {posixpath.basename(i.path) for i in info if i.type == pafs.FileType.File
            and posixpath.basename(i.path).startswith("part-") and i.path.endswith(".parquet")}


def pending(shards: Sequence[Shard], done: set[str]) -> list[Shard]:
    return [s for s in shards if s.part not in done]


def tmp_path(out: str, name: str) -> str:
    """Where a file is written before it is moved to its name: never mistaken for a done part."""
    return posixpath.join(out, TMP_DIR, f"{name}.{uuid.uuid4().hex}")


def write_atomically(fs: pafs.FileSystem, table: pa.Table, final: str, out: str) -> None:
    tmp = tmp_path(out, posixpath.basename(final))
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, final)


def prepare_output(fs: pafs.FileSystem, out: str, plan_key: dict[str, Any]) -> list[Shard] | None:
    """Create `out`, drop what a killed run left half-written, and return the plan of an earlier run into the
    same `out` (None when there was none). An earlier run of another job there is refused."""
    fs.create_dir(out, recursive=True)
    fs.create_dir(posixpath.join(out, REJECTS_DIR), recursive=True)
    tmp = posixpath.join(out, TMP_DIR)
    if fs.get_file_info(tmp).type == pafs.FileType.Directory:
        fs.delete_dir_contents(tmp)
    fs.create_dir(tmp, recursive=True)
    plan_file = posixpath.join(out, PLAN_FILE)
    if fs.get_file_info(plan_file).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(plan_file) as f:
        saved = json.loads(f.read())
    if saved.get("key") != plan_key:
        changed = sorted(k for k in set(plan_key) | set(saved.get("key", {}))
                         if plan_key.get(k) != saved.get("key", {}).get(k))
        raise BulkInputError(f"{out} holds the output of another job (it differs in {', '.join(changed)}); "
                             "write to a new directory, or delete that one to start over")
    return [Shard(**s) for s in saved["shards"]]


def save_plan(fs: pafs.FileSystem, out: str, plan_key: dict[str, Any], shards: Sequence[Shard]) -> None:
    body = json.dumps({"key": plan_key, "shards": [s.to_row() for s in shards]}).encode()
    tmp = tmp_path(out, PLAN_FILE)
    with fs.open_output_stream(tmp) as f:
        f.write(body)
    fs.move(tmp, posixpath.join(out, PLAN_FILE))
