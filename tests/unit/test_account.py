"""Choosing the SLURM account when slurm.account is not set (issue 16),
without a cluster: the agent's answer is faked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alvis_fsm.cluster import agent
from alvis_fsm.errors import ConfigError, ExitCode, UsageError
from alvis_fsm.fronts.cli.commands import start


class FakeUI:
    def __init__(self, answers: list[str], interactive: bool = True) -> None:
        self.answers = answers
        self.tty = interactive
        self.infos: list[str] = []
        self.prompts: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def interactive(self) -> bool:
        return self.tty

    def ask(self, prompt: str, secret: bool = False) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0) if self.answers else ""


class FakeRunner:
    agent = object()


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    found: list[str] = []
    calls: list[Any] = []

    def accounts(conn: Any) -> list[str]:
        calls.append(conn)
        return list(found)

    monkeypatch.setattr(agent, "accounts", accounts)
    return found


def account(ui: Any, configured: str) -> str:
    """The account ``start`` charges: the service's choice, asking through
    the CLI's question (as ``start`` wires them)."""
    from alvis_fsm.engine.session.service import choose_account

    return choose_account(
        ui, FakeRunner().agent, configured, lambda found: start._choose_account(ui, found)
    )


def test_configured_account_asks_nothing(cluster: list[str]) -> None:
    cluster += ["a", "b"]
    ui = FakeUI([])
    assert account(ui, "NAISS2025-1-2") == "NAISS2025-1-2"
    assert ui.prompts == [] and ui.infos == []


def test_the_only_account_is_used_and_said(cluster: list[str], user_conf: Path) -> None:
    cluster.append("naiss2025-22-1522")
    ui = FakeUI([], interactive=False)
    assert account(ui, "") == "naiss2025-22-1522"
    assert ui.infos == [
        "slurm.account is not set: using your only SLURM account, naiss2025-22-1522"
        " (to make it permanent: alvis-fsm config set slurm.account naiss2025-22-1522)"
    ]
    assert not user_conf.exists()


def test_no_account_is_a_configuration_error(cluster: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        account(FakeUI([]), "")
    assert exc.value.exit_code == ExitCode.CONFIG
    assert "lists no SLURM account" in exc.value.message
    assert exc.value.hint and "projinfo" in exc.value.hint


def test_several_without_a_terminal_are_listed(cluster: list[str]) -> None:
    cluster += ["a1", "b2"]
    with pytest.raises(UsageError) as exc:
        account(FakeUI([], interactive=False), "")
    assert exc.value.exit_code == ExitCode.USAGE
    assert "you have 2 SLURM accounts" in exc.value.message
    assert exc.value.details == "a1\nb2"
    assert exc.value.hint and "alvis-fsm config set slurm.account a1" in exc.value.hint


@pytest.mark.parametrize(("pick", "save", "saved"), [("2", "", True), ("b2", "n", False)])
def test_several_in_a_terminal_ask_and_offer_to_save(
    cluster: list[str], user_conf: Path, pick: str, save: str, saved: bool
) -> None:
    cluster += ["a1", "b2"]
    ui = FakeUI(["0", pick, save])
    assert account(ui, "") == "b2"
    assert "  1. a1\n  2. b2\n" in ui.prompts[0]
    assert ui.prompts[1].startswith("Type a number from 1 to 2")
    assert ui.prompts[2] == f"Save b2 as slurm.account in {user_conf}? [Y/n] "
    assert user_conf.exists() == saved
    if saved:
        assert 'account = "b2"' in user_conf.read_text()
        assert ui.infos == [f'Set slurm.account = "b2" in {user_conf}']


def test_a_closed_stdin_does_not_loop(cluster: list[str]) -> None:
    cluster += ["a1", "b2"]
    ui = FakeUI([])
    with pytest.raises(UsageError, match="No SLURM account chosen"):
        account(ui, "")
    assert len(ui.prompts) == 3


def _agent(tmp_path: Path, script: str) -> Any:
    import os
    import subprocess

    from alvis_fsm.cluster.agent import agent_source

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "sacctmgr"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "USER": "pradas"}
    return subprocess.run(
        ["bash", "-c", agent_source(), "alvis-fsm-agent", "accounts"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_agent_lists_each_account_once(tmp_path: Path) -> None:
    proc = _agent(tmp_path, 'echo "$@" >&2; printf "b2\\na1\\n\\nb2\\na1\\n"\n')
    assert proc.returncode == 0
    assert "show assoc user=pradas format=Account" in proc.stderr
    assert proc.stdout.splitlines() == [
        "CMD|sacctmgr -nP show assoc user=pradas format=Account",
        "ACCOUNT|b2",
        "ACCOUNT|a1",
    ]
    from alvis_fsm.cluster.agent import _records

    assert sorted(set(_records(proc.stdout, "ACCOUNT"))) == ["a1", "b2"]


def test_agent_passes_on_a_sacctmgr_failure(tmp_path: Path) -> None:
    proc = _agent(tmp_path, 'echo "sacctmgr: error: Problem talking to the database" >&2; exit 1\n')
    assert proc.returncode == 5
    assert "Problem talking to the database" in proc.stderr
