"""Shell completion: `alvis-fsm completion SHELL` prints click's script, and
the completions it asks for (click's ``_ALVIS_FSM_COMPLETE`` protocol) offer
the catalog's model names and the saved session names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alvis_fsm.engine.session.store import SessionRecord, Store

REPO = Path(__file__).resolve().parents[2]


def env_for(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def script(shell: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "alvis_fsm", "completion", shell],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def complete(words: str, shell: str = "bash", **extra: str) -> list[str]:
    """What the completion script would get back for the command line ``words``
    (the cursor at its end; a trailing space starts a new word)."""
    parts = words.split(" ")
    env = env_for(
        _ALVIS_FSM_COMPLETE=f"{shell}_complete",
        COMP_WORDS=words,
        COMP_CWORD=str(len(parts) - 1),
        **extra,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "alvis_fsm"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout.splitlines()


def values(lines: list[str]) -> list[str]:
    """bash_complete answers ``type,value`` per line."""
    return [line.split(",", 1)[1] for line in lines if line.startswith("plain,")]


@pytest.fixture
def user_catalog(isolated_home: Path) -> Path:
    path = isolated_home / ".alvis-vllm" / "models.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        '{"my-llama": {"path": "/hub/models--m--llama/snapshots/1/", "max_model_len": 8192},'
        ' "mistral-7b": {"path": "/hub/models--m--mistral/snapshots/1/", "max_model_len": 4096}}'
    )
    return path


# -- the scripts --------------------------------------------------------------------


def test_bash_script() -> None:
    text = script("bash")
    assert "_ALVIS_FSM_COMPLETE=bash_complete" in text
    assert "complete -o nosort -F _alvis_fsm_completion alvis-fsm" in text
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_zsh_script() -> None:
    text = script("zsh")
    assert text.startswith("#compdef alvis-fsm")
    assert "_ALVIS_FSM_COMPLETE=zsh_complete" in text
    if shutil.which("zsh"):
        proc = subprocess.run(["zsh", "-n"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_fish_script() -> None:
    text = script("fish")
    assert "_ALVIS_FSM_COMPLETE=fish_complete" in text
    assert "complete --no-files --command alvis-fsm" in text
    if shutil.which("fish"):
        proc = subprocess.run(["fish", "-n"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


# -- the answers ----------------------------------------------------------------------


def test_model_names_for_start_m(user_catalog: Path) -> None:
    assert values(complete("alvis-fsm start -m ")) == ["gpt-oss-20b", "mistral-7b", "my-llama"]
    assert values(complete("alvis-fsm start --model m")) == ["mistral-7b", "my-llama"]
    assert values(complete("alvis-fsm start -t 2:00:00 -m my")) == ["my-llama"]


def test_model_names_survive_broken_settings(user_conf: Path) -> None:
    user_conf.write_text("broken [\n")
    assert values(complete("alvis-fsm start -m ")) == ["gpt-oss-20b"]


def test_session_names(isolated_home: Path) -> None:
    state = isolated_home / ".alvis-vllm"
    for name in ("lab-ok", "gpt-oss-20b"):
        Store(state).save(SessionRecord(name=name, model=name, state="tunneled"))
    assert values(complete("alvis-fsm stop ")) == ["gpt-oss-20b", "lab-ok"]
    assert values(complete("alvis-fsm logs l")) == ["lab-ok"]
    assert values(complete("alvis-fsm cancel g")) == ["gpt-oss-20b"]


def test_commands_and_options() -> None:
    commands = values(complete("alvis-fsm "))
    for name in (
        "start",
        "resume",
        "status",
        "stop",
        "logs",
        "env",
        "models",
        "config",
        "diagram",
        "completion",
    ):
        assert name in commands
    assert values(complete("alvis-fsm config s")) == ["show", "set"]
    assert "--route" in values(complete("alvis-fsm start --r"))
    assert values(complete("alvis-fsm start --route ")) == ["jump", "login"]
    assert values(complete("alvis-fsm completion ")) == ["bash", "zsh", "fish"]


def test_zsh_protocol(user_catalog: Path) -> None:
    # zsh_complete answers type, value, help on three lines each
    lines = complete("alvis-fsm start -m my", shell="zsh")
    assert lines[:2] == ["plain", "my-llama"]


def test_bash_script_end_to_end(tmp_path: Path, user_catalog: Path) -> None:
    """Source the generated script in bash and press <TAB> after `start -m `."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "alvis-fsm"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m alvis_fsm "$@"\n')
    wrapper.chmod(0o755)
    program = (
        'eval "$(alvis-fsm completion bash)"\n'
        "COMP_WORDS=(alvis-fsm start -m m); COMP_CWORD=3\n"
        "_alvis_fsm_completion alvis-fsm\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(
        ["bash", "-c", program],
        env=env_for(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["mistral-7b", "my-llama"]
