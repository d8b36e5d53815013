"""Running alvis-fsm as a user would: a subprocess in a pseudo-terminal."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pexpect

# The lab fixture's class lives in conftest.py; not imported, since tests/unit
# has a conftest module of the same name.
Lab = Any


def tool_argv() -> list[str]:
    """The installed console script next to this Python, else `python -m alvis_fsm`."""
    script = Path(sys.executable).parent / "alvis-fsm"
    if script.exists():
        return [str(script)]
    found = shutil.which("alvis-fsm")
    return [found] if found else [sys.executable, "-m", "alvis_fsm"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminal_signals() -> None:
    """In the child, before exec: Ctrl+C as in a terminal. A test run started
    in the background of a shell without job control inherits SIGINT
    ignored, and Python keeps an ignored SIGINT ignored, so the tool would
    never see the Ctrl+C the tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Tool:
    def __init__(self, lab: Lab, home: Path, **env: str) -> None:
        import tempfile

        self.lab = lab
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        # A short state dir of its own: every ssh the tool starts names its
        # control socket, inside this dir, on its command line, which is how
        # the tests find what the tool left running.
        self.state_dir = Path(tempfile.mkdtemp(prefix="afsm-", dir="/tmp"))
        self.children: list[pexpect.spawn] = []
        self.env = {
            **lab.env,
            "HOME": str(home),
            "ALVIS_FSM_SESSION__STATE_DIR": str(self.state_dir),
            "TERM": "dumb",
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }

    def spawn(self, *args: str, timeout: float = 60, **env: str) -> pexpect.spawn:
        argv = tool_argv() + list(args)
        child = pexpect.spawn(
            argv[0],
            argv[1:],
            env={**self.env, **env},
            encoding="utf-8",
            codec_errors="replace",
            timeout=timeout,
            dimensions=(50, 200),
            preexec_fn=terminal_signals,
        )
        child.logfile_read = _Log()
        self.children.append(child)
        return child

    def close(self) -> None:
        """Teardown: a child still running (a test failed half-way) gets the
        Ctrl+C a user would give and time to clean up, not pexpect's SIGKILL;
        then whatever ssh of this tool is still left is killed, so one failed
        test does not leak into the next."""
        for child in self.children:
            if child.isalive():
                child.sendintr()
                with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                    child.expect(pexpect.EOF, timeout=45)
            child.close(force=True)
        # A detached session's background supervisor (it would reopen what
        # is killed below): it lets go on SIGTERM.
        import json

        for path in (self.state_dir / "sessions").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, ProcessLookupError, TypeError):
                data = json.loads(path.read_text())  # tests write damaged files too
                supervised = isinstance(data, dict) and data.get("driver") == "supervisor"
                pid = int(data.get("driver_pid") or 0) if supervised else 0
                if pid > 0:
                    os.kill(pid, signal.SIGTERM)
                    for _ in range(50):
                        os.kill(pid, 0)
                        time.sleep(0.1)
        for line in ssh_clients(str(self.state_dir)):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split()[0]), signal.SIGTERM)

    def run(self, *args: str, timeout: float = 120, **env: str) -> tuple[int, str]:
        """Run to completion in a pty; returns (exit status, all output)."""
        child = self.spawn(*args, timeout=timeout, **env)
        child.expect(pexpect.EOF)
        child.close()
        return exit_status(child), child.logfile_read.text

    def run_piped(
        self, *args: str, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run with plain pipes (not a terminal)."""
        return subprocess.run(
            tool_argv() + list(args),
            env={**self.env, **env},
            text=True,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


class _Log:
    """Collects what the child printed (pexpect's logfile_read)."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> None:
        self.text += data
        if os.environ.get("ALVIS_TEST_ECHO"):
            sys.stdout.write(data)

    def flush(self) -> None:
        pass


def exit_status(child: pexpect.spawn) -> int:
    if child.exitstatus is not None:
        return int(child.exitstatus)
    return 128 + int(child.signalstatus or 0)


def interrupt(child: pexpect.spawn, sig: int = signal.SIGINT) -> None:
    """Ctrl+C as the terminal would send it (to the foreground process)."""
    if sig == signal.SIGINT:
        child.sendintr()
    else:
        child.kill(sig)


def ssh_clients(marker: str) -> list[str]:
    """ssh client processes (sshd excluded) whose command line names ``marker``."""
    # -ww: without it ps cuts lines at the terminal width (80 under pytest),
    # and the marker would never be seen.
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,comm=,args="], text=True, capture_output=True
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] == "ssh" and marker in parts[2]:
            rows.append(line.strip())
    return rows


def wait_no_ssh(marker: str, timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    left = ssh_clients(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = ssh_clients(marker)
    return left


def wait_jobs_gone(lab: Lab, job_ids: list[str], timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    live = [j for j in lab.jobs() if j in job_ids]
    while live and time.monotonic() < deadline:
        time.sleep(0.3)
        live = [j for j in lab.jobs() if j in job_ids]
    return live


def tool_jobs(lab: Lab, tool: Tool) -> list[str]:
    """Jobs in squeue that this tool instance submitted (by id or unique job
    name from its session files), so other users of the lab do not count."""
    import json

    ids: set[str] = set()
    names: set[str] = set()
    for path in (tool.state_dir / "sessions").glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if data.get("job_id"):
            ids.add(str(data["job_id"]))
        if data.get("job_name"):
            names.add(str(data["job_name"]))
    out = lab.run(["squeue", "-h", "-u", lab.user, "-o", "%i|%j"]).stdout
    left = []
    for line in out.splitlines():
        job_id, _, name = line.strip().partition("|")
        if job_id in ids or name in names:
            left.append(job_id)
    return left


def assert_nothing_left(lab: Lab, tool: Tool) -> None:
    """No job of this tool left in squeue, no ssh client of the tool left running."""
    deadline = time.monotonic() + 20
    while tool_jobs(lab, tool) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert tool_jobs(lab, tool) == [], f"jobs left in squeue: {tool_jobs(lab, tool)}"
    left = wait_no_ssh(str(tool.state_dir))
    assert left == [], f"ssh processes left: {left}"


# -- results for tools/reliability.py ---------------------------------------------
RESULTS_ENV = "ALVIS_RELIABILITY_RESULTS"


def ctrl_c_leaves_nothing(child: pexpect.spawn, lab: Lab, tool: Tool) -> None:
    """Ctrl+C as a user gives it: the job is cleaned up, the tool exits 0,
    and no job or ssh of this tool is left."""
    interrupt(child)
    child.expect_exact("Cleaned up job")
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0
    assert_nothing_left(lab, tool)


def report(fault: str, tries: int, survived: int, worst: float | None, **extra: Any) -> None:
    """Append one fault's outcome to $ALVIS_RELIABILITY_RESULTS (if set), as
    one JSON line: ``tools/reliability.py`` turns them into docs/concepts/reliability.md."""
    import json

    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    row = {
        "fault": fault,
        "tries": tries,
        "survived": survived,
        "worst_recovery_s": None if worst is None else round(worst, 3),
        **extra,
    }
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
