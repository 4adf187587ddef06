"""Reranking against its offline limit: 8 clients, each sending one query with 100 documents at a time to
POST /v1/rerank, beside the same cross-encoder in-process on the same pairs (tokenize, sort by pair length,
batch within the token budget; the best of the layouts tried), measured before and after the served run.

    python -m bench rerank                     # 32 requests (3,200 pairs), the MiniLM-L6-shaped cross-encoder built here
    python -m bench rerank --rounds 2 --model PATH/TO/ms-marco-MiniLM-L6-v2

Without --model the cross-encoder is the bundled MiniLM-L6 encoder under a one-label head of random weights:
the compute of a MiniLM-L6 cross-encoder (ms-marco-MiniLM-L6-v2 has this shape), with no download. Queries and
documents are the benchmark corpus's queries and passages (bench.corpus). Starts the service with `embserve
serve` (serve_config.yaml with the reranker as its one model), a fresh local Ray: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import tempfile
import time
from pathlib import Path

from bench.common import offline_env, stop_on_signals
from bench.corpus import load_or_build
from bench.service import Layout, embserve_serve

DOCUMENTS_PER_QUERY = 100
CLIENTS = 8
MAX_BATCH_TOKENS = 8192  # the CPU replica's default budget (embserve.settings)
MODEL = "bench-reranker"


def build_reranker(path: Path) -> str:
    """The bundled encoder under a random one-label classifier head, saved as a transformers folder."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from embserve.engine.model import resolve_source

    torch.manual_seed(0)
    source = resolve_source("bundled")
    BertForSequenceClassification.from_pretrained(source, num_labels=1).save_pretrained(str(path))
    AutoTokenizer.from_pretrained(source).save_pretrained(str(path))
    return str(path)


def requests_of(seed: int, n: int) -> list[tuple[str, list[str]]]:
    """`n` (query, 100 passages) requests from the benchmark corpus."""
    corpus = load_or_build(None, seed)
    rng = random.Random(seed)
    return [(rng.choice(corpus.queries), rng.sample(corpus.passages, DOCUMENTS_PER_QUERY)) for _ in range(n)]


def offline_limit(source: str, dtype: str, requests: list[tuple[str, list[str]]]) -> dict:
    """Pairs/s of the cross-encoder in-process on these pairs: tokenized, sorted by length and batched within
    the token budget, at each batch size and layout tried (one single-thread forward, or one per core taking
    batches from one list); the best, as bench.offline measures the embedding model's limit."""
    import torch

    from embserve.api.contracts import RerankJob
    from embserve.engine.rerank import CrossEncoderModel
    from embserve.settings import ModelSpec

    model = CrossEncoderModel(ModelSpec(name="offline", source=source, task="rerank"), device="cpu", dtype=dtype)
    pairs = model.request_tokenizer()
    jobs = [RerankJob(q, docs, truncate=True) for q, docs in requests]
    tried = []
    for streams in (1, min(2, os.cpu_count() or 1)):
        for batch_size in (32, 64):
            torch.set_num_threads(1)
            model.forward(pairs.prepare(jobs[:1])[0][:4])  # warm the kernels
            t0 = time.perf_counter()
            ids = [seq for seqs in pairs.prepare(jobs) for seq in seqs]
            ids.sort(key=len)
            groups, start = [], 0
            while start < len(ids):
                end = start + 1
                while end < len(ids) and end - start < batch_size and (end - start + 1) * len(ids[end]) <= MAX_BATCH_TOKENS:
                    end += 1
                groups.append(ids[start:end])
                start = end
            with concurrent.futures.ThreadPoolExecutor(streams, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                list(pool.map(model.forward, groups))
            seconds = time.perf_counter() - t0
            tried.append({"pairs_per_s": round(len(ids) / seconds, 1), "batch_size": batch_size, "streams": streams,
                          "padding_efficiency": round(sum(map(len, ids)) / sum(len(g) * len(g[-1]) for g in groups), 4)})
    best = max(tried, key=lambda r: r["pairs_per_s"])
    return {**best, "dtype": model.info.dtype, "pairs": sum(len(d) for _, d in requests), "tried": tried}


def served(base_url: str, requests: list[tuple[str, list[str]]], rounds: int) -> dict:
    """`CLIENTS` clients, each sending its next request as soon as its last is answered, `rounds` requests each
    (after one warm-up request): pairs/s from the first send to the last answer. Every client keeps 100 pairs
    pending until its last answer, so the replica's forwards stay fed to the end."""
    import httpx

    def one(http: httpx.Client, query: str, documents: list[str]) -> float:
        sent = time.perf_counter()
        response = http.post("/v1/rerank", json={"model": MODEL, "query": query, "documents": documents,
                                                 "truncate": True})
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        return time.perf_counter() - sent

    def client(k: int) -> list[float]:
        with httpx.Client(base_url=base_url, timeout=300) as http:
            return [one(http, *requests[(k * rounds + i) % len(requests)]) for i in range(rounds)]

    with httpx.Client(base_url=base_url, timeout=300) as http:
        one(http, *requests[0])  # the first forwards of each shape, and the connection
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        latencies = sorted(s for client_s in pool.map(client, range(CLIENTS)) for s in client_s)
    seconds = time.perf_counter() - t0
    pairs = CLIENTS * rounds * DOCUMENTS_PER_QUERY
    return {"pairs_per_s": round(pairs / seconds, 1), "requests": CLIENTS * rounds, "seconds": round(seconds, 1),
            "request_ms_p50": round(1000 * latencies[len(latencies) // 2], 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a cross-encoder folder; default: the MiniLM-L6-shaped one built here")
    parser.add_argument("--dtype", default="auto", help="the server's and the offline limit's (default auto)")
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends (default 4: 3,200 pairs)")
    parser.add_argument("--requests", type=int, default=32, help="distinct requests the clients cycle through")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")


def run(args: argparse.Namespace) -> None:
    offline_env()
    stop_on_signals()
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model or build_reranker(Path(tmp) / "reranker")
        requests = requests_of(args.seed, args.requests)
        offline_pairs = requests[:4]  # 400 pairs of the same kind: well under a minute per measurement
        before = offline_limit(source, args.dtype, offline_pairs)
        print(f"offline limit before: {before['pairs_per_s']} pairs/s ({before['dtype']}, batch "
              f"{before['batch_size']}, {before['streams']} stream(s))", flush=True)
        layout = Layout(settings={"models": [{"name": MODEL, "source": source, "task": "rerank"}], "dtype": args.dtype})
        with embserve_serve(layout, args.port) as base_url:
            result = served(base_url.removesuffix("/v1"), requests, args.rounds)
        after = offline_limit(source, args.dtype, offline_pairs)
    limit = (before["pairs_per_s"] + after["pairs_per_s"]) / 2
    report = {"served": result, "offline_before": before, "offline_after": after,
              "ratio": round(result["pairs_per_s"] / limit, 3),
              "ratio_range": [round(result["pairs_per_s"] / max(before["pairs_per_s"], after["pairs_per_s"]), 3),
                              round(result["pairs_per_s"] / min(before["pairs_per_s"], after["pairs_per_s"]), 3)]}
    print(f"served: {result['pairs_per_s']} pairs/s ({result['requests']} requests of {DOCUMENTS_PER_QUERY} "
          f"documents, {CLIENTS} clients, {result['seconds']} s, request p50 {result['request_ms_p50']} ms)")
    print(f"offline limit after: {after['pairs_per_s']} pairs/s")
    print(f"served / offline limit: {report['ratio']} (range {report['ratio_range'][0]}-{report['ratio_range'][1]})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("rerank", argv)


if __name__ == "__main__":
    raise SystemExit(main())
