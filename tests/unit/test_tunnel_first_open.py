"""The tunnel's first opening is tried again when its ssh could not connect
for now, as after a drop (issue 31, item 2: a laptop that slept through the
handshake sees ssh's ConnectTimeout run out); a refusal is final. The lab
test is tests/integration/test_connection_life.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fake_cluster import FakeTunnel, make_runner

from alvis_fsm.cluster.tunnel import Verified
from alvis_fsm.errors import ConnectionLost, Interrupted, SSHError

TIMED_OUT = (
    "Connection timed out during banner exchange\nConnection to UNKNOWN port 65535 timed out"
)


def _failing(first: list[BaseException], opened: list[int]) -> Any:
    """A tunnel whose first openings fail with ``first``, in order."""

    def tunnel(**kw: Any) -> FakeTunnel:
        made = FakeTunnel(**kw)
        real_open = made.open

        def open_() -> str:
            opened.append(1)
            if first:
                raise first.pop(0)
            return real_open()

        made.open = open_  # type: ignore[method-assign]
        return made

    return tunnel


def test_a_time_out_while_opening_the_tunnel_is_tried_again(tmp_path: Path) -> None:
    runner, _agent, _conn, say, _ = make_runner(tmp_path, "serving", detach=False)
    opened: list[int] = []
    lost = [ConnectionLost("Cannot connect to alvis7-07.", details=TIMED_OUT) for _ in range(2)]
    runner.tunnels.factory = _failing(lost, opened)

    def verifier(*_: Any, **kw: Any) -> Verified:
        runner.request_stop("test")
        return Verified(["org/m"], 0.01)

    runner.tunnels.verify = verifier
    with pytest.raises(Interrupted):
        runner.drive()
    assert len(opened) == 3
    warned = say.text("warn")
    assert (
        warned.count(
            "Cannot connect to alvis7-07 (Connection timed out during banner exchange); "
            "trying again in"
        )
        == 2
    )


def test_a_refused_tunnel_login_is_not_tried_again(tmp_path: Path) -> None:
    runner, _agent, _conn, say, _ = make_runner(tmp_path, "serving", detach=False)
    opened: list[int] = []
    refused = SSHError("alvis7-07 refused the login (key or password not accepted).")
    runner.tunnels.factory = _failing([refused], opened)
    with pytest.raises(SSHError) as caught:
        runner.drive()
    assert caught.value.message.startswith("alvis7-07 refused the login")
    assert len(opened) == 1
    assert "trying again" not in say.text("warn")


def test_the_tunnel_that_never_connects_gives_up_and_keeps_the_job(tmp_path: Path) -> None:
    runner, agent, conn, _say, store = make_runner(
        tmp_path, "serving", detach=False, tunnel={"max_reconnects": 2}
    )
    opened: list[int] = []
    lost = [ConnectionLost("Cannot connect to alvis7-07.", details=TIMED_OUT) for _ in range(5)]
    runner.tunnels.factory = _failing(lost, opened)
    with pytest.raises(ConnectionLost) as caught:
        runner.drive()
    assert len(opened) == 2
    assert (
        caught.value.message == "Could not open the tunnel after 2 tries; job 42 is still running"
    )
    assert agent.cancels == []
    assert store.load("s").state == "serving"
    assert not conn.up  # a client that gives up leaves no master behind (item 3)
