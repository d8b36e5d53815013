"""The tunnel's end on the compute node, on the lab cluster.

OpenSSH's sshd before 10.1 (the lab's is 9.2, as a cluster's often is) turns Nagle's
algorithm off on a connection only once a session runs on it. A tunnel
opened with ``-N`` runs none, so every answer vLLM writes in two parts
(headers, then body) waited for the login node's delayed ACK: ~44 ms a request
(bench/results-gateway.md has the figures before and after). The tunnel
now runs a small session (``cluster/tunnel.HOLD``) that ends by itself with
the connection.

Asserted here by what the kernel says, not by timing: the node's sshd for
the tunnel has TCP_NODELAY on its connection, and once the session is
stopped nothing of the tunnel is left running on the node."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import time
from typing import Any

from tool import Tool, assert_nothing_left, free_port

HOLD_MARK = "while kill -0 "  # a regex for pgrep: no "$"

# Generic syscall numbers (the same on x86_64 and aarch64 since Linux 5.6).
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438


def holds(user: str) -> list[int]:
    """Pids of the tunnel's session command run by ``user`` on the nodes."""
    proc = subprocess.run(["pgrep", "-u", user, "-f", HOLD_MARK], capture_output=True, text=True)
    return [int(pid) for pid in proc.stdout.split()]


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        # "pid (comm) state ppid ...": comm may hold spaces, so split after it.
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def tcp_nodelay(pid: int) -> list[int]:
    """TCP_NODELAY of every TCP socket of process ``pid`` (borrowed with
    pidfd_getfd: the lab runs as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    values = []
    try:
        for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=fd)
            try:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                ):
                    values.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return values


def test_the_nodes_sshd_sends_at_once_and_the_tunnel_leaves_nothing_on_the_node(
    lab: Any, tool: Tool
) -> None:
    # Another test's tunnel whose connection died with a fault may linger on
    # the node until its sshd notices: only the one this test opens counts.
    before = set(holds(lab.user))
    status, out = tool.run(
        "start", "-m", "lab-ok", "--port", str(free_port()), "--detach", timeout=120
    )
    assert status == 0, out[-2000:]
    # ssh -f returns once the forward is up, just before the command runs.
    deadline = time.monotonic() + 20
    while not set(holds(lab.user)) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    [hold] = set(holds(lab.user)) - before
    sshd = parent(hold)
    with open(f"/proc/{sshd}/cmdline", "rb") as cmdline:
        assert cmdline.read().startswith(b"sshd: "), (
            "the tunnel's command is not run by the node's sshd"
        )
    # Its one TCP socket is the connection from the login node (the jump).
    assert tcp_nodelay(sshd) == [1]
    status, out = tool.run("stop", "lab-ok", timeout=120)
    assert status == 0, out[-2000:]
    deadline = time.monotonic() + 20
    while hold in holds(lab.user) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hold not in holds(lab.user), "the tunnel's command outlived the tunnel on the node"
    assert_nothing_left(lab, tool)
