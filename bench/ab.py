"""Same-run A/B of checkouts and settings, in interleaved rounds, on Serve's fast path as `./run.sh serve`
starts it: 32 single-text clients of the mixed corpus and one client of short queries, with per-process
CPU. What a change did, measured against the commit before it on the same box in the same minutes.

    python -m bench.ab --rounds 3 --checkout HEAD~1 --variant "shipped defaults" \\
        --variant 'float32, 1 thread={"dtype": "float32", "torch_threads": 1}'

Each checkout other than this one is put in a git worktree under build/ab/ and run with its own code
(PYTHONPATH), the rest of the environment shared, except the load generator: every arm gets this checkout's
bench/load.py and bench/http_client.py, so that the arms differ in the server only. Rounds repeat every (checkout, variant) pair, so that
a burst of someone else's load hits one round, not one arm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the checkout under test: its own bench.experiments measures one variant.
_ONE = """
import json, sys
from bench.experiments import HAPROXY_THROUGHPUT, Variant, run_round
from bench.corpus import load_or_build
from bench.load import Workload
from bench.run import FULL
from bench import procs
name, settings, seconds, port = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
corpus = load_or_build(None, 0)
# The loaded texts come from the checkout that runs bench.ab (argv[5]), so that every arm gets the same ones.
loaded = json.loads(open(sys.argv[5]).read())
workloads = {"mixed": Workload("mixed", loaded), "queries": Workload("queries", corpus.queries)}
mode = FULL.__class__(**{**FULL.__dict__, "duration_s": seconds})
bench_args = {"mode": mode, "progress": False, "gate": procs.QuietGate(30)}
out = run_round((Variant(name, env=dict(HAPROXY_THROUGHPUT), settings=settings),), bench_args, workloads, port)
print("AB-RESULT " + json.dumps(out[name], default=str))
"""


# The load generator every arm is driven by: this checkout's, copied into the others' worktrees, so that an
# older arm is not measured through an older client's CPU (httpx cost 3-6 ms per request on 2 cores).
LOAD_GENERATOR = ("bench/load.py", "bench/http_client.py")


def checkout_dir(rev: str) -> Path:
    if rev == "here":
        return ROOT
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = ROOT / "build" / "ab" / sha
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    give_load_generator(path)
    return path


def give_load_generator(worktree: Path, root: Path = ROOT) -> None:
    """`root`'s load generator into `worktree`, over whatever that checkout had (or lacked)."""
    for name in LOAD_GENERATOR:
        shutil.copyfile(root / name, worktree / name)


def measure(where: Path, name: str, settings: dict[str, Any], seconds: float, port: int,
            texts: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(where), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _ONE, name, json.dumps(settings), str(seconds), str(port),
                           str(texts)],
                          cwd=where, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in done.stdout.splitlines() if x.startswith("AB-RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{where} {name}: no result\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(line.removeprefix("AB-RESULT "))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def cores(run: dict[str, Any], role: str) -> float:
        return ((run["c32"].get("cpu") or {}).get("by_role") or {}).get(role, 0.0)

    tps = [r["c32"]["texts_per_s"] for r in runs]
    return {
        "texts_per_s": tps,
        "texts_per_s_median": statistics.median(tps),
        "single_query_p50_ms": [r["single_query"]["latency_ms"].get("p50") for r in runs],
        "replica_cores": [round(cores(r, "replica"), 3) for r in runs],
        "replica_cpu_ms_per_text": [round(cores(r, "replica") * 1000 / r["c32"]["texts_per_s"], 2) for r in runs],
        "ingress_cores": [round(cores(r, "ingress"), 3) for r in runs],
        # Every process's CPU per served text, by role: what a request costs around its forward.
        "cpu_ms_per_text_by_role": [{role: round(c * 1000 / r["c32"]["texts_per_s"], 2) for role, c in
                                     ((r["c32"].get("cpu") or {}).get("by_role") or {}).items()} for r in runs],
        "other_load": [round((r["c32"].get("cpu") or {}).get("foreign", 0.0), 3) for r in runs],
        "idle_cores": [(r["c32"].get("cpu") or {}).get("idle") for r in runs],
        # Each forward worker's share of the window running / runnable without a CPU / asleep.
        "forward_threads": [(r["c32"].get("cpu") or {}).get("forward_threads") for r in runs],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--checkout", action="append", default=[], help="a git revision to compare (this "
                        "working tree always runs, as 'here')")
    parser.add_argument("--variant", action="append", default=[], help='NAME or NAME={settings as JSON}')
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "ab.json")
    parser.add_argument("--workload", choices=("mixed", "short"), default="mixed",
                        help="what the 32 clients send: the corpus's queries and passages, or queries of 10-20 "
                        "tokens and ~50-token passage heads")
    args = parser.parse_args(argv)
    from bench.corpus import load_or_build

    corpus = load_or_build(None, 0)
    texts = ROOT / "build" / f"ab-{args.workload}.json"
    texts.parent.mkdir(parents=True, exist_ok=True)
    texts.write_text(json.dumps(corpus.short(2000, 0) if args.workload == "short" else corpus.mixed(2000, 0)))
    variants = []
    for spec in args.variant or ["shipped defaults"]:
        name, _, settings = spec.partition("=")
        variants.append((name, json.loads(settings) if settings else {}))
    arms = [(rev, name, settings) for rev in ["here", *args.checkout] for name, settings in variants]
    where = {rev: checkout_dir(rev) for rev in ["here", *args.checkout]}
    results: dict[str, list[dict[str, Any]]] = {f"{rev}: {name}": [] for rev, name, _ in arms}
    for k in range(args.rounds):
        for rev, name, settings in arms if k % 2 == 0 else arms[::-1]:
            run = measure(where[rev], name, settings, args.seconds, args.port, texts)
            results[f"{rev}: {name}"].append(run)
            print(f"round {k + 1} {rev}: {name}: {run['c32']['texts_per_s']:.1f} texts/s, lone query p50 "
                  f"{run['single_query']['latency_ms'].get('p50')} ms", flush=True)
    report = {arm: summary(runs) for arm, runs in results.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"arms": report, "rounds": results}, indent=1, default=str))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
