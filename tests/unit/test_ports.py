"""embserve.launch.ports: whether a port is free, and who holds it when it is not."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embserve.launch import ports, procfs

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:20D4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F40 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 0 1 0000000000000000 20 4 30 10 -1
"""


def test_listeners_reads_only_listening_sockets_on_the_port():
    assert procfs.listeners(PROC_NET_TCP, 8000) == [procfs.Listener(uid=1000, inode=4242)]  # not the connection
    assert procfs.listeners(PROC_NET_TCP, 8404) == [procfs.Listener(uid=0, inode=777)]
    assert procfs.listeners(PROC_NET_TCP, 9101) == []


@pytest.fixture
def listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_this_process_listens_on_is_taken_and_named_with_its_pid_and_command_line(listening):
    assert not ports.is_free("127.0.0.1", listening)
    assert ports.is_free("127.0.0.1", ports.free_port())
    if sys.platform == "linux":
        who = ports.holder(listening)
        assert who.startswith(f"pid {os.getpid()} (") and "python" in who


def test_another_users_listener_is_called_so(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(PROC_NET_TCP)
    assert ports.holder(8404, proc=tmp_path, uid=1000) == "another user's process (uid 0)"
    assert "does not show" in ports.holder(8000, proc=tmp_path, uid=1000)  # ours, yet no /proc/<pid>/fd names it
    assert ports.holder(1, proc=tmp_path) == "a process this system does not name"


def test_a_named_holder_comes_from_its_fd_and_cmdline(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(PROC_NET_TCP)
    (tmp_path / "321" / "fd").mkdir(parents=True)
    os.symlink("socket:[4242]", tmp_path / "321" / "fd" / "7")
    (tmp_path / "321" / "cmdline").write_bytes(b"haproxy\0-db\0-f\0/tmp/x/haproxy.cfg\0")
    assert ports.holder(8000, proc=tmp_path, uid=1000) == "pid 321 (haproxy -db -f /tmp/x/haproxy.cfg)"


UNPRIVILEGED_FROM = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


@pytest.mark.skipif(sys.platform != "linux", reason="drops to another user with fork and setuid")
def test_a_port_below_1024_is_not_reported_as_taken_when_only_root_may_bind_it():
    """Binding it is refused, not found busy: is_free raises. Root may bind any port, so as root the check
    runs in a forked child that has become nobody (uid 65534)."""
    if UNPRIVILEGED_FROM.exists() and int(UNPRIVILEGED_FROM.read_text()) <= 1:
        pytest.skip("this kernel lets every user bind port 1")
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            ports.is_free("127.0.0.1", 1)
        return
    child = os.fork()
    if child == 0:  # only what is in memory runs here: no imports, no I/O but the exit status
        status = 2
        try:
            os.setuid(65534)
            ports.is_free("127.0.0.1", 1)
            status = 1
        except PermissionError:
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "is_free did not raise PermissionError for port 1 as nobody"


def test_a_claimed_port_lies_below_the_ephemeral_range_where_ray_s_own_connections_get_theirs(tmp_path):
    low = ports.ephemeral_low()
    picked = {ports.free_port() for _ in range(20)}
    assert all(ports.CLAIMABLE_FROM <= p < min(low, ports.claimable_below()) for p in picked) and len(picked) > 1
    assert all(ports.is_free("127.0.0.1", p) for p in picked)
    (tmp_path / "range").write_text("40000\t60999\n")
    assert ports.ephemeral_low(tmp_path / "range") == 40000
    assert ports.ephemeral_low(tmp_path / "missing") == 32768


def test_a_claimed_port_lies_below_the_ports_serve_gives_its_ingress_replicas(monkeypatch):
    """Serve's direct ingress binds each ingress replica's HTTP port from 30000 up: a bench's or a test's port
    there could be taken by a replica before its own server binds it."""
    monkeypatch.setattr(ports, "ephemeral_low", lambda: 60000)
    assert ports.claimable_below({}) == 30000
    assert ports.claimable_below({"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "25000"}) == 25000
    assert ports.claimable_below({"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "x"}) == 30000
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", raising=False)
    assert all(ports.CLAIMABLE_FROM <= ports.free_port() < 30000 for _ in range(50))


def test_a_taken_candidate_is_passed_over():
    """A listener already on the first candidate: free_port moves on to the next."""
    import random

    class Fixed(random.Random):
        def __init__(self, picks):
            super().__init__()
            self.picks = list(picks)

        def randrange(self, *_):
            return self.picks.pop(0)

    with socket.socket() as s:
        taken = ports.free_port()  # ports of the claimable range free now: the session's own Ray claims some
        s.bind(("127.0.0.1", taken))
        s.listen()
        free = ports.free_port()
        got = ports.free_port(rng=Fixed([taken, free]))
    assert got == free


def test_with_no_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_low", lambda: ports.CLAIMABLE_FROM)
    assert ports.is_free("127.0.0.1", ports.free_port())


FIRST_THREAD_ENDS = """
import ctypes, socket, sys, threading
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
threading.Thread(target=sys.stdin.read).start()  # runs until the test closes our stdin
ctypes.CDLL(None).pthread_exit(None)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's /proc")
def test_a_process_whose_first_thread_has_ended_runs_until_its_last_thread_ends_and_holds_its_port_till_then():
    """/proc shows such a process as a zombie with no open files, while its other threads still hold them:
    `embserve stop` must wait for it, or the port it frees is still taken when the next run starts."""
    child = subprocess.Popen([sys.executable, "-c", FIRST_THREAD_ENDS], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        deadline = time.monotonic() + 10
        while procfs.processes()[child.pid].state != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert procfs.processes()[child.pid].state == "Z"  # as the leader's own /proc entry says
        assert procfs.alive(child.pid)
        assert not ports.is_free("127.0.0.1", port)
        assert ports.holder(port).startswith(f"pid {child.pid} (")
    finally:
        child.stdin.close()
    child.wait(10)
    assert not procfs.alive(child.pid) and ports.is_free("127.0.0.1", port)
