"""A detached session's end and a tunnel's drops, through the fake agent
(issue 22, findings 10 and 11), and the line meant for a terminal only
(issue 26, item 10). The lab tests (tests/integration/test_recovery_lab.py)
do the same with real ssh and SLURM."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from fake_cluster import CANCELLED, FakeTunnel, Say, make_runner

from alvis_fsm.cluster.tunnel import TunnelDied, Verified, verify
from alvis_fsm.engine.session.store import Driver
from alvis_fsm.errors import Interrupted, ServerError


@pytest.mark.parametrize("record", ["ENDED|signal TERM", "EXITED|1", "GONE|CANCELLED"])
def test_a_supervisor_records_a_confirmed_end_and_closes_tunnel_and_connection(
    tmp_path: Path, record: str
) -> None:
    """Finding 10: the job ended elsewhere (scancel, time limit, node
    failure): the supervisor does what a foreground client does, so the
    port and the connection are free without anyone running `status`."""
    runner, agent, conn, say, store = make_runner(
        tmp_path, "tunneled", detach=False, supervised=True
    )
    agent.stream_script = f"import time; print({record!r}, flush=True); time.sleep(30)"
    agent.job = CANCELLED
    runner.drive()
    assert agent.cancels == []  # nothing to cancel: it ended
    saved = store.load("s")
    assert saved.state == "cleaned" and saved.end_reason == "job ended: CANCELLED"
    assert saved.final_job_state == "CANCELLED"  # what `status` shows as the job's state
    assert saved.driver is Driver.NOBODY
    assert runner.tunnel is not None and not runner.tunnel.up()
    assert not conn.up
    assert "Job 42 has ended (CANCELLED); nothing to cancel" in say.text("info")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_verify_notices_a_dead_tunnel_at_once_not_at_its_deadline() -> None:
    """Finding 11: the check after a reopen asks the tunnel whether its ssh
    still lives at each failed try; a dead one ends the check with
    TunnelDied, long before the connection test's deadline (an hour here)."""
    asked: list[bool] = []

    def alive() -> bool:
        asked.append(False)
        return False

    with pytest.raises(TunnelDied) as caught:
        verify(_closed_port(), "k", 3600, "org/m", alive=alive)
    assert asked == [False]
    assert "tunnel closed" in caught.value.message


def test_verify_still_waits_for_a_server_behind_a_live_tunnel() -> None:
    with pytest.raises(ServerError) as caught:
        verify(_closed_port(), "k", 0.5, "org/m", alive=lambda: True)
    assert not isinstance(caught.value, TunnelDied)
    assert "did not answer through the tunnel within" in caught.value.message


def test_a_tunnel_that_dies_again_while_reopened_is_reopened_at_once(tmp_path: Path) -> None:
    """Two drops in a row: the second (the new ssh dying during the check)
    restarts the recovery, which then completes."""
    runner, _agent, _, say, _store = make_runner(tmp_path, "tunneled", detach=False)
    opened: list[FakeTunnel] = []
    checks: list[bool] = []

    def tunnel(**kw: Any) -> FakeTunnel:
        made = FakeTunnel(**kw)
        real_open = made.open

        def open_() -> str:
            said = real_open()
            opened.append(made)
            if len(opened) in (2, 3):  # the first reopen dies at once, the second too
                made.is_up = False
            return said

        made.open = open_  # type: ignore[method-assign]
        return made

    def verifier(port: int, key: str | None, deadline: float, served: str, **kw: Any) -> Verified:
        up = kw["alive"]()
        checks.append(up)
        if not up:
            raise TunnelDied("The tunnel closed while the server was being checked")
        if len(checks) == 1:  # the first start: then the tunnel drops
            runner.tunnel.is_up = False  # type: ignore[union-attr]
        elif len(checks) == 4:
            runner.request_stop("test")
        return Verified(["org/m"], 0.01)

    runner.tunnels.factory = tunnel  # type: ignore[assignment]
    runner.tunnels.verify = verifier
    with pytest.raises(Interrupted):
        runner.drive()
    assert checks == [True, False, False, True]
    assert say.text("warn").count("The tunnel dropped again while it was being reopened") == 2
    assert "Tunnel back up: http://localhost:58000" in say.text("info")


class _Terminal(Say):
    def interactive(self) -> bool:
        return True


@pytest.mark.parametrize("ui", [Say(), _Terminal()], ids=["no terminal", "terminal"])
def test_the_ctrl_c_hint_is_for_a_terminal_only(tmp_path: Path, ui: Say) -> None:
    """Issue 26, item 10: the gateway's output (and the Python API's log)
    showed "Streaming logs (Ctrl+C to stop and cleanup)..."."""
    runner, _agent, _, _, _store = make_runner(tmp_path, "tunneled", detach=False)
    runner.ui = ui
    original = runner.tunnels.announce

    def announce() -> None:
        original()
        runner.request_stop("test")

    runner.tunnels.announce = announce  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        runner.drive()
    said = "Streaming logs (Ctrl+C to stop and cleanup)..." in ui.text("info")
    assert said == ui.interactive()
