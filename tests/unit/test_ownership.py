"""Who drives a session (engine/session/ownership.py): a supervisor taken over, a
foreground client asked to stop, a stop when nobody drives, and the
supervisor's own loop, through the fake agent object. The other drivers are
real processes holding the session's real lock (the store's flock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from fake_cluster import FakeAgent, FakeConn, FakeTunnel, Say

from alvis_fsm.cluster.agent import Event
from alvis_fsm.cluster.tunnel import Verified
from alvis_fsm.engine.session import ownership
from alvis_fsm.engine.session.store import Driver, SessionRecord, Store
from alvis_fsm.engine.settings.model import Settings, load_settings
from alvis_fsm.errors import ConnectionLost, ServerError, SessionError

# A driver in another process: it takes the lock, names itself in the record
# (client or supervisor) and holds on until a SIGTERM ends it.
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from alvis_fsm.engine.session.store import Driver, Store
    store = Store(Path(sys.argv[1]))
    with store.lock("s"):
        record = store.load("s")
        record.drive_as(Driver(sys.argv[2]), os.getpid())
        store.save(record)
        time.sleep(120)
    """
)


def settings(tmp: Path) -> Settings:
    return load_settings(
        {
            "session": {"state_dir": str(tmp / "state")},
            "slurm": {"account": "NAISS2025-22-1522", "gpus": "A40:1"},
        }
    )


def handles(agent: FakeAgent) -> dict[str, Any]:
    conn = FakeConn()
    return {
        "conn": conn,
        "agent": agent,
        "tunnel_factory": FakeTunnel,
        "verifier": lambda port, key, deadline, served, **_: Verified(["m"], 0.01),
    }


def live(store: Store, detached: bool = False) -> SessionRecord:
    record = SessionRecord(
        name="s",
        model="m",
        state="tunneled",
        local_port=58000,
        job_id="41",
        run_dir="~/runs/x",
        job_name="alvis-fsm-s-a",
        driver=Driver.HANDING_OVER if detached else Driver.NOBODY,
    )
    store.save(record)
    return record


def driver(store: Store, who: Driver) -> subprocess.Popen[bytes]:
    """Start a driver and wait until it holds the lock and is recorded."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(store.dir), who.value],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    for _ in range(600):
        if store.holder("s") == proc.pid and store.load("s").driven_by(who, proc.pid):
            return proc
        assert proc.poll() is None, "the stand-in driver exited"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the stand-in driver did not take the lock")


def test_a_stop_nobody_drives_cancels_and_a_second_says_it_is_done(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store)
    agent, say = FakeAgent(), Say()
    assert ownership.stop_session(cfg, store, "s", say, **handles(agent)) is None
    assert agent.cancels == [("41", "alvis-fsm-s-a")]
    assert store.load("s").state == "cleaned"
    again = ownership.stop_session(cfg, store, "s", say, **handles(agent))
    assert again is not None and len(agent.cancels) == 1
    assert ("result", f"Session 's' is already stopped ({again.outcome()}).") in say.lines


def test_a_stop_takes_the_session_over_from_its_supervisor(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, detached=True)
    proc = driver(store, Driver.SUPERVISOR)
    try:
        agent = FakeAgent()
        assert ownership.stop_session(cfg, store, "s", Say(), **handles(agent)) is None
        assert proc.wait(30) != 0  # ended by the SIGTERM, its job left to the stop
        assert agent.cancels == [("41", "alvis-fsm-s-a")]
        assert store.load("s").state == "cleaned" and not store.locked("s")
    finally:
        proc.kill()
        proc.wait()


def test_a_stop_asks_a_foreground_client_to_stop_and_waits(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store)
    proc = driver(store, Driver.CLIENT)
    try:
        record = store.load("s")
        assert ownership.take_over(store, record) is False  # a client is not a supervisor
        say, agent = Say(), FakeAgent()
        ownership.stop_session(cfg, store, "s", say, **handles(agent))
        assert proc.wait(30) != 0
        assert ("info", f"Asking the client (pid {proc.pid}) to stop session 's'...") in say.lines
        assert store.load("s").state == "cleaned"
    finally:
        proc.kill()
        proc.wait()


def test_a_driver_that_did_not_say_its_pid_is_not_guessed_at(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    with pytest.raises(SessionError, match="did not say its pid") as caught:
        ownership.stop_client(Say(), store, "s", 0)
    assert caught.value.hint and "Ctrl+C" in caught.value.hint
    with pytest.raises(SessionError, match="did not say its pid"):
        ownership.stop_client(Say(), store, "s", os.getpid())


def test_a_session_started_before_the_upgrade_still_resumes(tmp_path: Path) -> None:
    """A detached session whose record format 1 wrote (its supervisor gone
    with the laptop's reboot): `resume` finds nobody to take over from,
    drives it as a client and hands it over again; the record is rewritten
    in the current form."""
    from alvis_fsm.engine.session import service

    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    store.ensure()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    old = {
        "name": "s",
        "model": "m",
        "state": "running",
        "node": "alvis7-07",
        "port": 8000,
        "job_id": "41",
        "job_name": "alvis-fsm-s-a",
        "run_dir": "~/runs/x",
        "detached": True,
        "client_pid": gone.pid,
        "supervisor_pid": gone.pid,
        "format": 1,
    }
    store.path("s").write_text(json.dumps(old))
    record = store.load("s")
    assert record.driven_by(Driver.SUPERVISOR, gone.pid)
    assert ownership.take_over(store, record) is False  # nobody holds the lock
    agent = FakeAgent()
    agent.readies.extend([Event("ADDRESS", "alvis7-07:8000"), Event("READY", "alvis7-07:8000")])
    got = service.resume(cfg, store, "s", Say(), detach=True, **handles(agent))
    assert got.state == "tunneled" and agent.cancels == []
    written = json.loads(store.path("s").read_text())
    assert (written["state"], written["driver"], written["driver_pid"]) == (
        "tunneled",
        "handing over",
        0,
    )
    assert "supervisor_pid" not in written and "client_pid" not in written


def test_nobody_to_take_over_and_a_gone_process(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    record = live(store, detached=True)
    assert ownership.take_over(store, record) is False  # the lock is free
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert ownership.terminate(gone.pid, "refused") is False
    assert ownership.wait_for_driver(store, "s", driven=False) is False


def test_the_supervisor_log_is_in_the_sessions_folder(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    assert ownership.supervisor_log(store, "s") == store.sessions / "s.supervisor.log"


# -- the supervisor's loop ----------------------------------------------------------------


def test_the_supervisor_names_itself_while_it_drives_and_lets_go_after(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, detached=True)
    seen: list[tuple[bool, Driver, int]] = []

    def drive(runner: Any) -> None:
        record = store.load("s")
        seen.append((runner.supervised, record.driver, record.driver_pid))

    ownership.run_supervisor(cfg, store, "s", Say(), drive=drive, **handles(FakeAgent()))
    assert seen == [(True, Driver.SUPERVISOR, os.getpid())]
    assert store.load("s").driver is Driver.NOBODY and not store.locked("s")


def test_the_supervisor_waits_out_a_lost_network_and_stops_on_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alvis_fsm.retry import Backoff

    monkeypatch.setattr(Backoff, "wait", lambda self: None)  # no sleeping between tries
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, detached=True)
    steps: list[BaseException] = [ConnectionLost("the login node is away"), ServerError("gone")]

    def drive(runner: Any) -> None:
        raise steps.pop(0)

    say = Say()
    with store.lock("s"):
        ownership.supervise(cfg, store, "s", say, drive=drive, **handles(FakeAgent()))
    assert steps == []
    assert [kind for kind, text in say.lines if "the login node is away" in text] == ["warn"]


def test_a_supervisor_has_nothing_to_watch_after_the_end_or_the_time_limit(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    record = live(store, detached=True)
    record.running_since = time.time() - 7200
    record.time_limit_s = 3600  # an hour, ended an hour ago
    store.save(record)

    def drive(runner: Any) -> None:
        raise AssertionError("nothing to drive")

    with store.lock("s"):
        ownership.supervise(cfg, store, "s", Say(), drive=drive)
        record.time_limit_s = 0
        record.state = "cleaned"
        store.save(record)
        ownership.supervise(cfg, store, "s", Say(), drive=drive)


def test_a_supervisor_whose_starter_keeps_the_lock_gives_up(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, detached=True)
    with store.lock("s"), pytest.raises(SessionError):
        ownership.run_supervisor(cfg, store, "s", Say(), wait=0.3)


def test_a_handover_spawns_the_fronts_command_with_its_output_in_the_log(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    record = live(store, detached=True)
    said = "print('supervisor of', __import__('sys').argv[1])"
    handover = ownership.Handover(store, lambda name: [sys.executable, "-c", said, name])
    say = Say()
    handover.spawn(record)
    assert handover.wait(say, timeout=30) is False  # it exited without taking the lock
    assert [kind for kind, _ in say.lines] == ["warn"]
    log = ownership.supervisor_log(store, "s")
    assert log.read_text(encoding="utf-8") == "supervisor of s\n"
    assert log.stat().st_mode & 0o777 == 0o600


def test_a_driver_that_let_go_is_not_waited_for(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    live(store, detached=True)
    assert ownership.wait_for_driver(store, "s", driven=True) is False
