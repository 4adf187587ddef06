"""A CPU model's RSS under forwards of ever new shapes, in-process: what cpu_memory's bounds are for.

    python -m bench heap-shapes --seconds 45                        # as shipped: heap trims + 64 cache entries
    python -m bench heap-shapes --seconds 45 --no-bounds            # glibc's and oneDNN's own defaults
    python -m bench heap-shapes --seconds 45 --no-bounds --mmap-threshold 131072

Two forward threads (one torch thread each, as a CPU replica runs them) embed random groups of 1-32 inputs
of 4-256 tokens for `--seconds`; RSS is sampled every 5 s. Prints tokens/s and the RSS samples (MiB).
Run it alone on the machine (tokens/s) and in a fresh process per variant (the bounds are process-wide).
"""

from __future__ import annotations

import argparse
import ctypes
import random
import threading
import time

import torch

import embserve.engine.model as model_module
from embserve.engine.cpu_memory import ONEDNN_CACHE_ENTRIES
from embserve.settings import ModelSpec


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--runtime", default="torch", choices=("torch", "openvino", "auto"))
    parser.add_argument("--no-bounds", action="store_true", help="no heap trims, oneDNN's default cache")
    parser.add_argument("--cache-entries", type=int, default=None, help="LRU_CACHE_CAPACITY to set")
    parser.add_argument("--mmap-threshold", type=int, default=None, help="a fixed glibc mmap threshold (bytes)")


def run(args: argparse.Namespace) -> None:
    import os

    if args.no_bounds:
        model_module.bound_primitive_cache = lambda: False
    if args.cache_entries is not None:
        os.environ["LRU_CACHE_CAPACITY"] = str(args.cache_entries)
    if args.mmap_threshold is not None:
        ctypes.CDLL(None).mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD
    torch.set_num_threads(1)
    model = model_module.EmbeddingModel(ModelSpec(name="m"), device="cpu", dtype=args.dtype, threads=2,
                                        runtime=args.runtime, streams=2)
    torch.set_num_threads(1)
    if args.no_bounds and model.heap is not None:
        model.heap.trim = None
    tokens = [0, 0]
    stop = time.monotonic() + args.seconds

    def work(worker: int) -> None:
        torch.set_num_threads(1)
        rng = random.Random(worker)
        while time.monotonic() < stop:
            n, length = rng.randint(1, 32), rng.randint(4, 256)
            model.forward([[101] + [2000 + rng.randint(0, 5000) for _ in range(length - 2)] + [102]
                           for _ in range(n)])
            tokens[worker] += n * length

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    samples = []
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        samples.append(round(rss_mib()))
    bounds = "none" if args.no_bounds else f"heap trims every {model.heap.interval_s:g} s, {os.environ.get('LRU_CACHE_CAPACITY', ONEDNN_CACHE_ENTRIES)} cache entries"
    print(f"{model.runtime} ({model.runtime_reason})")
    print(f"{sum(tokens) / args.seconds:.0f} tokens/s; bounds: {bounds}; mmap threshold: {args.mmap_threshold or 'glibc dynamic'}")
    print("RSS MiB every 5 s:", samples)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("heap-shapes", argv)


if __name__ == "__main__":
    raise SystemExit(main())
