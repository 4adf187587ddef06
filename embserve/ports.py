"""Whether a TCP port is free to listen on, and when it is not, which process holds it (from /proc)."""

from __future__ import annotations

import errno
import os
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


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (it may be taken again before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
