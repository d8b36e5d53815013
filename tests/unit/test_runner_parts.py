"""The runner split by job (issue 24, item 1): the driver's one table from
error class to outcome, the machine's conditions that replaced the driver's
flags, the tunnel keeper's phases, and job control and the looks working
with no machine. Through the fake agent object (tests/unit/fake_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_cluster import CANCELLED, FakeTunnel, make_runner

from alvis_fsm.cluster.agent import Event
from alvis_fsm.cluster.tunnel import Verified
from alvis_fsm.engine.session.job_control import JobControl
from alvis_fsm.engine.session.looks import look, show_logs
from alvis_fsm.engine.session.runner import (
    OUTCOMES,
    Detached,
    LimitReached,
    Outcome,
    Release,
    outcome_of,
)
from alvis_fsm.engine.session.start_up import TimedOut
from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.tunnel_keeper import GiveUp, TunnelKeeper, TunnelPhase
from alvis_fsm.errors import (
    ConnectionLost,
    SchedulerError,
    ServerError,
    SessionError,
    StopRequested,
)


@pytest.mark.parametrize(
    ("exc", "client", "supervisor"),
    [
        (LimitReached(), Outcome.LIMIT_REACHED, Outcome.LIMIT_REACHED),
        (Detached(), Outcome.DETACHED, Outcome.DETACHED),
        (Release("ENDED"), Outcome.LET_GO, Outcome.LET_GO),
        (GiveUp("x"), Outcome.KEEP_JOB, Outcome.KEEP_JOB),
        (ConnectionLost("x"), Outcome.KEEP_JOB, Outcome.KEEP_JOB),
        (KeyboardInterrupt(), Outcome.INTERRUPTED, Outcome.INTERRUPTED),
        (StopRequested("idle"), Outcome.STOPPED, Outcome.LET_GO),
        (TimedOut(SchedulerError("late")), Outcome.TIMED_OUT, Outcome.LET_GO),
        (ServerError("boom"), Outcome.FAILED, Outcome.LET_GO),
        (RuntimeError("bug"), Outcome.INTERNAL, Outcome.INTERNAL),
    ],
)
def test_one_table_from_error_class_to_outcome(
    exc: BaseException, client: Outcome, supervisor: Outcome
) -> None:
    assert outcome_of(exc) is client
    assert outcome_of(exc, supervised=True) is supervisor


def test_every_outcome_has_a_row_and_the_last_row_catches_all() -> None:
    assert {outcome for _, outcome in OUTCOMES} == set(Outcome)
    assert OUTCOMES[-1][0] is BaseException


def test_a_timeout_fires_timeout_and_raises_the_error_itself(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "submitted")
    agent.starts.append(Event("WAIT", age=10_000))  # the cluster: far past job_start
    with pytest.raises(SchedulerError, match="did not start within 60 s"):
        runner.drive()
    assert [state for state, _ in store.load("s").history] == ["failed", "cleaned"]


def test_the_machine_says_where_a_session_came_from(tmp_path: Path) -> None:
    runner, agent, _, say, _ = make_runner(tmp_path, "idle")
    agent.starts.append(Event("STARTED", "alvis7-07 42"))
    agent.readies.append(Event("READY", "alvis7-07:8000"))
    assert runner.model.came_from is None and not runner.model.has_been(State.TUNNELED)
    runner.drive()  # detached once tunneled
    assert runner.model.came_from == State.SERVING
    assert runner.model.has_been(State.SUBMITTED) and runner.model.has_been(State.TUNNELED)
    assert agent.submitted == 1
    assert "Job is running on node: alvis7-07" in say.text("info")


def test_a_resumed_running_session_neither_submits_nor_announces_its_node(tmp_path: Path) -> None:
    runner, agent, _, say, _ = make_runner(tmp_path, "running")
    agent.readies.append(Event("READY", "alvis7-07:8000"))
    runner.drive()
    assert agent.submitted == 0
    assert "Job is running on node" not in say.text("info")
    assert not runner.model.has_been(State.SUBMITTED)


def test_the_keeper_announces_once_then_says_back_up(tmp_path: Path) -> None:
    runner, _, _, say, _ = make_runner(tmp_path, "serving")
    keeper = TunnelKeeper(runner.link, FakeTunnel, lambda *_, **__: Verified(["org/m"], 0.01))
    assert keeper.phase is TunnelPhase.NONE
    keeper.bring_up()
    assert keeper.phase is TunnelPhase.VERIFIED
    keeper.announce()
    assert keeper.phase is TunnelPhase.UP and say.text("connected") == "org/m"
    keeper.dropped()
    keeper.bring_up()  # a reopen, not a first open
    assert keeper.phase is TunnelPhase.REOPENED
    keeper.announce()
    keeper.bring_up()  # verified again (not after a drop): no second banner
    keeper.announce()
    assert say.text("connected") == "org/m"
    assert say.text("info").count("Tunnel back up: http://localhost:58000") == 2


def test_stop_needs_no_driver(tmp_path: Path) -> None:
    runner, agent, conn, say, store = make_runner(tmp_path, "tunneled")
    JobControl(runner.link).stop()  # what `stop` runs, without a driver
    saved = store.load("s")
    assert agent.cancels == [("42", "alvis-fsm-s-abc")] and not conn.up
    assert saved.state == "cleaned" and saved.history[-1][0] == "cleaned"
    assert saved.end_reason == "stopped by the user"
    assert "Cleaned up job 42 successfully" in say.text("info")


def test_job_control_alone_records_an_ended_job(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "tunneled")
    agent.job = CANCELLED
    assert JobControl(runner.link).still_alive() is False
    assert store.load("s").state == "cleaned" and agent.cancels == []
    assert "has ended (CANCELLED); nothing to cancel" in say.text("info")


def test_a_look_saves_nothing(tmp_path: Path) -> None:
    runner, agent, conn, say, store = make_runner(tmp_path, "tunneled")
    link = look(
        runner.settings,
        store.load("s"),
        store,
        say,
        conn=conn,
        agent=agent,
        tunnel_factory=FakeTunnel,
    )
    link.record.state = "cleaned"
    link.save()
    assert store.load("s").state == "tunneled"
    agent.stream_script = (
        "print('O|INFO up', flush=True); print('UNKNOWN|squeue: timed out', flush=True)"
    )
    show_logs(link, 5, follow=True)
    assert "INFO up" in say.text("log") and not conn.up


def test_logs_need_a_job(tmp_path: Path) -> None:
    runner, _, conn, say, store = make_runner(tmp_path, "idle")
    with pytest.raises(SessionError, match="no job yet"):
        show_logs(look(runner.settings, store.load("s"), store, say, conn=conn), 5, follow=False)
