"""float32 against the two ways to run bf16 on a CPU (autocast over float32 weights, bf16 weights), in
process, on the offline limit's sorted batching: texts/s per round, and each variant's min cosine to float32.

Rounds go over the variants in turn, so that a burst of other load spoils one variant's pass, not all.
    python -m bench cpu-dtypes --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from bench.offline import OfflineModel

VARIANTS = ("float32", "bf16-autocast", "bf16-weights")


def as_variant(offline: OfflineModel, variant: str) -> None:
    """Switch the loaded model to a variant in place. Casting to bf16 weights rounds them for good, so each
    round reloads the float32 model first."""
    model = offline.model
    model.autocast = variant == "bf16-autocast"
    model.model.to(torch.bfloat16 if variant == "bf16-weights" else torch.float32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=512, help="mixed texts per pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each forward")
    parser.add_argument("--streams", type=int, default=2, help="forwards at once (a replica's forward_workers)")


def run(args: argparse.Namespace) -> None:
    from bench.corpus import load_or_build

    texts = load_or_build(None, 0).mixed(args.n, 0)
    offline = OfflineModel(dtype="float32")
    ids = offline.ids(texts)
    vectors: dict[str, np.ndarray] = {}
    speeds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        # bf16 weights last in each round: their float32 copy is rebuilt from the float32 checkpoint.
        for variant in VARIANTS:
            if variant == "float32":
                offline = OfflineModel(dtype="float32")  # fresh float32 weights (bf16-weights rounded them)
            as_variant(offline, variant)
            r = offline.sorted_batches(texts, args.batch_size, args.threads, streams=args.streams)
            speeds[variant].append(r.texts_per_s)
            if variant not in vectors:
                chunks = [ids[i : i + 16] for i in range(0, len(ids), 16)]
                vectors[variant] = np.concatenate([offline.model.forward(c) for c in chunks])
    for variant in VARIANTS:
        s = speeds[variant]
        cos = np.sum(vectors[variant] * vectors["float32"], axis=1)
        print(json.dumps({"variant": variant, "texts_per_s": [round(x, 1) for x in s],
                          "median": round(statistics.median(s), 1), "spread": round(max(s) - min(s), 1),
                          "min_cosine_to_float32": round(float(cos.min()), 6),
                          "max_abs_diff_to_float32": float(np.abs(vectors[variant] - vectors["float32"]).max())}))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("cpu-dtypes", argv)


if __name__ == "__main__":
    raise SystemExit(main())
