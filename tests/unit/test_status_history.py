"""`status` lists live sessions and recent ones; finished sessions older than
a day are history, listed by `status --all` (issue 26, item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.fronts.cli.commands.status import RECENT_S, is_history

REPO = Path(__file__).resolve().parents[2]


def status(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALVIS_FSM_")}
    env["ALVIS_FSM_SESSION__STATE_DIR"] = str(state)
    return subprocess.run(
        [sys.executable, "-m", "alvis_fsm", "status", "--offline", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def record(name: str, state: State, ended_ago: float) -> SessionRecord:
    r = SessionRecord(name=name, model="lab-ok", state=state.value, job_id="7")
    r.entered_at[state.value] = time.time() - ended_ago
    return r


def test_old_finished_sessions_are_history(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save(record("old", State.CLEANED, 3 * 86400))
    store.save(record("recent", State.CLEANED, 60))
    store.save(record("live", State.TUNNELED, 60))
    out = status(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "recent: cleaned" in out.stdout and "live: tunneled" in out.stdout
    assert "old:" not in out.stdout
    assert "1 finished session older than a day: `alvis-fsm status --all`" in out.stdout
    every = status(tmp_path, "--all")
    assert "old: cleaned" in every.stdout and "older than a day" not in every.stdout
    # By name, history is still there; and JSON follows the same rule.
    assert "old: cleaned" in status(tmp_path, "old").stdout
    names = {s["name"] for s in json.loads(status(tmp_path, "--json").stdout)["sessions"]}
    assert names == {"recent", "live"}
    names = {s["name"] for s in json.loads(status(tmp_path, "--json", "--all").stdout)["sessions"]}
    assert names == {"old", "recent", "live"}


def test_only_ended_sessions_become_history() -> None:
    now = time.time()
    assert is_history(record("a", State.CLEANED, RECENT_S + 5), now)
    assert is_history(record("b", State.FAILED, RECENT_S + 5), now)
    assert not is_history(record("c", State.CLEANED, RECENT_S - 5), now)
    assert not is_history(record("d", State.TUNNELED, 10 * RECENT_S), now)
    assert not is_history(SessionRecord(name="e", model="m", state=State.CLEANED.value), now)
