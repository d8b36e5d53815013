"""Closing the terminal (issue 31): shutdown never depends on the terminal.

`alvis-fsm gateway`, `start` and `resume` run in a real terminal (a window
of a private tmux server, as a user's), their job serving; then `tmux
kill-session` closes that terminal: SIGHUP, and every write after it fails
(EIO). The scheduler must then say the job was cancelled (root's squeue
and sacct) and no ssh process of the run may be left on the laptop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tool import Tool, free_port, tool_argv, tool_jobs, wait_jobs_gone, wait_no_ssh

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

CONNECTED = "Connection successful! Server available at http://localhost:"
ASK = {"model": "lab-ok", "messages": [{"role": "user", "content": "Hello"}]}
REPLY = "Hello from the alvis-lab stand-in"


class Terminal:
    """One terminal window running one alvis-fsm command, in a tmux server
    of its own (its socket in a short temporary dir), as a user's terminal
    is: TERM of tmux, colours allowed."""

    def __init__(self, tool: Tool) -> None:
        self.tool = tool
        self.dir = Path(tempfile.mkdtemp(prefix="afsm-tty-", dir="/tmp"))
        self.socket = self.dir / "tmux.sock"

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        return subprocess.run(
            ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
            env=env,
            text=True,
            capture_output=True,
            check=check,
            timeout=30,
        )

    def open(self, *args: str) -> None:
        env = {k: v for k, v in self.tool.env.items() if k not in ("TERM", "NO_COLOR")}
        script = self.dir / "run.sh"
        script.write_text(
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
            + "exec "
            + shlex.join(tool_argv() + list(args))
            + "\n"
        )
        self.tmux("new-session", "-d", "-s", "run", "-x", "200", "-y", "50", f"sh {script}")

    def screen(self) -> str:
        done = self.tmux("capture-pane", "-p", "-J", "-S", "-500", "-t", "run", check=False)
        return done.stdout

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.screen())
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} not shown within {timeout:.0f} s:\n{self.screen()}")

    def close(self) -> None:
        """The user closes the terminal window."""
        self.tmux("kill-session", "-t", "run")

    def gone(self) -> None:
        self.tmux("kill-server", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def terminal(tool: Tool) -> Iterator[Terminal]:
    term = Terminal(tool)
    yield term
    term.gone()
    # A gateway that outlived its terminal (the failure this tests): SIGTERM,
    # so it cancels its jobs before Tool.close kills what ssh is left.
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, ProcessLookupError):
        pid = int(json.loads((tool.state_dir / "gateway.json").read_text())["pid"])
        os.kill(pid, 15)
        for _ in range(900):
            os.kill(pid, 0)
            time.sleep(0.1)


def cancelled(lab: Any, tool: Tool, job_id: str) -> None:
    """The job left squeue, sacct says CANCELLED, and no ssh of the run is left."""
    assert wait_jobs_gone(lab, [job_id], timeout=90) == [], (
        f"job {job_id} still in squeue after the terminal closed "
        f"({lab.job_state(job_id)}): nobody cancelled it"
    )
    assert tool_jobs(lab, tool) == []
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        state = lab.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], check=False
        ).stdout.strip()
        if state:
            break
        time.sleep(0.5)
    assert state.startswith("CANCELLED"), f"sacct: job {job_id} {state!r}"
    left = wait_no_ssh(str(tool.state_dir), timeout=30)
    assert left == [], f"ssh processes left on the laptop: {left}"


def test_gateway_terminal_closed_cancels_its_job(lab: Any, tool: Tool, terminal: Terminal) -> None:
    port = free_port()
    terminal.open("gateway", "--port", str(port))
    terminal.wait_for(r"Gateway on http://localhost:\d+/v1")
    env = tool.run_piped("env", "--gateway")
    assert env.returncode == 0, env.stderr
    key = re.search(r"OPENAI_API_KEY=(\S+)", env.stdout)
    assert key, env.stdout
    reply = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json=ASK,
        timeout=180,
        headers={"Authorization": f"Bearer {key.group(1)}"},
        trust_env=False,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == REPLY
    (job_id,) = tool_jobs(lab, tool)
    pid = int(json.loads((tool.state_dir / "gateway.json").read_text())["pid"])

    terminal.close()
    cancelled(lab, tool, job_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    assert not alive(pid), "the gateway outlived its terminal"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_terminal_closed_cancels_its_job(lab: Any, tool: Tool, terminal: Terminal) -> None:
    port = free_port()
    terminal.open("start", "-m", "lab-ok", "--port", str(port))
    job_id = terminal.wait_for(r"Job submitted: (\d+)").group(1)
    terminal.wait_for(re.escape(CONNECTED + str(port)))
    terminal.wait_for("Streaming logs")
    terminal.close()
    cancelled(lab, tool, job_id)


def test_resume_terminal_closed_cancels_its_job(lab: Any, tool: Tool, terminal: Terminal) -> None:
    port = free_port()
    done = tool.run_piped("start", "-m", "lab-ok", "--port", str(port), "--detach", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (job_id,) = tool_jobs(lab, tool)
    terminal.open("resume", "lab-ok")
    terminal.wait_for(re.escape(CONNECTED + str(port)))
    terminal.wait_for("Streaming logs")
    terminal.close()
    cancelled(lab, tool, job_id)
