"""The report of one bench.run: headline against the targets, tables, plots (matplotlib, Agg) and raw JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.page import with_kept_sections

FULL_ENGINE = "full engine"
# Other layouts bench.run has measured beside the full engine (results.json of older runs hold the second).
ALTERNATES = {
    "one forward on all threads": "one forward at a time on all of the replica's threads (`forward_workers: 1`)",
    "one replica per core": "a single-thread embedder replica per CPU of the private Ray",
}
BATCHING_OFF = "batching off"
HEADLINE_C = 32
TARGET_RATIO = 0.8
TARGET_PADDING = 0.95
LATENCY_SLACK_MS = 10.0


def _at(points: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((p for p in points if p.get("concurrency") == concurrency), None)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The four figures the issue asks for, with their targets."""
    limit = results["offline"]["mixed"]["texts_per_s"]
    token_limit = results["offline"]["mixed"]["tokens_per_s"]
    configs = results["configs"]
    full = _at(configs[FULL_ENGINE]["points"], HEADLINE_C) or configs[FULL_ENGINE]["points"][-1]
    off = _at(configs[BATCHING_OFF]["points"], HEADLINE_C) or configs[BATCHING_OFF]["points"][-1]
    per_request = next((p for p in results.get("sweep", []) if p.get("max_batch_size") == 1), None)
    floor = results["offline"]["single_forward_floor_ms"]
    lone = configs[FULL_ENGINE]["single_query"]["latency_ms"].get("p50")
    padding = full["perf"].get("padding_efficiency")
    one_thread = max((r for r in results["offline"]["mixed_tried"] if r["threads"] == 1 and r.get("streams", 1) == 1),
                     key=lambda r: r["texts_per_s"], default=None)
    alternates = []
    for name in ALTERNATES:
        point = _at(configs[name]["points"], HEADLINE_C) if name in configs else None
        if point:
            alternates.append({"name": name, "texts_per_s": point["texts_per_s"],
                               "ratio": point["texts_per_s"] / limit})
    by_dtype = {d: full["texts_per_s"] / r["texts_per_s"]
                for d, r in results["offline"].get("mixed_by_dtype", {}).items() if r["texts_per_s"]}
    short = configs[FULL_ENGINE].get("short")
    short_limit = results["offline"].get("short", {}).get("texts_per_s")
    return {
        "short_texts_per_s": short["texts_per_s"] if short else None,
        "short_offline_texts_per_s": short_limit,
        "short_ratio": short["texts_per_s"] / short_limit if short and short_limit else None,
        "alternates": alternates,
        "ratio_by_dtype": by_dtype, "served_dtype": results["offline"].get("served_dtype"),
        "concurrency": full["concurrency"],
        "served_texts_per_s": full["texts_per_s"], "offline_texts_per_s": limit,
        "ratio": full["texts_per_s"] / limit, "token_ratio": full["tokens_per_s"] / token_limit,
        "ratio_1thread": full["texts_per_s"] / one_thread["texts_per_s"] if one_thread else None,
        "ratio_engine": (full["texts_per_s"] / results["offline"]["engine_runs"]["texts_per_s"]
                         if "engine_runs" in results["offline"] else None),
        "engine_run_inputs": results["offline"].get("engine_runs", {}).get("batch_size"),
        "padding_efficiency": padding,
        "single_p50_ms": lone, "floor_ms": floor, "latency_budget_ms": floor + LATENCY_SLACK_MS,
        "gain_vs_off": full["texts_per_s"] / off["texts_per_s"] if off["texts_per_s"] else None,
        "gain_vs_per_request": (full["texts_per_s"] / per_request["texts_per_s"]
                                if per_request and per_request["texts_per_s"] else None),
    }


def setup(results: dict[str, Any]) -> str:
    """How the configurations were served: `embserve serve` (newer runs) or a driver's deploys (older runs'
    results.json, which name Serve's environment)."""
    service = results.get("service")
    if service:
        front = ("Serve's fast path (HAProxy, gRPC between deployments)"
                 if service.get("fast_path") else "Serve's plain setup (its Python proxy)")
        tuned = f"; `{service['tuned']}` is the tuned layout" if service.get("tuned") else ""
        return (f"Each configuration is served as a user starts it: `embserve serve` of `{service['config']}` with "
                f"the configuration's settings in the application's args, in a fresh local Ray, on {front}{tuned}")
    env = results.get("serve_env") or {}
    front = ("Serve's fast path (" + ", ".join(f"`{k}={v}`" for k, v in env.items() if v) + ")"
             if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve's plain setup (its Python proxy)")
    return (f"A private Ray (`ray.init(num_cpus=2)`) with {front}; each configuration is "
            "`build_app(Settings(...))` deployed as the app `bench`")


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _yes(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def _points_table(points: list[dict[str, Any]], limit: float, token_limit: float, floor: float) -> list[str]:
    rows = ["| clients | texts/s | × offline | tokens/s | × offline | p50 ms | p95 ms | p99 ms | p50 / floor "
            "| padding eff. | inputs / forward | inputs / batch | errors | other load (cores) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lat, perf, cpu = p["latency_ms"], p.get("perf") or {}, p.get("cpu") or {}
        rows.append(
            f"| {p['concurrency']} | {p['texts_per_s']:.1f} | {p['texts_per_s'] / limit:.2f} | "
            f"{p['tokens_per_s']:.0f} | {p['tokens_per_s'] / token_limit:.2f} | {_fmt(lat.get('p50'))} | "
            f"{_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} | "
            f"{_fmt(lat.get('p50') / floor if lat.get('p50') else None, '.1f')}× | "
            f"{_fmt(perf.get('padding_efficiency'), '.3f')} | {_fmt(perf.get('inputs_per_forward'), '.1f')} | "
            f"{_fmt(perf.get('inputs_per_batch'), '.1f')} | {sum(p['errors'].values())} | "
            f"{_fmt(cpu.get('foreign'), '.2f')} |")
    return rows


def _cpu_table(results: dict[str, Any]) -> list[str]:
    """Cores each process of the pipeline used at the headline point, per config."""
    roles = ("load generator", "proxy", "ingress", "replica", "metrics actor", "controller", "raylet", "gcs",
             "other ray")
    rows = ["| config | " + " | ".join(roles) + " | all ours | other load | texts/s | CPU ms / text |",
            "|---|" + "---:|" * (len(roles) + 4)]
    for name, cfg in results["configs"].items():
        p = _at(cfg["points"], HEADLINE_C)
        if not p or not p.get("cpu"):
            continue
        cpu = p["cpu"]
        per_text = cpu["ours"] * 1000 / p["texts_per_s"] if p["texts_per_s"] else None
        rows.append(f"| {name} | " + " | ".join(_fmt(cpu["by_role"].get(r, 0.0), ".2f") for r in roles)
                    + f" | {cpu['ours']:.2f} | {cpu['foreign']:.2f} | {p['texts_per_s']:.1f} | {_fmt(per_text)} |")
    return rows


def cpu_per_request_table(points: dict[str, dict[str, Any]]) -> list[str]:
    """CPU milliseconds each process spent per served text (one text per request), by process: what a request
    costs around its forward, and how much of the replica's share is the forward itself."""
    roles = ("load generator", "proxy", "ingress", "replica", "metrics actor", "controller", "raylet", "gcs",
             "other ray")
    rows = ["| point | texts/s | " + " | ".join(roles) + " | all but the replica | all ours |",
            "|---|" + "---:|" * (len(roles) + 3)]
    for name, p in points.items():
        cpu = p.get("cpu")
        if not cpu or not p["texts_per_s"]:
            continue
        ms = {r: cpu["by_role"].get(r, 0.0) * 1000 / p["texts_per_s"] for r in roles}
        outside = cpu["ours"] * 1000 / p["texts_per_s"] - ms["replica"]
        rows.append(f"| {name} | {p['texts_per_s']:.1f} | " + " | ".join(f"{ms[r]:.2f}" for r in roles)
                    + f" | {outside:.2f} | {cpu['ours'] * 1000 / p['texts_per_s']:.2f} |")
    return rows


def _profile_section(profile: dict[str, Any]) -> list[str]:
    lines = [f"py-spy sampled the replica, the ingress and the proxy (`py-spy record --nonblocking --rate 50`) "
             f"for {profile['seconds']:.0f} s while {HEADLINE_C} clients loaded the full engine "
             f"({profile['point']['texts_per_s']:.1f} texts/s under the profiler). Each sample is charged to "
             "the innermost frame that belongs to a stage (bench/procs.py `STAGES`); shares are of the "
             "process's non-idle samples. Raw stacks: `" + profile["raw_dir"] + "/` (not committed).", ""]
    stages: list[str] = []
    for prof in profile["profiles"]:
        for stage in prof["by_stage"]:
            if stage not in stages:
                stages.append(stage)
    lines.append("| process | samples | " + " | ".join(stages) + " |")
    lines.append("|---|---:|" + "---:|" * len(stages))
    for prof in profile["profiles"]:
        n = prof["samples"] or 1
        lines.append(f"| {prof['role']} | {prof['samples']} | "
                     + " | ".join(f"{100 * prof['by_stage'].get(s, 0) / n:.0f}%" for s in stages) + " |")
    for prof in profile["profiles"]:
        n = prof["samples"] or 1
        lines += ["", f"Hottest leaf frames, {prof['role']}:", ""]
        lines += [f"- {100 * count / n:.1f}% `{frame}`" for frame, count in prof["top_leaves"][:8]]
    return lines


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (the bench extra), imported when a plot is drawn, so that the
    bench's --help and the tables need no plotting library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    limit = results["offline"]["mixed"]["texts_per_s"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, cfg in results["configs"].items():
        pts = cfg["points"]
        ax.plot([p["concurrency"] for p in pts], [p["texts_per_s"] for p in pts], marker="o", label=name)
    ax.axhline(limit, color="black", lw=1, label="offline limit")
    ax.axhline(TARGET_RATIO * limit, color="black", lw=1, ls="--", label=f"{TARGET_RATIO}× offline (target)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (one text per request)")
    ax.set_ylabel("texts/s")
    ax.set_ylim(bottom=0)
    right = ax.secondary_yaxis("right", functions=(lambda y: y / limit, lambda r: r * limit))
    right.set_ylabel("× offline limit")
    ax.set_title("Served throughput vs concurrency (queries + passages)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    floor = results["offline"]["single_forward_floor_ms"]
    configs = results["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3.8), sharey=True)
    for ax, (name, cfg) in zip(axes, configs.items()):
        pts = cfg["points"]
        xs = [p["concurrency"] for p in pts]
        for q, style in (("p50", "-o"), ("p95", "--s"), ("p99", ":^")):
            ax.plot(xs, [p["latency_ms"].get(q) for p in pts], style, label=q)
        ax.axhline(floor, color="black", lw=1, label="one forward (offline)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Request latency percentiles (one text per request)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_padding(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, cfg in results["configs"].items():
        pts = cfg["points"]
        xs = [p["concurrency"] for p in pts]
        ax1.plot(xs, [(p.get("perf") or {}).get("padding_efficiency") for p in pts], marker="o", label=name)
        ax2.plot(xs, [(p.get("perf") or {}).get("inputs_per_forward") for p in pts], marker="o", label=name)
    ax1.axhline(TARGET_PADDING, color="black", lw=1, ls="--", label=f"target {TARGET_PADDING}")
    ax1.set_ylabel("padding efficiency (real / padded tokens)")
    ax1.set_ylim(0, 1.02)
    ax2.set_ylabel("inputs per forward")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle("Padding efficiency and batch fill per configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    sweep = results["sweep"]
    limit = results["offline"]["mixed"]["texts_per_s"]
    xs = [p["max_batch_size"] for p in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(xs, [p["texts_per_s"] for p in sweep], marker="o", label="served")
    ax1.axhline(limit, color="black", lw=1, label="offline limit")
    ax1.set_ylabel("texts/s")
    ax1.set_ylim(bottom=0)
    for q, style in (("p50", "-o"), ("p99", ":^")):
        ax2.plot(xs, [p["latency_ms"].get(q) for p in sweep], style, label=q)
    ax2.set_ylabel("latency (ms)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_batch_size (full engine, 32 clients)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("max_batch_size sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_packing(results: dict[str, Any], path: Path) -> bool:
    """Throughput with 32 texts in flight, by texts per request (1 = the 32-client single-text point)."""
    plt = pyplot()
    limit = results["offline"]["mixed"]["texts_per_s"]
    full = _at(results["configs"][FULL_ENGINE]["points"], HEADLINE_C)
    packed = [p for p in results.get("extras", []) if p.get("per_request")]
    if not packed or not full:
        return False
    xs = [1] + [p["per_request"] for p in packed]
    ys = [full["texts_per_s"]] + [p["texts_per_s"] for p in packed]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(xs, ys, marker="o", label="served (full engine)")
    ax.axhline(limit, color="black", lw=1, label="offline limit")
    if "engine_runs" in results["offline"]:
        ax.axhline(results["offline"]["engine_runs"]["texts_per_s"], color="gray", lw=1, ls=":",
                   label="Engine in-process, runs of 16")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("texts per request (32 texts in flight: 32 / n clients)")
    ax.set_ylabel("texts/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Per-request cost: same load, fewer requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Writes `out/benchmarks.md`, `out/bench/*.png` and `out/bench/results.json`; returns the .md path."""
    img = out / "bench"
    img.mkdir(parents=True, exist_ok=True)
    (img / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot_throughput(results, img / "throughput.png")
    plot_latency(results, img / "latency.png")
    plot_padding(results, img / "padding.png")
    if results.get("sweep"):
        plot_sweep(results, img / "batch_size_sweep.png")
    packing = plot_packing(results, img / "packing.png")

    m, off = results["machine"], results["offline"]
    limit, token_limit = off["mixed"]["texts_per_s"], off["mixed"]["tokens_per_s"]
    floor = off["single_forward_floor_ms"]
    h = headline(results)
    quick = results["mode"] == "quick"
    L: list[str] = ["# Benchmarks", ""]
    L += [f"Generated by `python -m bench run{' --quick' if quick else ''}` on {m['date']} "
          f"({results['mode']} mode, {results['elapsed_s']:.0f} s; commit {m['commit']}"
          f"{', with uncommitted changes under embserve/ or deployments/' if m['uncommitted_server_changes'] else ''}). "
          "Edit bench/, not this file: the next run rewrites this part, down to the line that says so; the "
          "dated sections below that line come from the other benches' runs and are kept.", ""]
    L += ["**Machine.** " + f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, no GPU; {m['os']}; "
          f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, transformers {m['transformers']}. "
          f"Load average at the start: {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.", ""]
    L += [f"**Setup.** {setup(results)} (one ingress and one embedding "
          "replica unless a configuration's settings say otherwise; the bundled all-MiniLM-L6-v2 on CPU). The load generator (bench/load.py: asyncio, "
          "its own small HTTP/1.1 client (bench/http_client.py), `encoding_format=base64`) runs on the same box, so it **shares "
          "the 2 cores with the proxy, the ingress and the replica**. "
          + (f"The replica runs torch on {results['settings']['torch_threads']} thread(s) (`torch_threads`, as the "
             "offline limit may; without it Ray gives a replica one, its num_cpus), as one single-thread forward "
             "per thread (`forward_workers`, automatic on a CPU) unless a configuration sets `forward_workers`. "
             if results['settings'].get('torch_threads') else
             f"The replica runs the shipped default: its runtime (`runtime: auto`: OpenVINO on a CPU where it is "
             f"installed, torch otherwise) on every core it can run on ({m['cores']} here; `torch_threads` auto, "
             "past Ray's one thread per reserved CPU), as one single-thread forward (an OpenVINO stream) per "
             "thread (`forward_workers` auto on a CPU) unless a configuration sets `forward_workers`. ")
          + "Closed loop: each client sends its next "
          f"request when the last one answers; {results['settings']['warmup_s']:g} s warm-up, then "
          f"{results['settings']['duration_s']:g} s measured per point (requests completing inside the window). "
          "Padding efficiency and batch sizes come from `GET /v1/performance`, reset at the start of each "
          "window. *Other load* is CPU that processes outside this benchmark used during the window "
          "(other developers' tests on the same box): points with much of it are slower than they should be; "
          f"the run waited {results.get('waited_for_quiet_s', 0):.0f} s in all for such load to pass.", ""]
    c = results["corpus"]
    L += ["**Texts** (bench/corpus.py, seed 0, from the standard library's docstrings): "
          f"{c['queries']['count']} queries (3–15 words, mean {c['queries']['tokens_mean']} tokens), "
          f"{c['passages']['count']} passages (30–180 words, mean {c['passages']['tokens_mean']} tokens), "
          f"{c['documents']['count']} long documents ({c['documents']['tokens_min']}–"
          f"{c['documents']['tokens_max']} tokens, past the model's 256). The served mix is half queries, half "
          "passages, one text per request.", ""]

    L += ["## Headline", "",
          "| figure | measured | target | met |", "|---|---:|---:|:-:|",
          f"| served throughput, {h['concurrency']} clients, full engine ÷ offline limit | {h['ratio']:.2f}× "
          f"({h['served_texts_per_s']:.1f} ÷ {h['offline_texts_per_s']:.1f} texts/s; tokens {h['token_ratio']:.2f}×; "
          f"{_fmt(h['ratio_1thread'], '.2f')}× the 1-thread offline limit; {_fmt(h['ratio_engine'], '.2f')}× "
          f"embserve's Engine in-process on runs of {h['engine_run_inputs']}) "
          f"| ≥ {TARGET_RATIO}× | {_yes(h['ratio'] >= TARGET_RATIO)} |",
          *[f"| the same, {a['name']} ({ALTERNATES[a['name']]}) | {a['ratio']:.2f}× "
            f"({a['texts_per_s']:.1f} ÷ {h['offline_texts_per_s']:.1f} texts/s) "
            f"| ≥ {TARGET_RATIO}× | {_yes(a['ratio'] >= TARGET_RATIO)} |" for a in h["alternates"]],
          f"| padding efficiency, full engine, {h['concurrency']} clients | {_fmt(h['padding_efficiency'], '.3f')} "
          f"| ≥ {TARGET_PADDING} | {_yes(None if h['padding_efficiency'] is None else h['padding_efficiency'] >= TARGET_PADDING)} |",
          f"| one client, short queries: p50 | {_fmt(h['single_p50_ms'])} ms (one forward: {floor:.1f} ms) "
          f"| ≤ {h['latency_budget_ms']:.1f} ms | {_yes(None if h['single_p50_ms'] is None else h['single_p50_ms'] <= h['latency_budget_ms'])} |",
          *([f"| the same (replicas in {h['served_dtype']}) ÷ the offline limit in each dtype | "
             + ", ".join(f"{r:.2f}× {d}" for d, r in h["ratio_by_dtype"].items()) + " | – | – |"]
            if h["ratio_by_dtype"] else []),
          *([f"| short texts (queries of 10–20 tokens, ~50-token passage heads), {h['concurrency']} clients ÷ "
             f"the offline limit on them | {h['short_ratio']:.2f}× ({h['short_texts_per_s']:.1f} ÷ "
             f"{h['short_offline_texts_per_s']:.1f} texts/s) | – | – |"] if h.get("short_ratio") else []),
          f"| batching gain at {h['concurrency']} clients: full engine ÷ batching off | {_fmt(h['gain_vs_off'], '.2f')}× | > 1× "
          f"| {_yes(None if h['gain_vs_off'] is None else h['gain_vs_off'] > 1)} |",
          f"| batching gain: full engine ÷ one input per batch (max_batch_size=1) | {_fmt(h['gain_vs_per_request'], '.2f')}× "
          f"| > 1× | {_yes(None if h['gain_vs_per_request'] is None else h['gain_vs_per_request'] > 1)} |", ""]
    L += ["*Batching off* is `enable_dynamic_batching=False`: no batching across requests, each request runs "
          "on its own. `max_batch_size=1` also splits a multi-text request into one input per run.", ""]

    L += ["## Offline limit", "",
          f"The same mixed texts embedded in-process by embserve's own EmbeddingModel and Tokenizer: tokenize all, "
          f"sort by length, forward in batches, one at a time or as several single-thread forwards at once, "
          "taking the batches in turn, as a replica's `forward_workers` do (the fastest of the tried batch sizes "
          f"and layouts is the limit; each pair is measured {results['settings'].get('offline_rounds', 1)} time(s), "
          "interleaved, and its best pass counts, since other load only ever slows a pass down). One forward of one short query (tokenize + forward, median over 40 queries) is the "
          f"floor under a lone client's latency.", "",
          ] + ([f"Other processes used {off['other_load']:.2f} cores on average while it was measured.", ""]
               if off.get("other_load") is not None else []) + (
          ["The limit is measured in float32 and in bf16 autocast, rounds interleaved: "
           + ", ".join(f"{d} {r['texts_per_s']:.1f} texts/s" for d, r in off["mixed_by_dtype"].items())
           + f". The replicas ran `dtype: auto`, here {off['served_dtype']} ({off['served_dtype_reason']}); "
           "the table and every ratio are to that dtype's limit.", ""]
          if off.get("mixed_by_dtype") else []) + [
          "| texts | batch size | forwards at once | torch threads each | texts/s | tokens/s | padding eff. |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in off["mixed_tried"]:
        mark = " **(limit)**" if r == off["mixed"] else ""
        L.append(f"| {r['texts']} | {r['batch_size']} | {r.get('streams', 1)} | {r['threads']} | {r['texts_per_s']:.1f}{mark} | "
                 f"{r['tokens_per_s']:.0f} | {r['padding_efficiency']:.3f} |")
    L.append("")
    for t, v in off["single_forward"].items():
        L.append(f"- one short query ({v['tokens_mean']} tokens on average), {t} torch thread(s): p50 {v['p50']:.1f} ms, "
                 f"p95 {v['p95']:.1f} ms, min {v['min']:.1f} ms")
    if "engine_runs" in off:
        e = off["engine_runs"]
        L.append(f"- embserve's Engine.run in-process on runs of {e['batch_size']} one-text jobs, "
                 f"{e.get('streams', 1)} forward worker(s) of {e['threads']} thread(s), as many runs in flight "
                 f"(the replica's layout and what it gets at 32 clients, with no serving around it): "
                 f"{e['texts_per_s']:.1f} "
                 f"texts/s, {e['tokens_per_s']:.0f} tokens/s, padding efficiency {e['padding_efficiency']:.3f} "
                 f"({e['texts_per_s'] / limit:.2f}× the limit)")
    if "single_forward_cold" in off:
        c = off["single_forward_cold"]
        L.append(f"- one short query, 1 thread, 30 ms idle before each forward (as a lone client's forwards are): "
                 f"p50 {c['p50']:.1f} ms")
    if "documents" in off:
        d = off["documents"]
        L.append(f"- long documents cut to 256 tokens: {d['texts_per_s']:.1f} texts/s, {d['tokens_per_s']:.0f} tokens/s")
    L.append("")

    L += ["## Served: concurrency sweep per configuration", "",
          f"Ratios are to the offline limit above ({limit:.1f} texts/s, {token_limit:.0f} tokens/s); *floor* is one "
          f"offline forward of a short query ({floor:.1f} ms).", "",
          "![throughput](bench/throughput.png)", "", "![latency](bench/latency.png)", "",
          "![padding](bench/padding.png)", ""]
    for name, cfg in results["configs"].items():
        settings = ", ".join(f"{k}={v}" for k, v in cfg["settings"].items()) or (
            f"its own config, {Path(cfg['config']).name}" if cfg.get("config") else "defaults (serve_config.yaml's values)")
        L += [f"### {name} ({settings})", ""]
        L += _points_table(cfg["points"], limit, token_limit, floor)
        q = cfg["single_query"]
        L += ["", f"One client, short queries only: p50 {_fmt(q['latency_ms'].get('p50'))} ms, p95 "
              f"{_fmt(q['latency_ms'].get('p95'))} ms, p99 {_fmt(q['latency_ms'].get('p99'))} ms "
              f"({_fmt(q['latency_ms'].get('p50') / floor if q['latency_ms'].get('p50') else None)}× the floor; "
              f"server-side: ingress {_fmt(q['server_ms'].get('ingress_ms'))} ms, forward "
              f"{_fmt(q['server_ms'].get('forward_ms'))} ms, queue {_fmt(q['server_ms'].get('queue_ms'))} ms on average).", ""]

    if results.get("sweep"):
        L += ["## max_batch_size sweep (full engine, 32 clients)", "", "![sweep](bench/batch_size_sweep.png)", "",
              "| max_batch_size | texts/s | × offline | p50 ms | p99 ms | padding eff. | inputs / forward | inputs / batch | other load |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in results["sweep"]:
            perf, lat = p.get("perf") or {}, p["latency_ms"]
            L.append(f"| {p['max_batch_size']} | {p['texts_per_s']:.1f} | {p['texts_per_s'] / limit:.2f} | "
                     f"{_fmt(lat.get('p50'))} | {_fmt(lat.get('p99'))} | {_fmt(perf.get('padding_efficiency'), '.3f')} | "
                     f"{_fmt(perf.get('inputs_per_forward'))} | {_fmt(perf.get('inputs_per_batch'))} | "
                     f"{_fmt((p.get('cpu') or {}).get('foreign'), '.2f')} |")
        L.append("")

    if results.get("extras"):
        L += ["## Other workloads (full engine)", "",
              "| workload | load | texts/s | × offline | p50 ms | p95 ms | p99 ms | padding eff. | errors |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p in results["extras"]:
            ref = p.get("offline_texts_per_s") or limit
            load = f"{p['concurrency']} clients" if p["mode"] == "closed" else f"{p['rate']:.1f} req/s offered"
            lat, perf = p["latency_ms"], p.get("perf") or {}
            L.append(f"| {p['label']} | {load} | {p['texts_per_s']:.1f} | {p['texts_per_s'] / ref:.2f} | "
                     f"{_fmt(lat.get('p50'))} | {_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} | "
                     f"{_fmt(perf.get('padding_efficiency'), '.3f')} | {sum(p['errors'].values())} |")
        L += ["", "Long documents are compared with the offline limit for the same documents cut to 256 tokens. "
              "The *n texts per request* rows keep 32 texts in flight, like the 32-client single-text point, "
              "but in 32/n requests: the difference is what each request costs the pipeline.", ""]
        if packing:
            L += ["![packing](bench/packing.png)", ""]

    L += ["## Where the CPU goes at 32 clients", "",
          "Cores used by each process of this benchmark during the 32-client window (from /proc; 2.00 = both "
          "cores busy for the whole window):", ""]
    L += _cpu_table(results)
    full = results["configs"][FULL_ENGINE]
    per_request = {f"{FULL_ENGINE}, mixed, {HEADLINE_C} clients": _at(full["points"], HEADLINE_C) or {},
                   **({f"{FULL_ENGINE}, short texts, {HEADLINE_C} clients": full["short"]} if full.get("short") else {})}
    L += ["", "### CPU per request by process", "",
          "CPU milliseconds per served text (one text per request) of each process, from /proc over the window. "
          "*All but the replica* is what a request costs around its forward: HTTP, the proxy, the handle call, "
          "metrics, Ray's own processes and the load generator.", ""] + cpu_per_request_table(per_request)
    L.append("")
    if results.get("profile"):
        L += _profile_section(results["profile"])
        L.append("")
    L += ["Analysis and proposed changes: [lab/profile.md](lab/profile.md) (a dated lab log).", "",
          "## Reproduce", "", "```bash", ". .venv/bin/activate",
          "python -m bench --help          # every benchmark (the suite) and study",
          "python -m bench run --quick     # ~4 min smoke run, writes build/bench-quick/",
          "python -m bench run             # full run (~30 min), rewrites this part of docs/benchmarks.md and docs/bench/",
          "python -m bench run --tuned my_config.yaml   # also a tuned layout, reported beside the defaults",
          "python -m bench load --base-url http://127.0.0.1:8000/v1 --concurrency 1 4 16 32 64   # any running server",
          "python -m bench offline         # the offline limit alone",
          "python -m bench report          # re-render this part from docs/bench/results.json",
          "python -m bench ab              # the shipped defaults against another commit, same run (below)",
          "python -m bench bulk            # embserve embed against the offline limit (below)",
          "python -m bench experiments     # a study: Serve flags, torch threads, engine knobs vs defaults (~20 min)",
          "```", ""]
    path = out / "benchmarks.md"
    path.write_text(with_kept_sections("\n".join(L), path.read_text() if path.exists() else None))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, nargs="?", default=Path("docs/bench/results.json"))
    parser.add_argument("--out", type=Path, default=None, help="default: the folder above results.json's")


def run(args: argparse.Namespace) -> None:
    results = json.loads(args.results.read_text())
    print(write_report(results, args.out or args.results.resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("report", argv)


if __name__ == "__main__":
    raise SystemExit(main())
