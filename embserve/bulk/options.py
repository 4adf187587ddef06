"""What `embserve embed` parses and refuses before it needs Ray Data or pyarrow, which come with the `bulk` extra
(`pip install 'embserve[bulk]'`): the console command imports this module, not embserve.bulk.job, so that `embserve
serve` and `stop` run without them (the server imports neither)."""

from __future__ import annotations

FORMATS = ("jsonl", "parquet", "text")
DEFAULT_SHARD_ROWS = 2_000
DEFAULT_CHUNK_ROWS = 2048  # texts tokenized and planned at once: the window that length grouping sorts
# The packages that the bulk extra adds, as their modules are named, and what to install when one is missing.
BULK_MODULES = ("pyarrow", "ray.data", "pandas")
BULK_INSTALL = "pip install 'embserve[bulk]' (in a checkout: .venv/bin/pip install -e '.[bulk]')"


class BulkInputError(ValueError):
    """The job cannot start as asked (no input, unknown format, missing column, another job's output)."""


def parse_actors(text: str) -> tuple[int, int]:
    """'4' -> (4, 4); '1-4' -> (1, 4): a fixed pool, or one that grows with the work (and the cluster)."""
    low, _, high = text.partition("-")
    lo, hi = int(low), int(high or low)
    if lo < 1 or hi < lo:
        raise ValueError(f"actors must be N or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def missing_bulk_extra(err: ModuleNotFoundError) -> str | None:
    """What to tell a user whose `embserve embed` failed to import a package of the bulk extra; None when
    the missing module is another one."""
    name = err.name or ""
    if not any(name == m or name.startswith(m + ".") for m in BULK_MODULES):
        return None
    return f"embserve embed needs Ray Data and pyarrow, which the bulk extra installs ({name} is missing): {BULK_INSTALL}"
