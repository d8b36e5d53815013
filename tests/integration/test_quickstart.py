"""The README's quickstart, run as written in a scratch HOME (issue 16): the
clone, the install, the account setting and the installed command. No
network beyond the package index: the clone is of this repository, and the
steps that need the internet (installing uv itself) or a tool this machine
lacks (uv, pipx) are skipped. `alvis-fsm start` needs Alvis, so its line is
run as `alvis-fsm start --help` (the same program, the same installation)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def block(name: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- quickstart:{name} -->\n```bash\n(.*?)```", text, re.S)
    assert m, f"no quickstart:{name} block in README.md"
    return [line for line in m.group(1).splitlines() if line.strip()]


def account_command() -> str:
    text = README.read_text(encoding="utf-8")
    quick = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    # The quickstart starts with the account: its first command sets it.
    first = re.search(r"```bash\n(.*?)\n```", quick, re.S)
    assert first, quick
    return first.group(1)


@pytest.fixture
def scratch(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ALVIS_FSM_", "VIRTUAL_ENV", "PYTHONPATH"))
    }
    env["HOME"] = str(home)
    return tmp_path, env


def sh(line: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{line}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def as_run_here(line: str) -> str:
    """`... alvis-fsm start` needs the cluster: run its help instead."""
    return re.sub(r"(alvis-fsm) start$", r"\1 start --help", line)


def clone(root: Path, env: dict[str, str]) -> Path:
    """The README's folder, as a user has it: a clone (the quickstart runs in it)."""
    for name in ("uv", "pipx", "venv"):  # no placeholder address to fill in
        assert not any(
            "REPOSITORY-URL" in cmd or cmd.startswith("git clone") for cmd in block(name)
        )
    sh(f"git clone -q {REPO} alvis-fsm", root, env)
    return root / "alvis-fsm"


def test_quickstart_starts_with_the_account() -> None:
    assert account_command() == "alvis-fsm config set slurm.account NAISS2025-XX-YYYY"


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_venv_quickstart_as_written(scratch: tuple[Path, dict[str, str]]) -> None:
    root, env = scratch
    checkout = clone(root, env)
    lines = block("venv")
    # As typed into one terminal: the PATH line holds for the lines after it,
    # so the last one is the bare `alvis-fsm` every example uses.
    assert lines[-1] == "alvis-fsm start"
    out = sh("\n".join(as_run_here(line) for line in lines), checkout, env)
    assert "Usage: alvis-fsm start" in out
    # The examples' client is installed beside it.
    sh("export PATH=\"$HOME/.alvis-fsm-venv/bin:$PATH\" && python -c 'import openai'", root, env)
    binary = Path(env["HOME"]) / ".alvis-fsm-venv" / "bin" / "alvis-fsm"
    # The account step, with the installed program.
    sh(account_command().replace("alvis-fsm", str(binary), 1), root, env)
    got = sh(f"{binary} config get slurm.account", root, env)
    assert got == "NAISS2025-XX-YYYY\n"
    conf = Path(env["HOME"]) / ".alvis-vllm.conf"
    assert 'account = "NAISS2025-XX-YYYY"' in conf.read_text()
    # And python -m alvis_fsm works where the package is installed.
    python = binary.parent / "python"
    assert "NAISS2025-XX-YYYY" in sh(f"{python} -m alvis_fsm config get slurm.account", root, env)


@pytest.mark.parametrize("name", ["uv", "pipx"])
def test_tool_quickstart_as_written(name: str, scratch: tuple[Path, dict[str, str]]) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed here (installing it needs the internet)")
    root, env = scratch
    checkout = clone(root, env)
    env["PATH"] = f"{env['HOME']}/.local/bin:{env['PATH']}"
    for line in block(name):
        if line.startswith(("curl ", "export PATH=")):
            continue  # installing uv needs the internet; PATH set above
        sh(as_run_here(line), checkout, env)
