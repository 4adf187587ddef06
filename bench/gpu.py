"""The GPU half of issue 5: a MiniLM-architecture model (the bundled config, random weights) at fp16 on
a card, measured without Ray: a batch sweep of raw forwards, the offline limit on the benchmark's mixed
texts, and a concurrency sweep through embserve's own scheduler, as a replica runs it
(HTTP and Ray left out), each as a ratio to that limit. The scheduler gets what a GPU replica's start gets
from its warm-up (embserve.engine.hardware.start_replica): the cost line fitted through two timed forwards,
a forward's fixed cost as the planner's group cost, the length tolerance a preference, and the token budget
bounded by max_forward_ms; so the pipelined worker takes its groups just in time and the planner the group
that costs least per input, as on a served card (`--no-cost-line`: none of it, the take before the line).

A GPU machine without network access may have torch and transformers but not Ray, and cannot download.
This script needs only embserve/, bench/ and a folder made here beforehand:

    python -m bench.gpu --export .gpu            # here: config, tokenizer, corpus and wheels into .gpu/
    # there (carry .gpu):
    python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl   # any scratch folder
    PYTHONPATH="$SITE":. python3 -m bench.gpu --model .gpu/model --corpus .gpu/corpus.json --out "$OUT"

On a machine without a GPU, `--device cpu --dtype float32 --quick` runs the same code as a smoke test (the
warm-up is timed there too, though a CPU replica times nothing, so that the same path runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# pydantic and its settings, which embserve.settings needs, are not on the device machines: the versions
# installed here are exported.
WHEELS = ("pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "annotated-types", "typing-inspection")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def export(folder: Path) -> None:
    """Everything the device needs that it cannot fetch: the bundled model's config and tokenizer (not its
    weights), the benchmark corpus, and the wheels of embserve's pure-Python dependencies."""
    from bench.corpus import load_or_build
    from embserve.engine.model import resolve_source

    source = Path(resolve_source("bundled"))
    (folder / "model").mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / "model" / name)
    if (source / "1_Pooling").is_dir():
        shutil.copytree(source / "1_Pooling", folder / "model" / "1_Pooling", dirs_exist_ok=True)
    load_or_build(folder / "corpus.json")
    from importlib.metadata import version

    wheels = folder / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(wheels), *(f"{name}=={version(name)}" for name in WHEELS)],
                   check=True)
    print(f"wrote {folder}: carry it to the device and run with --model {folder}/model")


def random_weights(config_dir: Path, dtype: str) -> Path:
    """A folder that loads like the bundled model: its config and tokenizer, freshly initialised weights
    (speed does not depend on the values)."""
    import torch
    from transformers import AutoConfig, AutoModel

    out = Path(tempfile.mkdtemp(prefix="minilm-random-"))
    for item in config_dir.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(config_dir))
    model.to(getattr(torch, dtype) if dtype != "auto" else torch.float32).save_pretrained(out)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def batch_sweep(model: Any, device: str, sizes: tuple[int, ...], lengths: tuple[int, ...],
                repeats: int) -> list[dict[str, Any]]:
    """Raw forwards of `size` inputs of `length` tokens: where a forward's fixed cost stops mattering."""
    rows = []
    for length in lengths:
        for size in sizes:
            sequences = [[101] + [2023] * (length - 2) + [102]] * size
            model.forward(sequences)
            _sync(device)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.forward(sequences)
                _sync(device)
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append({"length": length, "batch": size, "ms": round(best * 1000, 3),
                         "texts_per_s": round(size / best, 1), "tokens_per_s": round(size * length / best)})
            print(f"  batch {size:4d} x {length:3d} tokens: {best * 1000:8.2f} ms, {size / best:10.0f} texts/s",
                  flush=True)
    return rows


def offline_limit(model: Any, tokenizer: Any, texts: list[str], batch_sizes: tuple[int, ...],
                  device: str, budget: int) -> dict[str, Any]:
    """Tokenize all, sort by length, forward in batches: the best batch size is the limit."""
    ids = [tokenizer.finish(c, i, True) for i, c in enumerate(tokenizer.content_ids(texts))]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    tried = []
    for size in batch_sizes:
        model.forward([ids[i] for i in order[:size]])
        _sync(device)
        t0 = time.perf_counter()
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < size and (end - start + 1) * len(ids[order[end]]) <= budget:
                end += 1
            model.forward([ids[i] for i in order[start:end]])
            start = end
        _sync(device)
        seconds = time.perf_counter() - t0
        tried.append({"batch": size, "texts_per_s": round(len(ids) / seconds, 1),
                      "tokens_per_s": round(sum(map(len, ids)) / seconds)})
        print(f"  offline, batch {size}: {len(ids) / seconds:.0f} texts/s", flush=True)
    return {"best": max(tried, key=lambda r: r["texts_per_s"]), "tried": tried}


async def engine_point(scheduler: Any, seen: list[Any], texts: list[str], clients: int,
                       seconds: float) -> dict[str, Any]:
    """`clients` closed-loop callers of one text each, through the replica's scheduler as a replica on a
    GPU drives it (one forward worker; each request admitted as it comes and answered when its own inputs
    are done)."""
    from embserve.api.contracts import EmbedJob
    from embserve.metrics.events import Forward

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    first_forward = len(seen)  # what the scheduler reported so far

    async def client(k: int) -> None:
        n = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            future = loop.create_future()
            scheduler.admit([EmbedJob(texts=[texts[n % len(texts)]], truncate=True)],
                            [lambda r, f=future: loop.call_soon_threadsafe(f.set_result, r)])
            result = await future
            assert result.error is None, result.error
            latencies.append(time.perf_counter() - t0)
            n += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    forwards = [f for f in seen[first_forward:] if isinstance(f, Forward)]
    ms = sorted(x * 1000 for x in latencies)
    return {"clients": clients, "texts_per_s": round(len(ms) / elapsed, 1),
            "p50_ms": round(ms[len(ms) // 2], 2), "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
            "inputs_per_forward": round(statistics.fmean(f.inputs for f in forwards), 1) if forwards else 0.0}


def replica_timing(model: Any, budget: int, batch_size: int, settings: Any = None) -> tuple[Any, dict[str, Any]]:
    """What a GPU replica's start makes of its warm-up (embserve.engine.hardware.start_replica): the warm-up
    shapes run and timed, the cost line fitted, then `forward_timing` (the budget bounded by max_forward_ms,
    the group cost, the tolerance, the line). Returns its ForwardTiming and the profile entries it set."""
    from embserve.engine.hardware import Choice, Profile, forward_timing
    from embserve.engine.warmup import warm_up, warm_up_shapes
    from embserve.settings import GPU_MAX_FORWARD_MS, Settings

    settings = settings if settings is not None else Settings(_env_file=None)
    warmed = warm_up(model, warm_up_shapes(budget, batch_size, model.max_length, model.device), timed=True)
    profile = Profile()
    limit_ms = settings.max_forward_ms if settings.max_forward_ms is not None else GPU_MAX_FORWARD_MS
    timing = forward_timing(settings, profile, Choice(budget, "bench: the card's limits"), warmed.cost, limit_ms,
                            model.max_length, gpu=True)
    return timing, {name: choice.value for name, choice in profile.choices.items()}


def markdown(report: dict[str, Any]) -> str:
    limit = report["offline"]["best"]["texts_per_s"]
    lines = [f"## GPU: {report['device_name']} ({report['dtype']}, MiniLM-L6 config, random weights)", "",
             f"torch {report['torch']}, token budget {report['budget']} per forward. Offline limit: "
             f"{limit:.0f} texts/s (sorted batches of {report['offline']['best']['batch']}). Scheduler: "
             + (f"the warm-up's cost line, {report['timing']['forward_cost']}, group cost "
                f"{report['timing']['group_cost_tokens']} tokens" if "forward_cost" in (report.get("timing") or {})
                else "no cost line")
             + ".", "",
             "| clients | texts/s | × offline | p50 ms | p99 ms | inputs per forward |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report["engine"]:
        lines.append(f"| {p['clients']} | {p['texts_per_s']:.0f} | "
                     f"{p['texts_per_s'] / limit:.2f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['inputs_per_forward']:.1f} |")
    lines += ["", "| tokens | batch | ms per forward | texts/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['length']} | {r['batch']} | {r['ms']:.2f} | {r['texts_per_s']:.0f} |" for r in report["batch_sweep"]]
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.corpus import load_or_build
    from embserve.engine.hardware import gpu_limits
    from embserve.engine.model import EmbeddingModel
    from embserve.engine.scheduler import Scheduler, forward_layout
    from embserve.settings import CPU_MAX_BATCH_SIZE, CPU_MAX_BATCH_TOKENS, BatchingConfig, ModelSpec

    folder = random_weights(Path(args.model), args.dtype)
    model = EmbeddingModel(ModelSpec(name="minilm-random", source=str(folder)), device=args.device, dtype=args.dtype)
    # The budget and forward size a replica would choose on this card (embserve.engine.gpu_memory), as production
    # runs it.
    limits = gpu_limits(model, 0.8, 1) if model.device == "cuda" else None
    budget = limits.max_batch_tokens if limits else CPU_MAX_BATCH_TOKENS
    batch_size = limits.max_batch_size if limits else CPU_MAX_BATCH_SIZE
    timing, profile = (None, {}) if args.no_cost_line else replica_timing(model, budget, batch_size)
    if timing is not None:
        budget = timing.budget
        print(f"warm-up: {profile}", flush=True)
    seen: list[Any] = []
    cfg = BatchingConfig(max_batch_tokens=budget, max_batch_size=batch_size)
    scheduler = Scheduler(model, forward_layout(model.device, torch.get_num_threads()), config=lambda: cfg,
                          max_batch_tokens=budget, report=seen.append,
                          **({} if timing is None else {"group_cost_tokens": timing.group_cost_tokens,
                                                        "tolerance_wall": timing.tolerance_wall,
                                                        "forward_cost": timing.cost}))
    corpus = load_or_build(Path(args.corpus) if args.corpus else None)
    texts = corpus.mixed(args.texts)
    quick = args.quick
    report: dict[str, Any] = {
        "device": model.device, "dtype": model.info.dtype, "torch": torch.__version__, "budget": budget,
        "timing": profile or None, "pipelined": scheduler.pipelined,
        "device_name": torch.cuda.get_device_name() if model.device == "cuda" else "CPU"}
    print("batch sweep ...", flush=True)
    report["batch_sweep"] = batch_sweep(model, model.device, (1, 8, 64) if quick else (1, 4, 16, 64, 256, 1024),
                                        (16, 128) if quick else (16, 128, 256), 2 if quick else 10)
    print("offline limit ...", flush=True)
    report["offline"] = offline_limit(model, scheduler.tokenizer, texts, (8, 32) if quick else (32, 128, 512, 2048),
                                      model.device, budget)
    print("scheduler, closed loop ...", flush=True)
    report["engine"] = []
    for clients in (1, 8) if quick else (1, 16, 64, 256, 1024):
        point = asyncio.run(engine_point(scheduler, seen, texts, clients, args.seconds))
        print(f"  {clients} clients: {point['texts_per_s']:.0f} texts/s, p50 {point['p50_ms']:.1f} ms", flush=True)
        report["engine"].append(point)
    scheduler.close()
    shutil.rmtree(folder, ignore_errors=True)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", type=Path, help="write what the device needs into this folder, and stop")
    parser.add_argument("--model", help="a folder with the bundled model's config and tokenizer (--export's model/)")
    parser.add_argument("--corpus", help="bench/corpus.py's JSON (--export's corpus.json)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--texts", type=int, default=4096, help="mixed texts for the offline limit and the clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrency point")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few sizes, few points")
    parser.add_argument("--no-cost-line", action="store_true",
                        help="give the scheduler no warm-up cost line: the take before it, for comparison")
    parser.add_argument("--out", type=Path, default=Path("build/bench-gpu"))


def run(args: argparse.Namespace) -> None:
    if args.export:
        export(args.export)
        return
    if not args.model:
        raise SystemExit("bench gpu: --model is needed (or --export)")
    report = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu.md").write_text(markdown(report))
    print(markdown(report))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("gpu", argv)


if __name__ == "__main__":
    raise SystemExit(main())
