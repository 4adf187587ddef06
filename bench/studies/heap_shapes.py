"""A CPU model's RSS under forwards of ever new shapes, in-process: what cpu_memory's bounds are for.

    python -m bench heap-shapes --seconds 45                        # as shipped: heap trims + 64 cache entries
    python -m bench heap-shapes --seconds 45 --no-bounds            # glibc's and oneDNN's own defaults
    python -m bench heap-shapes --seconds 45 --no-bounds --mmap-threshold 131072
    python -m bench heap-shapes --runtime openvino --seconds 180                     # 64 executor-cache entries
    python -m bench heap-shapes --runtime openvino --seconds 180 --openvino-cache-entries openvino  # its 5,000

Two forward threads (one torch thread each, or two OpenVINO streams, as a CPU replica runs them) embed random
groups of 1-32 inputs of 4-256 tokens for `--seconds`; RSS and glibc's live heap (mallinfo2: bytes handed out and
not freed, so a cache that grows shows apart from fragmentation) are sampled every 5 s. Prints forwards/s, tokens/s,
the samples (MiB) and the growth of each from the second third of the run to the last. Run it alone on the machine
(tokens/s) and in a fresh process per variant (the bounds are process-wide).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import random
import threading
import time

import torch

import embserve.engine.model as model_module
from embserve.engine import openvino_runtime
from embserve.engine.cpu_memory import ONEDNN_CACHE_ENTRIES, OPENVINO_CACHE_ENTRIES
from embserve.settings import ModelSpec


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def live_heap_mib() -> float | None:
    """Bytes glibc's malloc has handed out and not had back (all arenas, mmapped blocks too); None off glibc."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def third_growth(samples: list[float]) -> float | None:
    """Growth of the last third's mean over the second third's, as a fraction: past warm-up, a flat run is ~0."""
    third = len(samples) // 3
    if third == 0:
        return None
    middle, last = samples[third:2 * third], samples[len(samples) - third:]
    return (sum(last) / len(last)) / (sum(middle) / len(middle)) - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--runtime", default="torch", choices=("torch", "openvino", "auto"))
    parser.add_argument("--no-bounds", action="store_true", help="no heap trims, oneDNN's default cache")
    parser.add_argument("--cache-entries", type=int, default=None, help="LRU_CACHE_CAPACITY to set")
    parser.add_argument("--mmap-threshold", type=int, default=None, help="a fixed glibc mmap threshold (bytes)")
    parser.add_argument("--openvino-cache-entries", default=None,
                        help="the CPU plugin's per-shape executor cache per stream: a count, or 'openvino' for its "
                             f"own default (shipped: {OPENVINO_CACHE_ENTRIES})")


def run(args: argparse.Namespace) -> None:
    import os

    if args.no_bounds:
        model_module.bound_primitive_cache = lambda: False
    if args.cache_entries is not None:
        os.environ["LRU_CACHE_CAPACITY"] = str(args.cache_entries)
    if args.mmap_threshold is not None:
        ctypes.CDLL(None).mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD
    ov_entries = OPENVINO_CACHE_ENTRIES
    if args.openvino_cache_entries is not None:
        ov_entries = None if args.openvino_cache_entries == "openvino" else int(args.openvino_cache_entries)
        openvino_runtime.compile_properties = functools.partial(openvino_runtime.compile_properties,
                                                                cache_entries=ov_entries)
    torch.set_num_threads(1)
    model = model_module.EmbeddingModel(ModelSpec(name="m"), device="cpu", dtype=args.dtype, threads=2,
                                        runtime=args.runtime, streams=2)
    torch.set_num_threads(1)
    if args.no_bounds and model.heap is not None:
        model.heap.trim = None
    tokens, forwards = [0, 0], [0, 0]
    stop = time.monotonic() + args.seconds

    def work(worker: int) -> None:
        torch.set_num_threads(1)
        rng = random.Random(worker)
        while time.monotonic() < stop:
            n, length = rng.randint(1, 32), rng.randint(4, 256)
            model.forward([[101] + [2000 + rng.randint(0, 5000) for _ in range(length - 2)] + [102]
                           for _ in range(n)])
            tokens[worker] += n * length
            forwards[worker] += 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    samples, live = [], []
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        samples.append(round(rss_mib()))
        heap = live_heap_mib()
        if heap is not None:
            live.append(round(heap))
    bounds = "none" if args.no_bounds else f"heap trims every {model.heap.interval_s:g} s, {os.environ.get('LRU_CACHE_CAPACITY', ONEDNN_CACHE_ENTRIES)} cache entries"
    if model.runtime == "openvino":
        bounds += f"; OpenVINO executor cache: {ov_entries if ov_entries is not None else 'its default'} a stream"
    print(f"{model.runtime} ({model.runtime_reason})")
    print(f"{sum(forwards) / args.seconds:.2f} forwards/s, {sum(tokens) / args.seconds:.0f} tokens/s; bounds: {bounds}; "
          f"mmap threshold: {args.mmap_threshold or 'glibc dynamic'}")
    print("RSS MiB every 5 s:", samples)
    print("live heap MiB every 5 s:", live)
    for name, series in (("RSS", samples), ("live heap", live)):
        growth = third_growth(series)
        if growth is not None:
            print(f"{name}: {growth:+.1%} from the second third of the run to the last")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("heap-shapes", argv)


if __name__ == "__main__":
    raise SystemExit(main())
