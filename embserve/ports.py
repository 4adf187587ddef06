"""Whether a TCP port is free to listen on, and when it is not, which process holds it (from /proc)."""

from __future__ import annotations

import errno
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp for a listening socket


@dataclass(frozen=True)
class Listener:
    """A listening socket from /proc/net/tcp{,6}: its owner's uid and its inode."""

    uid: int
    inode: int


def listeners(proc_net_tcp: str, port: int) -> list[Listener]:
    """The listening sockets on `port` in the text of /proc/net/tcp or /proc/net/tcp6 (any address)."""
    found = []
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != LISTEN:
            continue
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            found.append(Listener(uid=int(fields[7]), inode=int(fields[9])))
    return found


def socket_owners(inodes: set[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """inode -> pid of a process that has the socket open, for the processes this user may look into."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners: dict[int, int] = {}
    for entry in proc.iterdir() if wanted else ():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                inode = wanted.get(os.readlink(fd))
            except OSError:
                continue
            if inode is not None:
                owners.setdefault(inode, int(entry.name))
    return owners


def command_line(pid: int, proc: Path = Path("/proc")) -> str:
    """The process's command line as one string, or '' when it cannot be read."""
    try:
        return (proc / str(pid) / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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
# and below the kernel's ephemeral range, so that neither Ray's workers nor the outgoing connections and
# port-0 listeners of the processes that start in between take them first (a port-0 pick lies in that range).
CLAIMABLE_FROM = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


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
    high = ephemeral_low()
    for _ in range(tries if high > CLAIMABLE_FROM else 0):
        port = rng.randrange(CLAIMABLE_FROM, high)
        if is_free(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the ephemeral range
        s.bind((host, 0))
        return s.getsockname()[1]
