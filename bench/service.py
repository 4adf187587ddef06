"""The service as a user starts it: `embserve serve CONFIG` in a child process, on a copy of a serve config
with the bench's port and settings, and stopped as a user's Ctrl-C stops it.

Settings a configuration changes go into the config's first application's `args`, where a user would put
them (docs/settings.md); Serve's fast path comes from `embserve serve` itself (embserve/launch/serve_env.py).
The Ray it starts is a fresh local one (RAY_ADDRESS=local), a child of the bench, so bench.procs finds its
processes as the bench's descendants.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.common import ROOT

DEFAULT_CONFIG = ROOT / "serve_config.yaml"
# Ports of the fast path besides HTTP, each moved to a free one so that a server already on this box with
# Ray's defaults does not make `embserve serve` refuse to start.
AUX_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
# Serve's plain setup (its Python proxy, plain handles): a variable set before `embserve serve` wins.
PLAIN_SERVE = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
READY_TIMEOUT_S = 300.0  # Ray's start, the model's load and warm-up, on 2 busy cores
STOP_TIMEOUT_S = 120.0
START_ATTEMPTS = 2


@dataclass(frozen=True)
class Layout:
    """What one served configuration is: a serve config file and settings over its application's args."""

    config: Path = DEFAULT_CONFIG
    settings: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # environment before Ray starts (Serve's flags)


def bench_config(base: Mapping[str, Any], port: int, settings: Mapping[str, Any]) -> dict[str, Any]:
    """`base` (a parsed serve config) listening on 127.0.0.1:`port`, with `settings` over its first
    application's args."""
    config = copy.deepcopy(dict(base))
    http = config.setdefault("http_options", {}) or {}
    config["http_options"] = {**http, "host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"] = {**(app.get("args") or {}), **settings}
    return config


def cli_module(checkout: Path) -> str:
    """The module of the `embserve` console command in `checkout` (it moved into embserve/launch/)."""
    for module in ("embserve.launch.cli", "embserve.cli"):
        if (checkout / (module.replace(".", "/") + ".py")).is_file():
            return module
    raise RuntimeError(f"{checkout} has no `embserve serve` (embserve/launch/cli.py): too old to start this way")


def serve_command(checkout: Path, config: Path, python: str = sys.executable) -> list[str]:
    """`embserve serve CONFIG`, with `checkout`'s own code (the console command is its cli module's main)."""
    return [python, "-m", cli_module(checkout), "serve", str(config)]


def serve_env(checkout: Path, extra: Mapping[str, str], free_port: Any) -> dict[str, str]:
    """This environment, with `checkout` first on the path, a fresh local Ray, no downloads, free auxiliary
    ports, and `extra` over all of it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p)
    env.update(RAY_ADDRESS="local", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    for name in AUX_PORTS:
        env[name] = str(free_port())
    env.update(extra)
    return env


def wait_ready(process: subprocess.Popen, base: str, log: Path, timeout_s: float = READY_TIMEOUT_S,
               name: str = "embserve serve") -> None:
    """Returns once GET /health answers 200 (embserve: every embedder answers its health check; a peer such
    as Infinity: it is up), or raises with the tail of the server's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready:\n{tail(log)}")
        try:
            if httpx.get(f"{base}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s:\n{tail(log)}")
        time.sleep(1.0)  # a separate server's only readiness signal is its health route


def stop(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, as `embserve stop` sends it: Serve shuts down and every process of the run goes."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def embserve_serve(layout: Layout, port: int, checkout: Path = ROOT, log: Path | None = None,
                   attempts: int = START_ATTEMPTS, ready_timeout_s: float = READY_TIMEOUT_S) -> Iterator[str]:
    """`embserve serve` of `layout` from `checkout` until the block ends; yields the base URL (".../v1").

    A start that exits before it is ready is tried again, up to `attempts` in all, on fresh auxiliary ports: a
    port chosen free can be taken by someone else before HAProxy binds it, and one lost arm would cost a whole
    A/B run. One that is still not ready after `ready_timeout_s` is stopped, not tried again. The log keeps
    every try."""
    from embserve.launch.ports import free_port

    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    base = yaml.safe_load(Path(layout.config).read_text()) or {}
    work = ROOT / "build" / "bench-serve"
    work.mkdir(parents=True, exist_ok=True)
    config = work / f"serve_config-{port}.yaml"
    config.write_text(yaml.safe_dump(bench_config(base, port, layout.settings), sort_keys=False))
    log = log or work / f"embserve-{port}.log"
    log.write_bytes(b"")
    for attempt in range(1, attempts + 1):
        with open(log, "ab") as out:
            # cwd: `serve run` imports the config's import_path (deployments.app) from the checkout.
            process = subprocess.Popen(serve_command(checkout, config), cwd=checkout, stdout=out,
                                       stderr=subprocess.STDOUT, env=serve_env(checkout, layout.env, free_port))
        try:
            wait_ready(process, f"http://127.0.0.1:{port}", log, ready_timeout_s)
            break
        except BaseException as failed:
            exited = isinstance(failed, RuntimeError) and process.poll() is not None  # not a timeout, not Ctrl-C
            stop(process)
            if attempt == attempts or not exited:
                raise
            print(f"bench: start {attempt} of {attempts} exited before it was ready, trying again (log: {log})",
                  file=sys.stderr, flush=True)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)
