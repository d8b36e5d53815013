"""A new user's first run (issue 16): a fresh HOME, no settings file and no
slurm.account, on the lab cluster, whose user has two SLURM accounts
(tests/lab/up adds the second; the one-account case removes it for the
test and puts it back). Also: `start` says what it charges every time, and
`start --detach --json` prints only the documented JSON on stdout."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tool import Tool, assert_nothing_left, exit_status, free_port

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
FIRST = "naiss2025-22-1522"  # the lab's accounts, as sacctmgr spells them (sorted)
SECOND = "naiss2025-23-0042"


@pytest.fixture
def newcomer(lab: Any, tmp_path: Path) -> Iterator[Tool]:
    """The tool as a new user runs it: an empty HOME, no settings file at all.
    Only the lab's ssh config is given (an environment variable), since the
    lab's login node is not the real alvis2."""
    home = tmp_path / "home"
    t = Tool(lab, home, ALVIS_FSM_CONFIG="", ALVIS_FSM_SSH__CONFIG_FILE=str(lab.ssh_config))
    yield t
    t.close()


@contextlib.contextmanager
def only_one_account(lab: Any) -> Iterator[None]:
    """Remove the user's second association for the duration (we hold the lab lock)."""
    cluster = "cluster=alvis"
    lab.run(
        ["sacctmgr", "-i", "delete", "user", f"name={lab.user}", f"account={SECOND}", cluster],
        check=False,
    )
    try:
        yield
    finally:
        lab.run(["sacctmgr", "-i", "add", "user", lab.user, f"account={SECOND}", cluster])


def accounts_now(lab: Any) -> list[str]:
    out = lab.run(["sacctmgr", "-nP", "show", "assoc", f"user={lab.user}", "format=Account"])
    return sorted({line for line in out.stdout.split() if line})


def stop(tool: Tool, name: str) -> None:
    proc = tool.run_piped("stop", name, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_two_accounts_without_a_terminal_lists_them(lab: Any, newcomer: Tool) -> None:
    assert accounts_now(lab) == [FIRST, SECOND]
    proc = newcomer.run_piped("start", "--port", str(free_port()), timeout=90)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    error = next(line for line in lines if line.startswith("[ERROR]"))
    assert "slurm.account is not set and you have 2 SLURM accounts" in error
    assert f"    {FIRST}" in lines and f"    {SECOND}" in lines
    assert any(f"alvis-fsm config set slurm.account {FIRST}" in line for line in lines)
    assert "Charging" not in proc.stderr and "Job submitted" not in proc.stderr
    assert not (newcomer.home / ".alvis-vllm.conf").exists()
    assert_nothing_left(lab, newcomer)


def test_two_accounts_in_a_terminal_asks_and_saves(lab: Any, newcomer: Tool) -> None:
    port = free_port()
    child = newcomer.spawn("start", "--port", str(port), "--detach", timeout=90)
    child.expect_exact("slurm.account is not set and you have 2 SLURM accounts:")
    child.expect_exact(f"1. {FIRST}")
    child.expect_exact(f"2. {SECOND}")
    child.expect_exact("Charge which one? [1-2] ")
    child.sendline("3")  # out of range: asked again
    child.expect_exact("Type a number from 1 to 2")
    child.sendline("2")
    conf = newcomer.home / ".alvis-vllm.conf"
    child.expect_exact(f"Save {SECOND} as slurm.account in {conf}? [Y/n] ")
    child.sendline("")
    child.expect_exact(f'[INFO] Set slurm.account = "{SECOND}" in {conf}')
    child.expect_exact(f"[INFO] Charging {SECOND}")
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Detached")
    child.expect(__import__("pexpect").EOF)
    child.close()
    assert exit_status(child) == 0
    acct = lab.run(["squeue", "-h", "-j", job_id, "-o", "%a"]).stdout.strip()
    assert acct == SECOND
    assert f'account = "{SECOND}"' in conf.read_text()
    got = newcomer.run_piped("config", "get", "slurm.account")
    assert got.stdout == SECOND + "\n"
    stop(newcomer, "gpt-oss-20b")
    # Saved: the next start asks nothing and charges the same account.
    proc = newcomer.run_piped("start", "--port", str(free_port()), "--detach", timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[INFO] Charging {SECOND}\n" in proc.stderr
    assert "SLURM accounts" not in proc.stderr
    stop(newcomer, "gpt-oss-20b")
    assert_nothing_left(lab, newcomer)


def test_one_account_is_used_and_said(lab: Any, newcomer: Tool) -> None:
    with only_one_account(lab):
        assert accounts_now(lab) == [FIRST]
        port = free_port()
        proc = newcomer.run_piped("start", "--port", str(port), "--detach", timeout=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    err = proc.stderr
    assert f"[INFO] slurm.account is not set: using your only SLURM account, {FIRST}" in err
    assert f"[INFO] Charging {FIRST}\n" in err
    # Progress on stderr, results on stdout.
    assert "[INFO]" not in proc.stdout
    assert CONNECTED + str(port) in proc.stdout
    job_id = re.search(r"Job submitted: (\d+)", proc.stdout).group(1)  # type: ignore[union-attr]
    assert lab.run(["squeue", "-h", "-j", job_id, "-o", "%a"]).stdout.strip() == FIRST
    assert not (newcomer.home / ".alvis-vllm.conf").exists()  # nothing saved unasked
    stop(newcomer, "gpt-oss-20b")
    assert_nothing_left(lab, newcomer)


def test_configured_account_is_said_and_detach_json(lab: Any, tmp_path: Path) -> None:
    tool = Tool(lab, tmp_path / "home")  # the lab's settings name NAISS2025-22-1522
    try:
        port = free_port()
        proc = tool.run_piped(
            "start", "-m", "lab-ok", "--port", str(port), "--detach", "--json", timeout=90
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "[INFO] Charging NAISS2025-22-1522\n" in proc.stderr
        data = json.loads(proc.stdout)  # stdout is only the JSON object
        assert set(data) == {"session"}
        session = data["session"]
        assert session["name"] == "lab-ok" and session["state"] == "tunneled"
        assert session["url"] == f"http://localhost:{port}"
        assert session["account"] == "NAISS2025-22-1522"
        assert session["api_key"].startswith("afsm-")
        env = json.loads(tool.run_piped("env", "--json").stdout)
        assert env == {
            "name": "lab-ok",
            "base_url": f"http://localhost:{port}/v1",
            "api_key": session["api_key"],
            "model": "alvislab/tiny-ok",
        }
        stop(tool, "lab-ok")
        assert_nothing_left(lab, tool)
    finally:
        tool.close()
