"""The local port check asks what ssh needs (real sockets on loopback): a
listener makes the port busy; connections of an old tunnel lingering in
TIME_WAIT do not (ssh binds with SO_REUSEADDR and would succeed)."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from alvis_fsm.cluster.tunnel import local_port_free


def _listener() -> socket.socket:
    """A listener like ssh's forward (channels.c sets SO_REUSEADDR on it; the
    connections it accepts, and so their TIME_WAIT remains, inherit that)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_a_listener_makes_the_port_busy() -> None:
    with _listener() as server:
        port = server.getsockname()[1]
        assert local_port_free(port) is False
    assert local_port_free(port) is True


def _time_wait_on(port: int) -> bool:
    if shutil.which("ss") is None:
        return True  # cannot look; the assertion below still has to hold
    out = subprocess.run(
        ["ss", "-Htan", "state", "time-wait", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return bool(out.strip())


def test_time_wait_connections_do_not_make_the_port_busy() -> None:
    server = _listener()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the listening side closes first: TIME_WAIT is on `port`
    client.recv(1)
    client.close()
    server.close()
    # Without SO_REUSEADDR in the check, exactly this case was "in use".
    if not _time_wait_on(port):
        pytest.skip("this kernel left no TIME_WAIT connection to test with")
    assert local_port_free(port) is True
