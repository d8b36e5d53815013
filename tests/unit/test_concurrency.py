"""Many sessions in one process (issue 13): the engine has no signals, no
terminal and no module-level state, so a front such as the gateway can
drive sessions in threads of its own and stop each with request_stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from alvis_fsm.cluster.agent import Event
from alvis_fsm.engine.session.runner import Runner
from alvis_fsm.engine.session.store import Driver
from alvis_fsm.errors import Interrupted
from tests.unit.fake_cluster import PENDING, FakeAgent, Say, make_runner

N = 20


def _scripted(agent: FakeAgent, i: int) -> None:
    agent.starts.extend(
        [Event("WAIT", job=PENDING, age=1), Event("STARTED", f"alvis7-{i:02d} {100 + i}")]
    )
    agent.readies.extend(
        [Event("ADDRESS", f"alvis7-{i:02d}:8000"), Event("READY", f"alvis7-{i:02d}:8000")]
    )


def _drive(runner: Runner, outcome: dict[str, BaseException | None]) -> None:
    try:
        runner.drive()
        outcome[runner.record.name] = None
    except BaseException as exc:  # recorded and asserted on by the test
        outcome[runner.record.name] = exc


def _wait_for(predicate: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_twenty_sessions_in_threads_serve_then_stop_cleanly(tmp_path: Path) -> None:
    runners: list[tuple[Runner, FakeAgent, Say]] = []
    for i in range(N):
        runner, agent, _, say, store = make_runner(tmp_path, "idle", detach=False, name=f"s{i:02d}")
        _scripted(agent, i)
        runners.append((runner, agent, say))
    assert threading.current_thread() is threading.main_thread()
    outcome: dict[str, BaseException | None] = {}
    threads = [
        threading.Thread(target=_drive, args=(r, outcome), name=r.record.name)
        for r, _, _ in runners
    ]
    for t in threads:
        t.start()
    # Every session reaches `tunneled` (its log stream running) on its own thread.
    # (The record says tunneled as soon as the state is entered; its step,
    # serve, starts the log stream right after.)
    assert _wait_for(
        lambda: all(
            store.load(r.record.name).state == "tunneled" and a.streams == 1 for r, a, _ in runners
        ),
        timeout=60,
    )
    assert all(a.streams == 1 and a.submitted == 1 for _, a, _ in runners)
    for r, _, _ in runners:
        r.request_stop("gateway shutdown")
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    for r, agent, say in runners:
        name = r.record.name
        exc = outcome[name]
        # Stopped while serving: like Ctrl+C in a terminal, the normal end.
        assert exc is None or isinstance(exc, Interrupted), (name, exc)
        assert agent.cancels == [("42", f"alvis-fsm-{name}-abc")], name
        saved = store.load(name)
        assert saved.state == "cleaned" and saved.driver is Driver.NOBODY, name
        assert "Cleaned up job 42 successfully" in say.text("info"), name
        assert r.stream.proc is None  # the log stream process was stopped
    # Each session kept to its own record: 20 files, no two mixed up.
    assert sorted(rec.name for rec in store.all()[0]) == [f"s{i:02d}" for i in range(N)]


@pytest.mark.parametrize("state", ["idle", "submitted", "running"])
def test_request_stop_while_waiting_cancels_and_cleans(tmp_path: Path, state: str) -> None:
    runner, agent, _, _say, store = make_runner(tmp_path, state, detach=False)
    # The cluster never moves on: the session waits until it is stopped.
    thread = threading.Thread(target=_drive, args=(runner, outcome := {}))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()
    runner.request_stop("idle timeout")
    thread.join(10)
    assert not thread.is_alive()
    exc = outcome["s"]
    assert isinstance(exc, Interrupted) and "Stopped by idle timeout" in exc.message
    assert agent.cancels == [("42", "alvis-fsm-s-abc")]
    assert store.load("s").state == "cleaned"


def test_the_engine_installs_no_signal_handler(tmp_path: Path) -> None:
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    runner, agent, _, _say, store = make_runner(tmp_path, "idle", detach=True)
    _scripted(agent, 1)
    seen: list[object] = []
    real = signal.signal

    def spy(*args: object) -> object:
        seen.append(args)
        return real(*args)  # type: ignore[arg-type]

    signal.signal = spy  # type: ignore[assignment]
    try:
        runner.drive()
    finally:
        signal.signal = real
    assert seen == [] and store.load("s").state == "tunneled"
    assert {s: signal.getsignal(s) for s in before} == before
