"""The session driver under the faults a real cluster has, through a fake
agent object (tests/unit/fake_cluster.py): a scheduler that does not answer,
a cancel that is not confirmed, a network that goes away, a signal, a client
that slept. Each test asserts the job's fate (cancelled or not) and the
session's state as saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_cluster import (
    CANCELLED,
    PENDING,
    RUNNING_SACCT,
    UNKNOWN,
    FakeTunnel,
    make_runner,
)

from alvis_fsm.cluster.agent import Event, Mark
from alvis_fsm.cluster.slurm import parse_jobinfo
from alvis_fsm.engine.session.job_control import warning_leads
from alvis_fsm.engine.session.store import Driver
from alvis_fsm.errors import (
    CancelUnconfirmed,
    ConnectionLost,
    ExitCode,
    Interrupted,
    SchedulerError,
    ServerError,
    StopRequested,
)
from alvis_fsm.retry import Backoff

LIVE = ["submitted", "running", "serving", "tunneled"]


def saved_state(store: object, name: str = "s") -> str:
    return store.load(name).state  # type: ignore[attr-defined,no-any-return]


# -- missing information is not bad news ------------------------------------------
def test_unknown_scheduler_while_pending_keeps_waiting(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "submitted")
    agent.starts.extend(
        [
            Event("WAIT", job=UNKNOWN, age=1),
            Event("WAIT", job=UNKNOWN, age=2),
            Event("WAIT", job=PENDING, age=3),
            Event("STARTED", "alvis7-07 42"),
        ]
    )
    agent.readies.extend([Event("ADDRESS", "alvis7-07:8000"), Event("READY", "alvis7-07:8000")])
    runner.drive()  # detached once tunneled
    assert saved_state(store) == "tunneled"
    assert agent.cancels == []
    assert "did not answer about job 42" in say.text("warn")
    assert "the scheduler is not answering" in say.text("waiting")


def test_no_record_of_the_job_is_not_an_end(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "submitted")
    none = Event("WAIT", job=parse_jobinfo("JOB|none||||||"), age=5)
    agent.starts.extend([none, none, Event("STARTED", "alvis7-07 42")])
    agent.readies.extend([Event("READY", "alvis7-07:8000")])
    runner.drive()
    assert saved_state(store) == "tunneled" and agent.cancels == []


def test_sacct_running_while_controller_away_is_an_answer(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "running")
    agent.readies.extend(
        [Event("WAIT", job=RUNNING_SACCT, age=1), Event("READY", "alvis7-07:8000")]
    )
    runner.drive()
    assert saved_state(store) == "tunneled" and agent.cancels == []
    assert "did not answer" not in say.text("warn")


def test_a_terminal_state_ends_the_session(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "submitted")
    agent.starts.append(Event("WAIT", job=CANCELLED, age=1))
    with pytest.raises(SchedulerError, match="ended before it started: CANCELLED"):
        runner.drive()
    assert saved_state(store) == "cleaned"


@pytest.mark.parametrize("answer", ["unknown", "none"])
def test_still_alive_without_an_answer_keeps_the_session(tmp_path: Path, answer: str) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "tunneled")
    agent.job = parse_jobinfo(f"JOB|{answer}|||timed out|||")
    assert runner.still_alive() is True
    assert saved_state(store) == "tunneled"
    assert "treating it as still there" in say.text("warn")


def test_still_alive_with_an_answer_ends_the_session(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "tunneled")
    agent.job = CANCELLED
    assert runner.still_alive() is False
    assert saved_state(store) == "cleaned"
    assert agent.cancels == []  # nothing to cancel
    assert "has ended (CANCELLED)" in say.text("info")


# -- timeouts by the cluster's facts -----------------------------------------------
def test_client_sleep_while_pending_does_not_time_out(tmp_path: Path) -> None:
    """The state was entered (client clock) hours ago; the job started meanwhile."""
    runner, agent, _, _, store = make_runner(tmp_path, "submitted")
    runner.model.entered_at["submitted"] = time.time() - 10_000
    agent.starts.append(Event("STARTED", "alvis7-07 42"))
    agent.readies.append(Event("READY", "alvis7-07:8000"))
    runner.drive()
    assert saved_state(store) == "tunneled" and agent.cancels == []


def test_client_sleep_while_loading_does_not_time_out(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "running")
    runner.model.entered_at["running"] = time.time() - 10_000
    runner.record.node, runner.record.port = "alvis7-07", 8000
    # The cluster says the job started 5 s ago: not late, whatever our clock says.
    agent.readies.extend(
        [Event("WAIT", job=RUNNING_SACCT, age=5), Event("READY", "alvis7-07:8000")]
    )
    runner.drive()
    assert saved_state(store) == "tunneled" and agent.cancels == []


def test_cluster_age_past_the_limit_times_out_and_cancels(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "submitted")
    agent.starts.append(Event("WAIT", job=PENDING, age=61))
    with pytest.raises(SchedulerError, match="did not start within 60 s"):
        runner.drive()
    assert agent.cancels == [("42", "alvis-fsm-s-abc")]
    assert saved_state(store) == "cleaned"


def test_loading_past_the_limit_by_cluster_age_times_out(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "running")
    runner.record.port = 8000
    agent.readies.append(Event("WAIT", job=RUNNING_SACCT, age=75))
    with pytest.raises(ServerError, match="did not start within 60 s"):
        runner.drive()
    assert agent.cancels and saved_state(store) == "cleaned"


# -- a cancel is confirmed, not assumed -----------------------------------------------
@pytest.mark.parametrize("state", LIVE)
def test_unconfirmed_cancel_keeps_the_session(tmp_path: Path, state: str) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, state)
    agent.cancel_answer = "the scheduler did not answer (squeue: Socket timed out)"
    with pytest.raises(CancelUnconfirmed) as info:
        runner.cleanup("stopped by the user")
    assert info.value.exit_code == ExitCode.UNCONFIRMED
    assert "Could not confirm that job 42 was cancelled" in info.value.message
    assert "alvis-fsm stop s" in (info.value.hint or "")
    assert saved_state(store) == state  # not cleaned: `stop` can retry
    assert "Cleaned up" not in say.text()


def test_ctrl_c_with_unconfirmed_cancel_is_not_cleaned(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "submitted")
    agent.starts.append(KeyboardInterrupt())
    agent.cancel_answer = "job 42 is RUNNING"
    with pytest.raises(CancelUnconfirmed):
        runner.drive()
    assert saved_state(store) == "submitted"
    assert "Cleaned up" not in say.text()


def test_stop_retries_and_confirms(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "tunneled")
    agent.cancel_answer = "no answer"
    with pytest.raises(CancelUnconfirmed):
        runner.jobs.stop()
    agent.cancel_answer = ""
    runner.jobs.stop()
    assert saved_state(store) == "cleaned"
    assert "Cleaned up job 42 successfully" in say.text("info")
    assert len(agent.cancels) == 2


# -- signals in each state ----------------------------------------------------------------
@pytest.mark.parametrize("state", ["submitted", "running"])
@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt(), StopRequested("SIGTERM"), StopRequested("SIGHUP")]
)
def test_signal_in_a_waiting_state_cancels(tmp_path: Path, state: str, exc: BaseException) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, state)
    (agent.starts if state == "submitted" else agent.readies).append(exc)
    with pytest.raises(Interrupted):
        runner.drive()
    assert agent.cancels == [("42", "alvis-fsm-s-abc")]
    assert saved_state(store) == "cleaned"


def test_ctrl_c_while_streaming_is_a_normal_end(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "tunneled", detach=False)
    runner.tunnels.factory = _interrupt_after(3)  # type: ignore[assignment]
    runner.drive()  # returns: Ctrl+C after connecting is how a session ends
    assert saved_state(store) == "cleaned" and len(agent.cancels) == 1


# -- the network goes away: the job stays ---------------------------------------------------
@pytest.mark.parametrize("state", ["submitted", "running"])
def test_lost_network_keeps_job_and_state(tmp_path: Path, state: str) -> None:
    runner, agent, _conn, _, store = make_runner(tmp_path, state)
    (agent.starts if state == "submitted" else agent.readies).append(
        ConnectionLost("Lost the connection to alvis2")
    )
    with pytest.raises(ConnectionLost) as info:
        runner.drive()
    assert agent.cancels == []
    assert saved_state(store) == state
    assert "is kept" in info.value.message
    assert "alvis-fsm resume s" in (info.value.hint or "")
    assert store.load("s").driver is Driver.NOBODY


def test_unreachable_at_resume_keeps_the_session(tmp_path: Path) -> None:
    runner, agent, conn, _, store = make_runner(tmp_path, "tunneled")
    conn.reachable = False
    with pytest.raises(ConnectionLost):
        runner.drive()
    assert agent.cancels == [] and saved_state(store) == "tunneled"


def test_lost_network_before_submitting_is_a_plain_error(tmp_path: Path) -> None:
    runner, agent, conn, _, _store = make_runner(tmp_path, "idle")
    conn.reachable = False
    with pytest.raises(ConnectionLost):
        runner.drive()
    assert agent.submitted == 0 and agent.cancels == []


# -- while streaming --------------------------------------------------------------------------
def test_stream_unknown_warns_and_keeps_serving(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "tunneled", detach=False)
    agent.stream_script = (
        "import time; print('UNKNOWN|squeue: Socket timed out', flush=True); time.sleep(30)"
    )
    runner.tunnels.factory = _interrupt_after(8)  # type: ignore[assignment]
    runner.drive()
    assert "did not answer about job 42" in say.text("warn")
    assert saved_state(store) == "cleaned"


def test_stream_gone_ends_the_session(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "tunneled", detach=False)
    agent.stream_script = "import time; print('GONE|CANCELLED', flush=True); time.sleep(30)"
    with pytest.raises(SchedulerError, match="no longer running"):
        runner.drive()
    assert saved_state(store) == "cleaned"


def test_the_stream_starts_at_the_mark_taken_when_vllm_was_ready(tmp_path: Path) -> None:
    """Issue 31, item 4: from the READY's mark (no extra call), and only its
    first start: a restart follows new lines only."""
    runner, agent, _, _, _ = make_runner(tmp_path, "running", detach=False)
    agent.readies.append(Event("READY", "alvis7-07:8000", mark=Mark(7, 9)))
    agent.stream_script = "pass"  # ends at once: restarted
    runner.tunnels.factory = _interrupt_after(8)  # type: ignore[assignment]
    runner.drive()
    assert agent.marks == 0 and agent.stream_from[:2] == [Mark(7, 9), None]


def test_a_session_picked_up_served_marks_before_its_ready_block(tmp_path: Path) -> None:
    runner, agent, _, say, _ = make_runner(tmp_path, "tunneled", detach=False)
    runner.tunnels.factory = _interrupt_after(4)  # type: ignore[assignment]
    runner.drive()
    assert agent.marks == 1 and agent.stream_from == [Mark(100, 10)]
    assert say.text("connected")  # and the ready block was shown


def test_failing_stream_restarts_are_bounded(tmp_path: Path) -> None:
    runner, agent, _, say, _ = make_runner(tmp_path, "tunneled", detach=False)
    agent.stream_script = "import sys; sys.stderr.write('run directory is gone\\n'); sys.exit(3)"
    runner.tunnels.factory = _interrupt_after(12)  # type: ignore[assignment]  # ~6 s of serving
    t0 = time.monotonic()
    runner.drive()
    elapsed = time.monotonic() - t0
    # Without a backoff the stream would restart twice a second (the loop's
    # tick); with it: at once, then after 0.5, 1, 2, 4 s.
    assert agent.streams <= 6, (agent.streams, elapsed)
    assert "The log stream keeps stopping (run directory is gone)" in say.text("warn")


def _interrupt_after(n: int) -> Callable[..., FakeTunnel]:
    """A tunnel whose n-th liveness check gets Ctrl+C (the serve loop checks
    twice a second): a way to end a streaming session in a test."""

    def factory(**kw: object) -> FakeTunnel:
        tunnel = FakeTunnel(**kw)
        tunnel.raise_after = (n, KeyboardInterrupt())
        return tunnel

    return factory


def test_backoff_policy() -> None:
    # The log stream's policy: the first restart at once (see Runner.__init__).
    b = Backoff(first=0.5, most=4, immediate=True, healthy=30)
    assert [b.failed(1) for _ in range(6)] == [1, 2, 3, 4, 5, 6]
    assert b.delay == 4  # capped
    b.failed(31)  # a stream that lived long starts the count again
    assert b.failures == 1 and b.delay == 0 and b.due()


# -- the time limit is a normal end ------------------------------------------------------------
def test_time_limit_ends_the_session_cleanly(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "tunneled", detach=False)
    runner.record.time_limit, runner.record.time_limit_s = "0:01:00", 60
    runner.record.running_since = time.time() - 50
    agent.stream_script = (
        "import time; time.sleep(1); print('ENDED|time limit', flush=True); time.sleep(30)"
    )
    runner.drive()  # returns: exit 0
    assert "Job 42 reached its time limit (0:01:00)" in say.text("result")
    # A one-minute job is warned once, when a quarter of it (15 s) is left.
    assert say.text("warn").count("reaches its time limit (0:01:00) in 0:00:") == 1
    saved = store.load("s")
    assert saved.state == "cleaned" and saved.end_reason == "time limit (0:01:00)"


@pytest.mark.parametrize(
    ("limit", "leads"),
    [(60, [15.0]), (600, [60]), (1800, [60]), (2400, [600, 60]), (3600, [600, 60]), (120, [30.0])],
)
def test_warnings_come_when_a_quarter_of_the_job_is_left_at_most(
    limit: int, leads: list[float]
) -> None:
    assert warning_leads([600, 60], limit) == leads
    assert warning_leads([], limit) == []


def test_no_time_limit_warning_at_connect_for_the_time_asked(tmp_path: Path) -> None:
    """`start -t 0:10:00` connects with 9:55 left: the 600 s lead is more than
    a quarter of the job, so nothing is said; the 60 s one comes once."""
    runner, _, _, say, _ = make_runner(tmp_path, "tunneled", detach=False)
    runner.record.time_limit, runner.record.time_limit_s = "0:10:00", 600
    runner.record.running_since = time.time() - 5
    runner.jobs.warn_before_end()
    assert say.text("warn") == ""
    runner.record.running_since = time.time() - 545
    runner.jobs.warn_before_end()
    runner.jobs.warn_before_end()
    assert say.text("warn").count("reaches its time limit (0:10:00) in 0:00:5") == 1


def test_sacct_timeout_is_the_time_limit(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "tunneled")
    runner.record.time_limit, runner.record.time_limit_s = "60", 3600
    agent.job = parse_jobinfo("JOB|sacct|TIMEOUT|alvis7-07|None|2026-11-27T10:00:00||0:15")
    assert runner.still_alive() is False
    assert "reached its time limit (1:00:00)" in say.text("info")
    assert store.load("s").state == "cleaned"


def test_started_record_carries_the_cluster_start_time(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "submitted")
    runner.record.time_limit_s = 3600
    started = int(time.time()) - 100
    agent.starts.append(Event("STARTED", f"alvis7-07 42 {started}"))
    agent.readies.append(Event("READY", "alvis7-07:8000"))
    runner.drive()
    assert store.load("s").running_since == started
    assert "Time left: 0:58:" in say.text("info")


# -- a detached session's supervisor never ends a job ----------------------------------------
@pytest.mark.parametrize("record", ["ENDED|signal TERM", "EXITED|1", "GONE|CANCELLED"])
def test_supervisor_lets_go_when_the_job_ends(
    tmp_path: Path, record: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and the scheduler does not confirm the end (see test_recovery for
    when it does): how long it asks is not this test's matter."""
    from alvis_fsm.engine.session import runner as runner_module

    monkeypatch.setattr(runner_module, "END_CONFIRM_S", 0.5)
    runner, agent, _, _, store = make_runner(tmp_path, "tunneled", detach=False, supervised=True)
    agent.stream_script = f"import time; print({record!r}, flush=True); time.sleep(30)"
    runner.drive()
    assert agent.cancels == []
    assert saved_state(store) == "tunneled"  # `status` will find out how it ended
    assert store.load("s").driver is Driver.NOBODY


def test_supervisor_adopts_a_live_tunnel_without_leaving_tunneled(tmp_path: Path) -> None:
    runner, agent, _, _, store = make_runner(tmp_path, "tunneled", detach=False, supervised=True)

    def live(**kw: object) -> FakeTunnel:
        tunnel = FakeTunnel(**kw)
        tunnel.is_up = True
        tunnel.raise_after = (3, StopRequested("SIGTERM"))  # `stop` takes over
        return tunnel

    runner.tunnels.factory = live  # type: ignore[assignment]
    runner.drive()
    assert [state for state, _ in store.load("s").history] == []  # no transition at all
    assert agent.cancels == [] and saved_state(store) == "tunneled"
