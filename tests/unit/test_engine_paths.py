"""The engine's less travelled paths, driven through the fake agent: a
tunnel that drops and heals (or does not), sbatch cut off, vLLM dying while
loading, reading logs. Each asserts what happened to the job and what the
user was told."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from alvis_fsm.cluster.agent import Event
from alvis_fsm.cluster.protocol import Reply
from alvis_fsm.cluster.slurm import JobInfo, JobState
from alvis_fsm.engine.session.looks import show_logs
from alvis_fsm.errors import ConnectionLost, Interrupted, ServerError, SessionError, SSHError
from tests.unit.fake_cluster import FakeAgent, make_runner


def _later(seconds: float, action: object) -> None:
    threading.Timer(seconds, action).start()  # type: ignore[arg-type]


def test_a_dropped_tunnel_heals_through_serving_and_keeps_the_log_stream(tmp_path: Path) -> None:
    runner, agent, _, say, _store = make_runner(tmp_path, "tunneled", detach=False)
    states: list[str] = []
    runner.model.on_change = lambda s: (states.append(str(s)), runner._on_change(s))  # type: ignore[func-returns-value]

    def drop() -> None:
        assert runner.tunnel is not None
        runner.tunnel.is_up = False  # type: ignore[attr-defined]

    _later(0.8, drop)
    _later(2.5, lambda: runner.request_stop("test"))
    with pytest.raises(Interrupted):
        runner.drive()
    # resume: tunneled -> serving (verify) -> tunneled; the drop: -> serving -> tunneled
    assert states[:4] == ["serving", "tunneled", "serving", "tunneled"], states
    assert states[-1] == "cleaned"
    assert "The tunnel dropped; reconnecting (the job is untouched)..." in say.text("warn")
    assert "Tunnel back up: http://localhost:58000" in say.text("info")
    assert say.text("connected") == "org/m"  # the banner once, not again after the drop
    assert agent.streams == 1  # the log stream carried on across the drop
    assert agent.cancels == [("42", "alvis-fsm-s-abc")]


def test_a_tunnel_that_will_not_reopen_gives_up_the_client_and_keeps_the_job(
    tmp_path: Path,
) -> None:
    runner, agent, _, _say, store = make_runner(
        tmp_path, "tunneled", detach=False, tunnel={"max_reconnects": 2}
    )

    def drop_for_good() -> None:
        tunnel = runner.tunnel
        assert tunnel is not None

        def refuse() -> str:
            raise SSHError("ssh -L failed: connection refused")

        tunnel.open = refuse  # type: ignore[method-assign]
        tunnel.is_up = False  # type: ignore[attr-defined]

    _later(0.8, drop_for_good)
    with pytest.raises(ConnectionLost) as err:
        runner.drive()
    assert "Could not reopen the tunnel after 2 tries" in err.value.message
    assert "resume" in (err.value.hint or "")
    assert agent.cancels == []  # the job is kept
    assert store.load("s").state == "serving"


def test_sbatch_cut_off_finds_the_job_by_name_instead_of_submitting_twice(tmp_path: Path) -> None:
    runner, agent, conn, _say, store = make_runner(tmp_path, "idle")
    calls = {"n": 0}
    real = agent.submit

    def flaky(*args: object) -> tuple[str, str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SSHError("Connection to alvis2 closed by remote host.")
        return real(*args)  # type: ignore[arg-type]

    agent.submit = flaky  # type: ignore[method-assign]
    agent.find = lambda name: "77"  # type: ignore[method-assign]
    agent.starts.append(Event(Reply.STARTED, "alvis7-07 77"))
    agent.readies.extend(
        [Event(Reply.ADDRESS, "alvis7-07:8000"), Event(Reply.READY, "alvis7-07:8000")]
    )
    runner.drive()
    assert calls["n"] == 1 and store.load("s").job_id == "77"
    assert conn.opened >= 2  # reopened before asking by name


def test_resumed_without_a_job_id_never_submits(tmp_path: Path) -> None:
    runner, agent, _, _say, store = make_runner(tmp_path, "submitted")
    runner.record.job_id = ""
    with pytest.raises(SessionError, match="has no job on the cluster"):
        runner.drive()
    assert agent.submitted == 0
    assert store.load("s").state == "cleaned"


@pytest.mark.parametrize(
    ("event", "said"),
    [
        (Event(Reply.EXITED, "1"), "vLLM exited with status 1 before it was ready"),
        (Event(Reply.ENDED, "signal TERM"), "The job stopped before vLLM was ready (signal TERM)"),
        (
            Event(Reply.WAIT, job=JobInfo(source="sacct", state=JobState.FAILED)),
            "ended (FAILED) before vLLM was ready",
        ),
    ],
)
def test_vllm_dying_while_loading_fails_with_its_root_cause(
    tmp_path: Path, event: Event, said: str
) -> None:
    runner, agent, _, _say, store = make_runner(tmp_path, "running")
    agent.readies.append(event)
    with pytest.raises(ServerError) as err:
        runner.drive()
    assert said in err.value.message
    assert "RuntimeError: boom" in (err.value.details or "")  # the tail of vllm.err
    assert agent.cancels == [("42", "alvis-fsm-s-abc")]
    assert store.load("s").state == "cleaned"


def test_logs_tail_and_follow(tmp_path: Path) -> None:
    runner, agent, conn, say, _ = make_runner(tmp_path, "tunneled")
    show_logs(runner.link, 10, follow=False)
    assert say.text("log") == "RuntimeError: boom"
    agent.stream_script = "print('O|INFO loaded', flush=True); print('EXITED|3', flush=True)"
    show_logs(runner.link, 10, follow=True)
    assert "INFO loaded" in say.text("log")
    assert "vLLM exited with status 3" in say.text("info")
    assert not conn.up  # a look closes the connection it opened


def test_logs_follow_on_past_a_scheduler_that_does_not_answer(tmp_path: Path) -> None:
    """No answer is not news: `logs --follow` says so in words and goes on
    (before: a bare "UNKNOWN", and the logs stopped)."""
    runner, agent, _, say, _ = make_runner(tmp_path, "tunneled")
    agent.stream_script = (
        "print('UNKNOWN|squeue: timed out', flush=True);"
        "print('O|INFO later', flush=True); print('EXITED|0', flush=True)"
    )
    show_logs(runner.link, 10, follow=True)
    assert "Could not check job 42: squeue: timed out; following on" in say.text("warn")
    assert "INFO later" in say.text("log")
    assert "vLLM exited with status 0" in say.text("info")


def test_logs_of_a_session_without_a_job(tmp_path: Path) -> None:
    runner, *_ = make_runner(tmp_path, "idle")
    with pytest.raises(SessionError, match="no job yet"):
        show_logs(runner.link, 10, follow=False)


def test_stop_requested_while_waiting_is_noticed_between_queries(tmp_path: Path) -> None:
    runner, agent, _, _say, _store = make_runner(tmp_path, "submitted")
    runner.request_stop("shutdown")
    with pytest.raises(Interrupted, match="Stopped by shutdown"):
        runner.drive()
    assert agent.cancels == [("42", "alvis-fsm-s-abc")]
    assert isinstance(agent, FakeAgent) and time.time() > 0
