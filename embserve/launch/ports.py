"""Whether a TCP port is free to listen on, and when it is not, which process holds it (from /proc)."""

from __future__ import annotations

import errno
import os
import random
import socket
from collections.abc import Mapping
from pathlib import Path

from embserve.launch.procfs import Listener, command_line, listeners, socket_owners


def holder(port: int, proc: Path = Path("/proc"), uid: int | None = None) -> str:
    """Who listens on `port`, in words: 'pid N (command line)', or 'another user's process' where /proc does
    not show it to this user."""
    uid = os.getuid() if uid is None else uid
    found: list[Listener] = []
    for table in ("tcp", "tcp6"):
        try:
            found += listeners((proc / "net" / table).read_text(), port)
        except OSError:
            continue
    if not found:
        return "a process this system does not name"
    owners = socket_owners({listener.inode for listener in found}, proc)
    names = []
    for listener in found:
        pid = owners.get(listener.inode)
        if pid is not None:
            names.append(f"pid {pid} ({command_line(pid, proc) or 'command line unreadable'})")
        elif listener.uid != uid:
            names.append(f"another user's process (uid {listener.uid})")
        else:
            names.append("a process of this user that /proc does not show (another PID namespace?)")
    return "; ".join(dict.fromkeys(names))


def is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as servers bind, so that connections
    in TIME_WAIT do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return False
            raise  # EACCES (a port below 1024) or an address this machine lacks: not a question of who
    return True


# Ports a test or a bench can claim for a server it starts later: above Ray's default worker ports (10002-19999)
# and below both the kernel's ephemeral range and Serve's ingress ports (below), so that neither Ray's workers, nor
# the outgoing connections and port-0 listeners of the processes that start in between (a port-0 pick lies in
# that range), nor an ingress replica take them first.
CLAIMABLE_FROM = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Serve's direct ingress gives each ingress replica an HTTP port from here up, the lowest free one first
# (ray/serve/_private/constants.py): a port claimed there can be taken by a replica before its server binds it.
SERVE_INGRESS_PORTS = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
SERVE_INGRESS_PORTS_FROM = 30000


def claimable_below(environ: Mapping[str, str] = os.environ) -> int:
    """Where the ports a test or a bench claims end: the kernel's ephemeral range, or Serve's ingress ports."""
    try:
        serve_from = int(environ.get(SERVE_INGRESS_PORTS, SERVE_INGRESS_PORTS_FROM))
    except ValueError:
        serve_from = SERVE_INGRESS_PORTS_FROM
    return min(ephemeral_low(), serve_from)


def ephemeral_low(path: Path = EPHEMERAL_RANGE) -> int:
    """The lowest port the kernel hands out for port 0 and outgoing connections (Linux's default elsewhere)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None, tries: int = 200) -> int:
    """A port free now that the kernel does not hand out on its own (it may still be taken by someone who
    asks for it by number before it is used)."""
    rng = rng or random.Random()
    high = claimable_below()
    for _ in range(tries if high > CLAIMABLE_FROM else 0):
        port = rng.randrange(CLAIMABLE_FROM, high)
        if is_free(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the ephemeral range or Serve's
        s.bind((host, 0))
        return s.getsockname()[1]
