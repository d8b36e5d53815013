"""The session store: atomic 0600 writes in a 0700 directory, corrupt and
newer files reported (naming the file) and never touched, the lock."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from alvis_fsm.engine.session.store import (
    DRIVER_TRANSITIONS,
    FORMAT,
    Driver,
    SessionRecord,
    Store,
    default_state_dir,
)
from alvis_fsm.errors import ExitCode, SessionError, UsageError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


def record(name: str = "s1", **values: object) -> SessionRecord:
    rec = SessionRecord(name=name, model="lab-ok")
    for key, value in values.items():
        setattr(rec, key, value)
    return rec


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- writing ---------------------------------------------------------------------


def test_save_load_round_trip(store: Store) -> None:
    rec = record(
        job_id="42",
        state="tunneled",
        local_port=58000,
        api_key="afsm-secret",
        running_since=1.5,
        history=[["idle", "t0"]],
        entered_at={"idle": 2.0},
    )
    store.save(rec)
    assert store.load("s1") == rec
    assert store.names() == ["s1"]
    assert store.load("s1").live


def test_file_0600_dir_0700(store: Store, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store.save(record(api_key="afsm-secret"))
    finally:
        os.umask(old)
    assert mode(store.dir) == 0o700
    assert mode(store.sessions) == 0o700
    assert mode(store.path("s1")) == 0o600


def test_existing_loose_dir_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "state" / "sessions").mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "state", 0o755)
    store = Store(tmp_path / "state")
    store.save(record())
    assert mode(store.dir) == 0o700 and mode(store.sessions) == 0o700


def test_save_is_atomic_rename(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(record(job_id="1"))
    before = store.path("s1").read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save(record(job_id="2"))
    # The old file is intact and the temp file is gone.
    assert store.path("s1").read_bytes() == before
    assert sorted(p.name for p in store.sessions.iterdir()) == ["s1.json"]


def test_save_writes_complete_json(store: Store) -> None:
    store.save(record(job_id="7"))
    data = json.loads(store.path("s1").read_text())
    assert data["job_id"] == "7"
    assert data["format"] == FORMAT
    assert store.path("s1").read_text().endswith("\n")


# -- reading bad files -------------------------------------------------------------

BAD = {
    "garbage": b"\x00\xff{not json",
    "truncated": b'{"name": "s1", "model": "lab-ok", "state": "tun',
    "not-a-dict": b"[1, 2]",
    "null": b"null",
    "no-model": b'{"name": "s1"}',
    "wrong-type": b'{"name": "s1", "model": "lab-ok", "local_port": "58000"}',
    "bool-for-int": b'{"name": "s1", "model": "lab-ok", "port": true}',
    "bad-state": b'{"name": "s1", "model": "lab-ok", "state": "flying"}',
    "bad-history": b'{"name": "s1", "model": "lab-ok", "history": [1]}',
    "format-string": b'{"name": "s1", "model": "lab-ok", "format": "x"}',
    "bad-driver": b'{"name": "s1", "model": "lab-ok", "driver": "ghost"}',
    "format-1-pid-string": b'{"name": "s1", "model": "lab-ok", "format": 1, "client_pid": "7"}',
    "other-name": b'{"name": "s2", "model": "lab-ok"}',
    "deep": b"[" * 100000,
}


@pytest.mark.parametrize("content", list(BAD.values()), ids=list(BAD))
def test_bad_file_reported_and_kept(store: Store, content: bytes) -> None:
    store.ensure()
    path = store.path("s1")
    path.write_bytes(content)
    with pytest.raises(SessionError) as info:
        store.load("s1")
    assert str(path) in info.value.message
    assert info.value.exit_code == ExitCode.SESSION
    assert info.value.hint and "left as it is" in info.value.hint
    # Not overwritten by a save, nor by taking the lock.
    with pytest.raises(SessionError):
        store.save(record())
    with pytest.raises(SessionError), store.lock("s1"):
        pass
    assert path.read_bytes() == content
    assert sorted(p.name for p in store.sessions.iterdir() if not p.name.startswith(".")) == [
        "s1.json"
    ]
    records, errors = store.all()
    assert records == [] and len(errors) == 1


def test_newer_format_reported_and_kept(store: Store) -> None:
    store.ensure()
    path = store.path("s1")
    content = json.dumps({"name": "s1", "model": "m", "format": FORMAT + 1, "new_key": 1}).encode()
    path.write_bytes(content)
    with pytest.raises(SessionError, match="newer alvis-fsm"):
        store.load("s1")
    with pytest.raises(SessionError, match="newer alvis-fsm"):
        store.save(record())
    assert path.read_bytes() == content


def test_unknown_keys_of_same_format_are_ignored(store: Store) -> None:
    store.ensure()
    store.path("s1").write_text(json.dumps({"name": "s1", "model": "m", "later": True}))
    assert store.load("s1").model == "m"


# Format 1 said who drives a session in three fields; format 2 says it once.
FORMAT_1_DRIVERS = {
    "nobody": ({}, Driver.NOBODY, 0),
    "foreground client": ({"client_pid": 700}, Driver.CLIENT, 700),
    "detached, handing over": ({"detached": True}, Driver.HANDING_OVER, 0),
    "supervisor": (
        {"detached": True, "client_pid": 800, "supervisor_pid": 800},
        Driver.SUPERVISOR,
        800,
    ),
    "supervisor, waiting out the network": (
        {"detached": True, "supervisor_pid": 800},
        Driver.SUPERVISOR,
        800,
    ),
    "resumed in the foreground after a supervisor": (
        {"detached": True, "client_pid": 900, "supervisor_pid": 800},
        Driver.CLIENT,
        900,
    ),
}


@pytest.mark.parametrize(
    ("old", "driver", "pid"), list(FORMAT_1_DRIVERS.values()), ids=list(FORMAT_1_DRIVERS)
)
def test_a_format_1_record_is_read_and_written_in_the_new_form(
    store: Store, old: dict[str, Any], driver: Driver, pid: int
) -> None:
    """A session started before the upgrade: its driver read from the old
    fields; saved, the record is written in the current form only."""
    store.ensure()
    data = {"name": "s1", "model": "m", "state": "tunneled", "job_id": "41", "format": 1, **old}
    store.path("s1").write_text(json.dumps(data))
    loaded = store.load("s1")
    assert (loaded.driver, loaded.driver_pid, loaded.job_id) == (driver, pid, "41")
    store.save(loaded)
    written = json.loads(store.path("s1").read_text())
    assert written["format"] == FORMAT
    assert (written["driver"], written["driver_pid"]) == (driver.value, pid)
    assert not {"detached", "client_pid", "supervisor_pid"} & set(written)
    assert store.load("s1") == loaded


def test_the_driver_changes_only_as_declared() -> None:
    r = record()
    assert r.driver is Driver.NOBODY
    with pytest.raises(ValueError, match="nobody -> handing over"):
        r.drive_as(Driver.HANDING_OVER)  # only a client detaches
    r.drive_as(Driver.CLIENT, 700)
    assert r.driven_by(Driver.CLIENT, 700) and not r.driven_by(Driver.SUPERVISOR, 700)
    r.drive_as(Driver.HANDING_OVER, 700)
    assert (r.driver, r.driver_pid) == (Driver.HANDING_OVER, 0)  # nobody's pid
    r.drive_as(Driver.SUPERVISOR, 800)
    r.drive_as(Driver.SUPERVISOR, 800)  # the same driver: no change
    r.let_go()
    assert (r.driver, r.driver_pid) == (Driver.NOBODY, 0)
    for source, dests in DRIVER_TRANSITIONS.items():
        assert source not in dests  # a move to itself is no move
        assert Driver.NOBODY in dests or source is Driver.NOBODY  # every driver can let go


def test_missing_session(store: Store) -> None:
    with pytest.raises(SessionError, match="No session named 'nope'"):
        store.load("nope")


def test_all_reports_bad_and_loads_good(store: Store) -> None:
    store.save(record("good"))
    store.path("bad").write_text("{")
    records, errors = store.all()
    assert [r.name for r in records] == ["good"]
    assert len(errors) == 1 and "bad.json" in errors[0].message


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "x" * 42, "-x", "a b"])
def test_invalid_names(store: Store, name: str) -> None:
    with pytest.raises(UsageError):
        store.path(name)


# -- lock ----------------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from alvis_fsm.engine.session.store import Store
    with Store(Path(sys.argv[1])).lock("s1"):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_lock_excludes_other_process_and_names_it(store: Store) -> None:
    store.save(record())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store.dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert store.locked("s1")
        assert store.holder("s1") == holder.pid
        driven = f"being driven by another alvis-fsm \\(pid {holder.pid}\\)"
        with pytest.raises(SessionError, match=driven), store.lock("s1"):
            pass
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no stale lock.
    assert not store.locked("s1")
    assert store.holder("s1") is None
    with store.lock("s1"):
        assert store.holder("s1") == os.getpid()
    assert not store.locked("s1")


def test_lock_released_on_exception(store: Store) -> None:
    with pytest.raises(RuntimeError), store.lock("s1"):
        raise RuntimeError("boom")
    assert not store.locked("s1")


def test_lock_file_private(store: Store) -> None:
    with store.lock("s1"):
        pass
    assert mode(store.sessions / ".s1.lock") == 0o600
    assert store.names() == []  # the lock file is not a session


# -- the state dir without the settings ---------------------------------------------------


def test_default_state_dir(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert default_state_dir() == isolated_home / ".alvis-vllm"
    conf = tmp_path / "conf.toml"
    conf.write_text('[session]\nstate_dir = "~/elsewhere"\n')
    monkeypatch.setenv("ALVIS_FSM_CONFIG", str(conf))
    assert default_state_dir() == isolated_home / "elsewhere"
    monkeypatch.setenv("ALVIS_FSM_SESSION__STATE_DIR", str(tmp_path / "env"))
    assert default_state_dir() == tmp_path / "env"


def test_default_state_dir_matches_settings(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from alvis_fsm.engine.settings.model import load_settings

    conf = tmp_path / "conf.toml"
    conf.write_text('[session]\nstate_dir = "~/from-file"\n')
    monkeypatch.setenv("ALVIS_FSM_CONFIG", str(conf))
    assert default_state_dir() == load_settings().state_dir
    monkeypatch.setenv("alvis_fsm_session__state_dir", str(tmp_path / "lower"))
    assert default_state_dir() == load_settings().state_dir == tmp_path / "lower"


def test_default_state_dir_ignores_broken_file(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    conf = tmp_path / "conf.toml"
    conf.write_text("[session\n")
    monkeypatch.setenv("ALVIS_FSM_CONFIG", str(conf))
    assert default_state_dir() == isolated_home / ".alvis-vllm"


def test_wait_unlocked_returns_at_once_when_free(store: Store) -> None:
    started = time.monotonic()
    assert store.wait_unlocked("s1", timeout=5)  # never locked: no lock file
    with store.lock("s1"):
        pass
    assert store.wait_unlocked("s1", timeout=5)
    assert time.monotonic() - started < 1


def test_wait_unlocked_times_out_while_held(store: Store) -> None:
    with store.lock("s1"):
        started = time.monotonic()
        assert not store.wait_unlocked("s1", timeout=0.3, poll=0.05)
        assert 0.3 <= time.monotonic() - started < 2
        assert store.locked("s1")


def test_wait_unlocked_returns_once_the_holder_lets_go(store: Store) -> None:
    store.save(record())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store.dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        killer = threading.Timer(0.3, holder.kill)
        killer.start()
        started = time.monotonic()
        assert store.wait_unlocked("s1", timeout=30, poll=0.05)
        assert time.monotonic() - started < 10
        killer.join()
    finally:
        holder.kill()
        holder.wait()
    assert not store.locked("s1")
