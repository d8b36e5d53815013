"""The gateway's command-line surface (issue 14) without a cluster: its
entry in the state dir (gateway.json under gateway.lock), `gateway
--detach` and `gateway stop` as real processes (a gateway with no request
starts no job), `env --gateway`, `status` and `logs MODEL`. The lab test
(tests/integration/test_gateway_cli.py) does the same with jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.errors import ExitCode, SessionError
from alvis_fsm.fronts.gateway import instance

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def cli(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ALVIS_FSM_SESSION__STATE_DIR": str(state),
        "NO_COLOR": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "alvis_fsm", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- gateway.json --------------------------------------------------------------------


def test_the_entry_is_published_private_and_removed_at_the_end(state: Path) -> None:
    assert instance.running(state) is None and not instance.claimed(state)
    with instance.claim(state) as me:
        assert instance.claimed(state) and instance.running(state) is None  # not listening yet
        published = me.publish(58999, "/x/gateway.log")
        path = instance.file_path(state)
        assert path.stat().st_mode & 0o777 == 0o600
        found = instance.running(state)
        assert found == published and found.pid == os.getpid() and found.port == 58999
        assert found.base_url == "http://localhost:58999/v1" and found.log == "/x/gateway.log"
        assert json.loads(path.read_text())["base_url"] == found.base_url
    assert not instance.file_path(state).exists()
    assert instance.running(state) is None and not instance.claimed(state)


def test_a_second_gateway_is_refused_naming_the_port_and_gateway_stop(state: Path) -> None:
    with instance.claim(state) as me:
        me.publish(58123)
        with pytest.raises(SessionError) as refused, instance.claim(state):
            pass
        assert (
            "port 58123" in refused.value.message and f"pid {os.getpid()}" in refused.value.message
        )
        assert refused.value.hint and "alvis-fsm gateway stop" in refused.value.hint
        assert instance.running(state) is not None  # the first one's entry is untouched


def test_a_stale_entry_is_ignored_and_replaced(state: Path) -> None:
    state.mkdir(parents=True)
    # Left by a gateway that was killed: its lock went with it.
    dead = {"pid": 4_000_000, "port": 58321, "started": 1.0, "log": ""}
    instance.file_path(state).write_text(json.dumps(dead))
    assert instance.running(state) is None and not instance.claimed(state)
    with instance.claim(state) as me:
        assert not instance.file_path(state).exists()
        me.publish(58322)
        found = instance.running(state)
        assert found is not None and found.port == 58322 and found.pid == os.getpid()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"pid": 0, "port": 1, "started": 1}',
        '{"pid": 5, "port": 70000, "started": 1}',
        '{"pid": true, "port": 5, "started": 1}',
        '{"pid": 5, "port": 5}',
    ],
)
def test_a_damaged_entry_is_no_gateway(text: str) -> None:
    assert instance.parse(text) is None


def test_the_background_gateways_error_is_its_own(tmp_path: Path) -> None:
    from alvis_fsm.fronts.cli.commands.gateway import failure

    log = "\n".join(
        [
            "2025-01-01 10:00:00 something before",
            "[ERROR] Local port 58080 is already in use",
            "    verbatim detail",
            "[HINT] Find what holds it",
            "[HINT] or pick another port",
        ]
    )
    exc = failure(7, log, tmp_path / "gateway.log")
    assert exc.message == "Local port 58080 is already in use"
    assert exc.details == "verbatim detail" and exc.exit_code == ExitCode.SESSION
    assert exc.hint is not None
    assert exc.hint.splitlines()[:2] == ["Find what holds it", "or pick another port"]
    assert str(tmp_path / "gateway.log") in exc.hint
    crashed = failure(1, "Traceback ...", tmp_path / "gateway.log")
    assert "exited with status 1" in crashed.message


# -- the commands --------------------------------------------------------------------


def test_gateway_stop_takes_no_gateway_options(state: Path) -> None:
    done = cli(state, "gateway", "--port", "58001", "stop")
    assert done.returncode == ExitCode.USAGE
    assert "--port goes with `alvis-fsm gateway`" in done.stderr


def test_gateway_stop_with_none_running_is_not_a_failure(state: Path) -> None:
    done = cli(state, "gateway", "stop")
    assert done.returncode == 0
    assert "No gateway is running; nothing to stop." in done.stdout


def test_gateway_help_names_detach_and_stop(state: Path) -> None:
    done = cli(state, "gateway", "--help")
    assert done.returncode == 0 and "--detach" in done.stdout and "stop" in done.stdout


def test_env_gateway_without_one_running_uses_the_setting_and_says_so(state: Path) -> None:
    from alvis_fsm.fronts.gateway.keys import gateway_key

    done = cli(state, "env", "--gateway")
    assert done.returncode == 0
    key = gateway_key(state)  # made by env, the one the gateway will use
    assert done.stdout == (
        f"export OPENAI_BASE_URL=http://localhost:58080/v1\nexport OPENAI_API_KEY={key}\n"
    )
    assert "No gateway is running" in done.stderr
    as_json = cli(state, "env", "--gateway", "--json")
    assert json.loads(as_json.stdout) == {
        "name": "gateway",
        "api_key": key,
        "model": None,
        "base_url": "http://localhost:58080/v1",
    }
    assert as_json.stderr == ""
    assert cli(state, "env", "--gateway", "lab-ok").returncode == ExitCode.USAGE


def test_env_status_and_logs_see_a_running_gateway(state: Path) -> None:
    store = Store(state)
    store.save(
        SessionRecord(
            name="gw-lab-ok",
            model="lab-ok",
            state=State.CLEANED.value,
            job_id="17",
            end_reason="idle timeout",
        )
    )
    store.save(SessionRecord(name="other", model="lab-ok", state=State.CLEANED.value))
    with instance.claim(state) as me:  # this test process is "the gateway"
        me.publish(58777)
        env = cli(state, "env", "--gateway")
        assert env.returncode == 0 and env.stderr == ""
        assert env.stdout.startswith("export OPENAI_BASE_URL=http://localhost:58777/v1\n")
        status = cli(state, "status", "--offline")
        lines = status.stdout.splitlines()
        assert lines[0].startswith(
            f"gateway: running · pid {os.getpid()} · http://localhost:58777/v1"
        )
        assert any(x.startswith("gw-lab-ok (gateway): cleaned · job 17") for x in lines)
        assert any(x.startswith("other: cleaned") for x in lines)
        data = json.loads(cli(state, "status", "--offline", "--json").stdout)
        assert data["gateway"]["port"] == 58777 and data["gateway"]["pid"] == os.getpid()
        marks = {s["name"]: s["gateway"] for s in data["sessions"]}
        assert marks == {"gw-lab-ok": True, "other": False}
    assert json.loads(cli(state, "status", "--offline", "--json").stdout)["gateway"] is None


def test_logs_model_finds_the_gateways_session(state: Path) -> None:
    from alvis_fsm.fronts.gateway.slot.sessions import session_of as resolve

    store = Store(state)
    assert resolve(store, "lab-ok") == "lab-ok"  # nothing: the usual "no session" later
    store.save(SessionRecord(name="gw-lab-ok", model="lab-ok"))
    assert resolve(store, "lab-ok") == "gw-lab-ok"
    assert resolve(store, "gw-lab-ok") == "gw-lab-ok"
    assert resolve(store, None) is None
    assert resolve(store, "openai/x") == "openai/x"  # refused later, as before
    # After a rollover: the successor's lane serves, the first lane is cleaned.
    store.save(
        SessionRecord(
            name="gw-lab-ok", model="lab-ok", state="cleaned", started="2026-11-27T10:00:00+00:00"
        )
    )
    store.save(
        SessionRecord(
            name="gw-lab-ok-2",
            model="lab-ok",
            state="tunneled",
            started="2026-11-27T09:00:00+00:00",
        )
    )
    assert resolve(store, "lab-ok") == "gw-lab-ok-2"
    # `status MODEL` shows the same session.
    shown = json.loads(cli(state, "status", "lab-ok", "--offline", "--json").stdout)
    assert [s["name"] for s in shown["sessions"]] == ["gw-lab-ok-2"]
    store.save(SessionRecord(name="lab-ok", model="lab-ok", state="running"))
    assert resolve(store, "lab-ok") == "lab-ok"  # a live session of that name comes first
    # A finished (or never submitted) one gives way to the gateway's live
    # session of the model, the one serving it (issue 26, item 6)...
    store.save(SessionRecord(name="lab-ok", model="lab-ok", state="cleaned"))
    assert resolve(store, "lab-ok") == "gw-lab-ok-2"
    store.save(SessionRecord(name="lab-ok", model="lab-ok"))
    assert resolve(store, "lab-ok") == "gw-lab-ok-2"
    # ... and is history again once nothing of the model is live.
    store.save(SessionRecord(name="gw-lab-ok-2", model="lab-ok", state="cleaned"))
    assert resolve(store, "lab-ok") == "lab-ok"


# -- --detach and stop, real processes --------------------------------------------------


@pytest.fixture
def gateway_reaped(state: Path, no_gateway_left: list[Path]) -> None:
    no_gateway_left.append(state)


def test_detach_returns_listening_and_stop_ends_it(state: Path, gateway_reaped: None) -> None:
    import httpx

    port = free_port()
    done = cli(state, "gateway", "--detach", "--port", str(port))
    assert done.returncode == 0, done.stderr
    found = instance.running(state)
    assert found is not None and found.port == port
    assert found.log == str(state / "gateway.log")
    key = (state / "gateway.key").read_text().strip()
    assert (
        done.stdout
        == f"export OPENAI_BASE_URL=http://localhost:{port}/v1\nexport OPENAI_API_KEY={key}\n"
    )
    assert str(state / "gateway.log") in done.stderr and "alvis-fsm gateway stop" in done.stderr
    # It listens (returned only once it did), and the key is not in its log.
    with httpx.Client(trust_env=False, timeout=10) as http:
        listed = http.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
        )
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    assert key not in (state / "gateway.log").read_text()
    # A second one is refused, naming the port and `gateway stop`.
    again = cli(state, "gateway", "--detach", "--port", str(free_port()))
    assert again.returncode == ExitCode.SESSION and again.stdout == ""
    assert f"port {port}" in again.stderr and "alvis-fsm gateway stop" in again.stderr
    assert cli(state, "gateway", "--port", str(free_port())).returncode == ExitCode.SESSION
    stopped = cli(state, "gateway", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "Gateway stopped; nothing left running" in stopped.stdout
    assert not instance.claimed(state) and not (state / "gateway.json").exists()
    deadline = time.monotonic() + 10  # its lock is let go just before it exits
    while alive(found.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(found.pid)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has ended)."""
    stat = subprocess.run(
        ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
    ).stdout
    return bool(stat.strip()) and not stat.strip().startswith("Z")


def test_detach_on_a_busy_port_fails_with_nothing_left(state: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = cli(state, "gateway", "--detach", "--port", str(port))
    assert done.returncode == ExitCode.SESSION and done.stdout == ""
    assert f"Local port {port} is already in use" in done.stderr
    assert not instance.claimed(state) and not (state / "gateway.json").exists()


def test_stop_lists_the_sessions_not_confirmed(state: Path) -> None:
    """A gateway whose shutdown left a session live (its cancel not
    confirmed): `gateway stop` says which, with exit 8."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        from alvis_fsm.fronts.gateway import instance
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        with instance.claim(Path({str(state)!r})) as me:
            me.publish(58555)
            print("up", flush=True)
            while not stop:
                time.sleep(0.05)
    """)
    Store(state).save(
        SessionRecord(name="gw-lab-ok", model="lab-ok", state=State.TUNNELED.value, job_id="99")
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        done = cli(state, "gateway", "stop")
        assert done.returncode == ExitCode.UNCONFIRMED
        assert "gw-lab-ok (job 99)" in done.stderr and "nothing left" not in done.stdout
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_orphans_are_the_live_gateway_sessions_nobody_drives(state: Path) -> None:
    """What a killed gateway left, for the next one to clean up: live `gw-*`
    sessions whose lock nobody holds; not one being driven (a `resume` in a
    terminal), not a finished one, not a session of `start`."""
    from alvis_fsm.fronts.gateway.slot.sessions import orphans

    store = Store(state)
    for name, st in (
        ("gw-a", State.TUNNELED),
        ("gw-b", State.SUBMITTED),
        ("gw-c", State.CLEANED),
        ("gw-a-2", State.RUNNING),
        ("mine", State.TUNNELED),
    ):
        store.save(SessionRecord(name=name, model="m", state=st.value, job_id="1"))
    with store.lock("gw-b"):
        assert [r.name for r in orphans(store)] == ["gw-a", "gw-a-2"]
    assert sorted(r.name for r in orphans(store)) == ["gw-a", "gw-a-2", "gw-b"]
