"""Keeps a CPU process's memory flat when every forward has a shape of its own."""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Callable, MutableMapping

# PyTorch's oneDNN binding (ideep) keeps a compiled primitive per op and input shape, 1024 of them by
# default. Length-grouped batches rarely repeat a shape, so the cache only grows; creating a primitive
# costs far less than a forward (the same tokens/s at 64 entries as at 1024, measured in-process).
ONEDNN_CACHE_ENTRIES = 64
# glibc keeps freed activations in its arenas, where blocks of ever new sizes fragment them: two forward
# threads over random shapes doubled their RSS in 45 s. malloc_trim hands whole free pages back. Measured
# in-process: every 5 s keeps RSS near its start for 2-3% of tokens/s, where
# a fixed mmap threshold did it for 17-30%.
TRIM_INTERVAL_S = 5.0
# OpenVINO's CPU plugin keeps the executors it builds for new input shapes in a cache per stream, 5,000 entries by
# default: two streams over ever-new shapes grew the live heap by 0.65-0.76 MiB a forward, not levelling off in 600
# forwards. 256 entries a stream level it off after a few hundred forwards (a served 10-minute soak: +1.8%, within the
# 2% bar), where 64 cost short texts about 4% of texts/s in-process and 1-4% served, in executors built again
# (docs/benchmarks.md, 2026-12-07).
OPENVINO_CACHE_ENTRIES = 256


def bound_primitive_cache(environ: MutableMapping[str, str] | None = None) -> bool:
    """Bound oneDNN's primitive cache unless the user set `LRU_CACHE_CAPACITY`. ideep reads the variable at
    the cache's first use, so calling this before the process's first forward is enough."""
    environ = os.environ if environ is None else environ
    if "LRU_CACHE_CAPACITY" in environ:
        return False
    environ["LRU_CACHE_CAPACITY"] = str(ONEDNN_CACHE_ENTRIES)
    return True


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc: its allocator is not the one that fragments this way
        return None


class HeapTrimmer:
    """Returns freed heap pages to the kernel at most every `interval_s`; `maybe_trim` is called after each
    forward, from any forward thread (two that trim at once only trim twice)."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S, trim: Callable[[int], int] | None | Any = "glibc",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.trim = _malloc_trim() if trim == "glibc" else trim
        self.interval_s = interval_s
        self.clock = clock
        self.last = clock()
        self.trims = 0

    def maybe_trim(self) -> bool:
        if self.trim is None or self.clock() - self.last < self.interval_s:
            return False
        self.last = self.clock()
        self.trim(0)
        self.trims += 1
        return True
