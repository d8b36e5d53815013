"""Every live state × every fault of issue 11, through the engine with the
fake agent (issue 13). Each case asserts the job's fate (cancelled or kept,
from the agent's record of cancels) and the session's saved state.

Faults: the scheduler not answering, the network lost, the client asleep
(its clock jumped; the cluster's did not), a stop request (Ctrl+C, SIGTERM
or a gateway's request_stop), and a stop whose cancel is not confirmed."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from alvis_fsm.cluster.agent import Event
from alvis_fsm.cluster.protocol import Reply
from alvis_fsm.cluster.tunnel import Verified, port_busy_hint
from alvis_fsm.errors import CancelUnconfirmed, ConnectionLost, Interrupted, LocalPortBusy
from tests.unit.fake_cluster import RUNNING_SACCT, UNKNOWN, FakeAgent, FakeTunnel, make_runner

LIVE = ["submitted", "running", "serving", "tunneled"]
JOB = ("42", "alvis-fsm-s-abc")


def _happy(agent: FakeAgent, state: str, first: list[Any] | None = None) -> None:
    """Script the cluster from ``state`` on to `tunneled`, ``first`` before it."""
    first = first or []
    if state == "submitted":
        agent.starts.extend([*first, Event(Reply.STARTED, "alvis7-07 42 1700000000")])
        agent.readies.extend(
            [Event(Reply.ADDRESS, "alvis7-07:8000"), Event(Reply.READY, "alvis7-07:8000")]
        )
    elif state == "running":
        agent.readies.extend(
            [*first, Event(Reply.ADDRESS, "alvis7-07:8000"), Event(Reply.READY, "alvis7-07:8000")]
        )


@pytest.mark.parametrize("state", LIVE)
def test_scheduler_not_answering_keeps_the_job(tmp_path: Path, state: str) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, state, detach=state != "tunneled")
    unknown = [Event(Reply.WAIT, job=UNKNOWN, age=1), Event(Reply.WAIT, job=UNKNOWN, age=2)]
    _happy(agent, state, unknown)
    if state == "tunneled":
        agent.stream_script = (
            "import time; print('UNKNOWN|squeue: Socket timed out', flush=True); "
            "time.sleep(1); print('ENDED|time limit', flush=True); time.sleep(5)"
        )
        runner.drive()  # the stream says unknown, later the time limit ends it
        assert agent.cancels == [JOB] and store.load("s").state == "cleaned"
    else:
        runner.drive()
        assert agent.cancels == [] and store.load("s").state == "tunneled"
    if state in ("submitted", "running", "tunneled"):
        assert "the job is kept" in say.text("warn")


@pytest.mark.parametrize("state", LIVE)
def test_network_lost_keeps_job_and_state(tmp_path: Path, state: str) -> None:
    runner, agent, conn, _, store = make_runner(
        tmp_path, state, detach=False, ssh={"reconnect_window": 1}
    )
    lost = ConnectionLost("Lost the connection to alvis2")
    if state == "submitted":
        agent.starts.append(lost)
    elif state == "running":
        agent.readies.append(lost)
    elif state == "serving":

        def verify(*_: object, **__: object) -> Verified:
            raise lost

        runner.tunnels.verify = verify
    else:
        # The link goes while streaming: the stream (a channel on it) ends
        # and the login node no longer answers.
        agent.stream_script = "import time; time.sleep(0.5)"
        threading.Timer(0.4, lambda: setattr(conn, "reachable", False)).start()
    with pytest.raises(ConnectionLost) as err:
        runner.drive()
    assert "resume" in (err.value.hint or "")
    assert agent.cancels == []  # the job is kept
    assert store.load("s").state in (state, "serving")  # a dropped tunnel counts as serving


@pytest.mark.parametrize("state", ["submitted", "running"])
def test_client_asleep_is_judged_by_the_cluster_clock(tmp_path: Path, state: str) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, state)
    runner.model.entered_at[state] = time.time() - 100_000  # our clock: a day late
    _happy(agent, state, [Event(Reply.WAIT, job=RUNNING_SACCT, age=5)])  # the cluster: 5 s
    runner.drive()
    assert agent.cancels == [] and store.load("s").state == "tunneled"


@pytest.mark.parametrize("state", LIVE)
@pytest.mark.parametrize("how", ["ctrl-c", "request_stop"])
def test_a_stop_cancels_and_is_confirmed(tmp_path: Path, state: str, how: str) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, state, detach=False)
    _happy(agent, state)
    if how == "ctrl-c":
        if state == "submitted":
            agent.starts.appendleft(KeyboardInterrupt())
        elif state == "running":
            agent.readies.appendleft(KeyboardInterrupt())
        else:

            def interrupted(*_: object, **__: object) -> Verified:
                raise KeyboardInterrupt

            if state == "serving":
                runner.tunnels.verify = interrupted
            else:
                # Ctrl+C lands while the session streams (the tunnel's 2nd check).
                def factory(**kw: object) -> FakeTunnel:
                    tunnel = FakeTunnel(**kw)
                    tunnel.raise_after = (2, KeyboardInterrupt())
                    return tunnel

                runner.tunnels.factory = factory
    else:
        runner.request_stop("idle")
    # A start-up interrupted raises Interrupted (exit 130); while streaming
    # it is a normal end.
    with contextlib.suppress(Interrupted):
        runner.drive()
    assert agent.cancels == [JOB]
    assert store.load("s").state == "cleaned"
    assert "Cleaned up job 42 successfully" in say.text("info")


@pytest.mark.parametrize("state", LIVE)
def test_a_stop_whose_cancel_is_unconfirmed_keeps_the_session(tmp_path: Path, state: str) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, state, detach=False)
    agent.cancel_answer = "squeue: Socket timed out on send/recv operation"
    runner.request_stop("shutdown")
    with pytest.raises(CancelUnconfirmed):
        runner.drive()
    assert agent.cancels == [JOB]
    # Not cleaned: `stop` tries again. (A tunneled session picked up again is
    # re-verified from `serving`, where this stop found it.)
    assert store.load("s").state == ("serving" if state == "tunneled" else state)
    assert "Cleaned up" not in say.text()


class _PortTaken(FakeTunnel):
    """The local port is another program's: ssh cannot listen on it."""

    def open(self) -> str:
        raise LocalPortBusy("Local port 58000 is already in use", hint=port_busy_hint(58000))


@pytest.mark.parametrize("state", LIVE)
def test_a_resumed_sessions_port_held_elsewhere_keeps_the_job(tmp_path: Path, state: str) -> None:
    """`resume` of a session whose local port another program now holds:
    the job was there before this client, so it is kept (not cancelled), the
    session stays live for the next `resume`, and the message says so and
    what to do."""
    runner, agent, _, _, store = make_runner(tmp_path, state, detach=False)
    _happy(agent, state)
    runner.tunnels.factory = _PortTaken
    with pytest.raises(LocalPortBusy) as err:
        runner.drive()
    assert err.value.message.startswith("Local port 58000 is already in use; job 42 is kept")
    hint = err.value.hint or ""
    assert "lsof -nP -iTCP:58000 -sTCP:LISTEN" in hint
    assert "`alvis-fsm resume s`" in hint and "`alvis-fsm stop s`" in hint
    assert agent.cancels == []  # the job is kept
    saved = store.load("s")
    assert saved.live and saved.state != "cleaned"


def test_a_port_taken_before_a_new_job_first_serves_cleans_up(tmp_path: Path) -> None:
    """`start`: the port checked free before submitting, then taken before
    the job's first tunnel (a race): nothing half-done is left, the job this
    command submitted is cancelled."""
    runner, agent, _, _, store = make_runner(tmp_path, "idle", detach=False)
    _happy(agent, "submitted")
    runner.tunnels.factory = _PortTaken
    with pytest.raises(LocalPortBusy):
        runner.drive()
    assert agent.cancels == [JOB]
    assert store.load("s").state == "cleaned"
