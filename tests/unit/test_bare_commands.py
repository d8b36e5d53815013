"""Bare `stop`, `resume`, `env` and `logs` act on live sessions only;
finished sessions are history, pruned after session.keep_days (issue 26,
item 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alvis_fsm.engine.session import service
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import ExitCode, SessionError

REPO = Path(__file__).resolve().parents[2]


def run(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ALVIS_FSM_SESSION__STATE_DIR": str(state),
        "NO_COLOR": "1",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "alvis_fsm", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input="",
    )


def finished(store: Store, *names: str) -> None:
    for name in names:
        store.save(
            SessionRecord(
                name=name,
                model=name.removeprefix("gw-"),
                state="cleaned",
                job_id="7",
                end_reason="stopped by the user",
            )
        )


def test_with_nothing_live_bare_stop_has_nothing_to_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    finished(Store(state), "gpt-oss-20b", "gw-gpt-oss-20b", "gw-tiny-real", "tiny-real")
    proc = run(state, "stop")
    assert proc.returncode == 0, proc.stderr
    assert "Nothing to stop: there is no live session (4 finished" in proc.stdout + proc.stderr
    assert "several" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["resume", "env"])
def test_with_nothing_live_bare_resume_and_env_say_so(tmp_path: Path, command: str) -> None:
    state = tmp_path / "state"
    finished(Store(state), "a", "b")
    proc = run(state, command)
    assert proc.returncode == ExitCode.SESSION
    assert proc.stdout == ""
    assert proc.stderr.startswith("[ERROR] There is no live session (2 finished: "), proc.stderr
    assert f"alvis-fsm {command} NAME" in proc.stderr


def test_the_one_live_session_is_picked_among_finished_ones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    finished(store, "a", "b", "c")
    store.save(SessionRecord(name="live", model="m", state="tunneled", local_port=58123))
    assert service.pick_session(store, None).name == "live"


def test_several_live_sessions_are_named_with_the_command(tmp_path: Path) -> None:
    store = Store(tmp_path)
    finished(store, "old")
    for name in ("x", "y"):
        store.save(SessionRecord(name=name, model=name, state="running"))
    with pytest.raises(SessionError) as err:
        service.pick_session(store, None, "stop")
    assert err.value.message == "There are several live sessions (x, y); name one"
    assert err.value.hint == "For example: alvis-fsm stop x"


def test_a_finished_session_is_still_reached_by_name(tmp_path: Path) -> None:
    store = Store(tmp_path)
    finished(store, "a")
    assert service.pick_session(store, "a").state == "cleaned"
    # logs, bare, falls back on the newest session (why did it end?).
    assert service.pick_session(store, None, "logs", latest=True).name == "a"


def test_finished_sessions_are_pruned_after_keep_days(tmp_path: Path) -> None:
    store = Store(tmp_path)
    finished(store, "old", "recent")
    store.save(SessionRecord(name="failed-old", model="m", state="failed", job_id="3"))
    store.save(SessionRecord(name="live-old", model="m", state="running", job_id="4"))
    week = time.time() - 8 * 86400
    for name in ("old", "failed-old", "live-old"):
        os.utime(store.path(name), (week, week))
    assert store.prune(0) == []  # 0 keeps them all
    assert store.prune(7) == ["old"]
    # A failed session's cancel may be unconfirmed, a live one is live: kept.
    assert store.names() == ["failed-old", "live-old", "recent"]


def test_keep_days_is_a_setting_with_default_7(tmp_path: Path) -> None:
    assert load_settings({"session": {"state_dir": str(tmp_path)}}).session.keep_days == 7
    with pytest.raises(Exception, match="keep_days"):
        load_settings({"session": {"state_dir": str(tmp_path), "keep_days": -1}})


def test_a_new_start_prunes(tmp_path: Path) -> None:
    cfg = load_settings(
        {"session": {"state_dir": str(tmp_path / "s")}, "slurm": {"account": "A", "gpus": "A40:1"}}
    )
    store = Store(cfg.state_dir)
    finished(store, "old")
    week = time.time() - 8 * 86400
    os.utime(store.path("old"), (week, week))
    service.create(cfg, service.StartOptions(model="gpt-oss-20b", time="1:00:00"), store=store)
    assert not store.exists("old")
