"""Sessions on the lab cluster (issue 5): resume after a killed client,
--detach / status / stop, a job cancelled behind our back, two sessions at
once, a corrupt state file, status --offline, refusing a second start, the
session lock, and logs. Every test ends by checking that no job and no ssh
of the tool is left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest
from tool import (
    Tool,
    assert_nothing_left,
    exit_status,
    free_port,
    interrupt,
    wait_jobs_gone,
)

CONNECTED = "✓ Connection successful! Server available at http://localhost:"


def state(tool: Tool, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tool.state_dir / "sessions" / f"{name}.json").read_text())
    return data


def models(port: int, key: str) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://localhost:{port}/v1", api_key=key, timeout=10)
    return [m.id for m in client.models.list().data]


def answers(port: int, key: str) -> bool:
    try:
        return models(port, key) == ["alvislab/tiny-ok", "lab-ok"]
    except Exception:
        return False


def start_detached(tool: Tool, port: int, *flags: str) -> str:
    """`start -m lab-ok --detach`; returns the job id."""
    proc = tool.run_piped(
        "start", "-m", "lab-ok", "--port", str(port), "--detach", *flags, timeout=90
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert CONNECTED + str(port) in proc.stdout
    match = re.search(r"Job submitted: (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def ssh_of(tool: Tool) -> list[str]:
    """The tool's ssh clients (their command lines name its state dir).
    ``ps -ww``: without it ps cuts lines to the width of a terminal it may
    find on stdin/stderr (it does under pytest), hiding the marker."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,comm=,args="], text=True, capture_output=True, check=True
    ).stdout
    marker = str(tool.state_dir)
    return [
        line.strip()
        for line in out.splitlines()
        if len(line.split(None, 2)) == 3 and line.split(None, 2)[1] == "ssh" and marker in line
    ]


def nothing_left(lab: Any, tool: Tool, job_ids: list[str]) -> None:
    """The jobs named are gone, and so is every job and ssh of the tool."""
    assert wait_jobs_gone(lab, job_ids) == [], f"jobs left: {job_ids}"
    assert_nothing_left(lab, tool)
    deadline = time.monotonic() + 5
    while ssh_of(tool) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ssh_of(tool) == [], f"ssh processes left: {ssh_of(tool)}"


def stop(tool: Tool, name: str) -> str:
    proc = tool.run_piped("stop", name, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_resume_after_sigkill_reattaches_same_job(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn("start", "-m", "lab-ok", "--port", str(port), timeout=90)
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Streaming logs")
    child.kill(signal.SIGKILL)
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 128 + signal.SIGKILL
    assert job_id in lab.jobs()  # a killed client cannot cancel anything

    resumed = tool.spawn("resume", timeout=90)
    resumed.expect_exact(f"[INFO] Resuming session 'lab-ok' (job {job_id}, tunneled)")
    resumed.expect_exact(CONNECTED + str(port))
    resumed.expect_exact("[INFO] Streaming logs (Ctrl+C to stop and cleanup)...")
    record = state(tool, "lab-ok")
    assert record["job_id"] == job_id
    assert record["state"] == "tunneled"
    assert "Job submitted" not in resumed.logfile_read.text  # no second job
    assert lab.jobs().count(job_id) == 1

    # The key from the state, and the one `alvis-fsm env` prints, open the server.
    env = tool.run_piped("env")
    assert env.returncode == 0, env.stderr
    assert f"export OPENAI_BASE_URL=http://localhost:{port}/v1" in env.stdout
    key = re.search(r"export OPENAI_API_KEY=(\S+)", env.stdout)
    assert key and key.group(1) == record["api_key"]
    assert models(port, record["api_key"]) == ["alvislab/tiny-ok", "lab-ok"]

    interrupt(resumed)
    resumed.expect_exact(f"[INFO] Cancelling job {job_id}...")
    resumed.expect_exact(f"[INFO] Cleaned up job {job_id} successfully")
    resumed.expect(pexpect.EOF)
    resumed.close()
    assert exit_status(resumed) == 0
    assert state(tool, "lab-ok")["state"] == "cleaned"
    nothing_left(lab, tool, [job_id])


def test_detach_status_stop(lab: Any, tool: Tool) -> None:
    port = free_port()
    job_id = start_detached(tool, port)
    assert job_id in lab.jobs()

    status, out = tool.run("status")
    assert status == 0
    assert out.startswith("lab-ok: tunneled"), out
    assert f"job {job_id} (RUNNING)" in out
    assert f"http://localhost:{port} (answering)" in out

    proc = tool.run_piped("status", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["errors"] == []
    (row,) = data["sessions"]
    assert row["name"] == "lab-ok"
    assert row["state"] == "tunneled"
    assert row["reachable"] is True
    assert row["job_id"] == job_id
    assert row["job_state"] == "RUNNING"
    assert row["url"] == f"http://localhost:{port}"
    assert row["local_port"] == port

    out = stop(tool, "lab-ok")
    assert f"Cleaned up job {job_id} successfully" in out
    nothing_left(lab, tool, [job_id])
    assert not answers(port, state(tool, "lab-ok")["api_key"])
    offline = json.loads(tool.run_piped("status", "--offline", "--json").stdout)
    assert offline["sessions"][0]["state"] == "cleaned"


def test_job_cancelled_behind_our_back(lab: Any, tool: Tool) -> None:
    port = free_port()
    job_id = start_detached(tool, port)
    assert ssh_of(tool)  # the detached tunnel and connection
    lab.run(["scancel", job_id])
    deadline = time.monotonic() + 20
    while job_id in lab.jobs() and time.monotonic() < deadline:
        time.sleep(0.3)

    status, out = tool.run("status", "lab-ok")
    assert status == 0
    assert "lab-ok: cleaned" in out, out
    assert f"job {job_id} (CANCELLED)" in out
    assert "job ended: CANCELLED" in out
    record = state(tool, "lab-ok")
    assert record["state"] == "cleaned"
    assert record["end_reason"].startswith("job ended: CANCELLED")
    # Noticing it closed the detached tunnel and the shared connection.
    nothing_left(lab, tool, [job_id])

    out = stop(tool, "lab-ok")
    assert f"Session 'lab-ok' is already stopped (job {job_id}" in out
    assert "Cancelling" not in out
    nothing_left(lab, tool, [job_id])


def test_two_named_sessions_stopped_independently(lab: Any, tool: Tool) -> None:
    port_a, port_b = free_port(), free_port()
    while port_b == port_a:
        port_b = free_port()
    job_a = start_detached(tool, port_a, "--name", "a")
    job_b = start_detached(tool, port_b, "--name", "b", "--new")
    assert job_a != job_b
    assert {job_a, job_b} <= set(lab.jobs())
    key_a, key_b = state(tool, "a")["api_key"], state(tool, "b")["api_key"]
    assert key_a != key_b
    assert answers(port_a, key_a) and answers(port_b, key_b)

    data = json.loads(tool.run_piped("status", "--json").stdout)
    by_name = {r["name"]: r for r in data["sessions"]}
    assert by_name["a"]["state"] == by_name["b"]["state"] == "tunneled"
    assert by_name["a"]["reachable"] and by_name["b"]["reachable"]

    # Several sessions and no name: stop refuses to guess.
    proc = tool.run_piped("stop")
    assert proc.returncode == 7
    assert "several live sessions" in proc.stderr

    out = stop(tool, "a")
    assert f"Cleaned up job {job_a} successfully" in out
    assert job_a not in lab.jobs()
    assert job_b in lab.jobs()
    assert not answers(port_a, key_a)
    assert answers(port_b, key_b)
    assert state(tool, "b")["state"] == "tunneled"

    out = stop(tool, "b")
    assert f"Cleaned up job {job_b} successfully" in out
    nothing_left(lab, tool, [job_a, job_b])


GARBAGE = b'{"name": "broken", "model": \xff\x00 not json at all\n'


@pytest.mark.parametrize(
    "content",
    [
        GARBAGE,
        b'{"name": "broken", "model": "lab-ok", "format": 99}\n',
        b'{"name": "broken", "model": "lab-ok", "port": "many"}\n',
        b"[]",
    ],
    ids=["garbage", "newer-format", "wrong-type", "not-a-session"],
)
def test_corrupt_state_file(lab: Any, tool: Tool, tmp_path: Path, content: bytes) -> None:
    sessions = tool.state_dir / "sessions"
    sessions.mkdir(parents=True, mode=0o700)
    path = sessions / "broken.json"
    path.write_bytes(content)
    before = lab.count_accepted("login")

    for args in (
        ["status", "broken"],
        ["status", "--offline", "broken"],
        ["resume", "broken"],
        ["stop", "broken"],
        ["logs", "broken"],
    ):
        proc = tool.run_piped(*args)
        assert proc.returncode == 7, (args, proc.stdout, proc.stderr)
        assert f"[ERROR] Session file {path} " in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert path.read_bytes() == content

    # Listing all sessions names the bad file too, and does not stop at it.
    proc = tool.run_piped("status", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["sessions"] == []
    assert len(data["errors"]) == 1 and str(path) in data["errors"][0]

    # A start under that name must not overwrite it either.
    port = free_port()
    proc = tool.run_piped(
        "start", "-m", "lab-ok", "--name", "broken", "--port", str(port), timeout=90
    )
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert str(path) in proc.stderr
    assert "Job submitted" not in proc.stdout
    assert path.read_bytes() == content
    assert sorted(p.name for p in sessions.iterdir() if not p.name.startswith(".")) == [
        "broken.json"
    ]
    assert not list(sessions.glob("*.tmp"))
    assert lab.count_accepted("login") == before  # refused before logging in
    path.rename(tmp_path / "broken.json")  # (tool_jobs reads the session files)
    nothing_left(lab, tool, [])


def test_status_offline_makes_no_connection(lab: Any, tool: Tool, tmp_path: Path) -> None:
    port = free_port()
    job_id = start_detached(tool, port)

    fake = tmp_path / "fakebin"
    fake.mkdir()
    called = tmp_path / "ssh-called"
    (fake / "ssh").write_text(f'#!/bin/sh\necho "$@" >> {called}\nexit 255\n')
    (fake / "ssh").chmod(0o755)
    path = f"{fake}{os.pathsep}{tool.env['PATH']}"

    before = lab.count_accepted("login")
    began = time.monotonic()
    proc = tool.run_piped("status", "--offline", PATH=path)
    took = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lab-ok: tunneled"), proc.stdout
    assert f"job {job_id}" in proc.stdout
    proc = tool.run_piped("status", "--offline", "--json", "lab-ok", PATH=path)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["sessions"]
    assert row["state"] == "tunneled"
    assert row["job_state"] is None and row["reachable"] is None
    assert not called.exists(), called.read_text()
    assert lab.count_accepted("login") == before
    assert took < 3, took

    stop(tool, "lab-ok")
    nothing_left(lab, tool, [job_id])


def test_second_start_of_live_model(lab: Any, tool: Tool) -> None:
    port = free_port()
    job_id = start_detached(tool, port)
    jobs_before = set(lab.jobs())
    port2 = free_port()

    proc = tool.run_piped("start", "-m", "lab-ok", "--port", str(port2))
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert f"Session 'lab-ok' (lab-ok, job {job_id}, tunneled) is already live" in proc.stderr
    assert "alvis-fsm resume lab-ok" in proc.stderr
    assert "--new" in proc.stderr
    assert "Job submitted" not in proc.stdout
    assert set(lab.jobs()) == jobs_before

    # --new needs its own name, and its own port.
    proc = tool.run_piped("start", "-m", "lab-ok", "--port", str(port2), "--new")
    assert proc.returncode == 7
    assert "choose another --name" in proc.stderr
    proc = tool.run_piped("start", "-m", "lab-ok", "--port", str(port), "--new", "--name", "two")
    assert proc.returncode == 7
    assert f"Local port {port} is claimed by session 'lab-ok'" in proc.stderr
    assert set(lab.jobs()) == jobs_before

    job2 = start_detached(tool, port2, "--new", "--name", "two")
    assert job2 != job_id
    assert {job_id, job2} <= set(lab.jobs())
    assert answers(port2, state(tool, "two")["api_key"])
    stop(tool, "two")
    stop(tool, "lab-ok")
    nothing_left(lab, tool, [job_id, job2])


def test_lock_and_stop_while_driven(lab: Any, tool: Tool) -> None:
    port = free_port()
    job_id = start_detached(tool, port)
    driver = tool.spawn("resume", "lab-ok", timeout=90)
    driver.expect_exact(CONNECTED + str(port))
    driver.expect_exact("Streaming logs")

    proc = tool.run_piped("resume", "lab-ok")
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert (
        f"Session 'lab-ok' is being driven by another alvis-fsm (pid {driver.pid})" in proc.stderr
    )
    assert "Job submitted" not in proc.stdout
    # status still works while it is driven, and changes nothing.
    proc = tool.run_piped("status", "lab-ok")
    assert proc.returncode == 0 and "lab-ok: tunneled" in proc.stdout, proc.stdout + proc.stderr

    out = stop(tool, "lab-ok")
    assert f"Asking the client (pid {driver.pid}) to stop session 'lab-ok'" in out
    assert f"Session 'lab-ok' is already stopped (job {job_id}" in out
    driver.expect_exact(f"Cleaned up job {job_id} successfully")
    driver.expect(pexpect.EOF)
    driver.close()
    assert exit_status(driver) == 130
    assert state(tool, "lab-ok")["state"] == "cleaned"
    nothing_left(lab, tool, [job_id])


def test_stop_while_foreground_start(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn("start", "-m", "lab-ok", "--port", str(port), timeout=90)
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact("Streaming logs")
    out = stop(tool, "lab-ok")
    assert f"Asking the client (pid {child.pid})" in out
    child.expect_exact(f"Cleaned up job {job_id} successfully")
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 130
    nothing_left(lab, tool, [job_id])


def test_logs_of_detached_session(lab: Any, tool: Tool) -> None:
    port = free_port()
    job_id = start_detached(tool, port)
    assert models(port, state(tool, "lab-ok")["api_key"])  # an access-log line

    proc = tool.run_piped("logs", "lab-ok", "-n", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    out = [line for line in lines if line.startswith("[VLLM OUT] ")]
    err = [line for line in lines if line.startswith("[VLLM ERR] ")]
    assert 1 <= len(out) <= 5 and 1 <= len(err) <= 5, proc.stdout
    assert len(out) + len(err) == len(lines), proc.stdout
    assert any(
        re.fullmatch(
            r"\[VLLM ERR\] \(APIServer pid=\d+\) INFO:     Application startup complete\.", line
        )
        for line in err
    ), proc.stdout
    assert any("GET /v1/models" in line for line in out), proc.stdout
    # Reading logs leaves the detached session as it was.
    assert state(tool, "lab-ok")["state"] == "tunneled"
    assert answers(port, state(tool, "lab-ok")["api_key"])

    stop(tool, "lab-ok")
    nothing_left(lab, tool, [job_id])
