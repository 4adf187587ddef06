"""What Linux's /proc says about processes and sockets, read in one place: the process table (pid, parent,
state, session, command line), whether a pid still runs, and who listens on a TCP port.

Every reader takes the /proc root as an argument so that tests can hand it a folder of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp for a listening socket
COMM_BYTES = 15  # the kernel keeps a process's name (its executable's file name) to its first 15 bytes


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    argv: tuple[str, ...]
    sid: int = 0



def processes(proc: Path = Path("/proc")) -> dict[int, Proc]:
    """Every process /proc shows, by pid."""
    return _table(proc, lambda name: True)


def named(word: str, proc: Path = Path("/proc")) -> dict[int, Proc]:
    """The processes whose command name holds `word`, as processes() gives them, and those whose name the kernel
    cut to 15 bytes (the word may be past the cut). The name is in the stat file, read for every process anyway;
    only these processes' command lines are read, which halves what a look costs where few match."""
    return _table(proc, lambda name: word in name or len(name.encode()) >= COMM_BYTES)


def _table(proc: Path, wanted: Callable[[str], bool]) -> dict[int, Proc]:
    """The processes whose name `wanted` accepts, by pid; one that ends while it is read is left out."""
    found = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            stat = read_stat(proc / name / "stat")
            if not wanted(stat[stat.index("(") + 1:stat.rindex(")")]):
                continue
            with open(proc / name / "cmdline", "rb") as f:
                argv = f.read().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        state, ppid, _pgrp, sid = after_name(stat)[:4]
        found[int(name)] = Proc(int(name), int(ppid), state,
                                tuple(a.decode(errors="replace") for a in argv if a), int(sid))
    return found


def read_stat(path: Path) -> str:
    """A /proc stat file. The process's name in it is whatever bytes its executable's name holds: not
    always UTF-8."""
    return path.read_bytes().decode(errors="replace")


def parent(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The parent of `pid`; None where it is gone. Any other failure to read /proc is raised: it says nothing
    about the process."""
    try:
        return int(after_name(read_stat(proc / str(pid) / "stat"))[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether `pid` runs: it exists and one of its threads is not a zombie. The first thread may end before
    the others and show the whole process as a zombie while they still hold its open files, listening
    sockets included: a process is gone only when its last thread is."""
    state = _state(proc / str(pid) / "stat")
    if state != "Z":
        return state is not None
    try:
        threads = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return False
    return any(_state(thread / "stat") not in (None, "Z") for thread in threads)


def _state(stat: Path) -> str | None:
    """The state letter of a /proc .../stat file (R, S, D, Z, ...); None where it is gone."""
    try:
        return after_name(read_stat(stat))[0]
    except OSError:
        return None


def after_name(stat: str) -> list[str]:
    """The fields of a /proc/PID/stat line after the command's name (state, ppid, pgrp, session, ...): the name
    is in parentheses and may hold spaces and ')' itself."""
    return stat[stat.rindex(")") + 2:].split()



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
            if not fds:  # its first thread has ended: the others, still running, hold the open files
                fds = [fd for thread in (entry / "task").iterdir() for fd in (thread / "fd").iterdir()]
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

