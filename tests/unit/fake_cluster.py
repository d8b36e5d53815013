"""A fake cluster for driving the session engine in unit tests: objects with
the agent's, connection's and tunnel's methods, scripted per test. Nothing
here patches subprocess; the log stream is a real local process that prints
the agent's records."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alvis_fsm.cluster.agent import CancelReply, Event, Mark
from alvis_fsm.cluster.slurm import JobInfo, JobState
from alvis_fsm.cluster.ssh import SSHOptions
from alvis_fsm.cluster.tunnel import Verified
from alvis_fsm.engine.session.runner import Runner
from alvis_fsm.engine.session.store import Driver, SessionRecord, Store
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import ConnectionLost

UNKNOWN = JobInfo(source="unknown", state=JobState.UNKNOWN, reason="squeue: Socket timed out")
PENDING = JobInfo(source="squeue", state=JobState.PENDING, reason="Resources")
RUNNING = JobInfo(source="squeue", state=JobState.RUNNING)
RUNNING_SACCT = JobInfo(source="sacct", state=JobState.RUNNING)
CANCELLED = JobInfo(source="sacct", state=JobState.CANCELLED)


class Interrupt(BaseException):
    """Stands for an exception a step raises (Ctrl+C, a signal, a lost link)."""


@dataclass
class Say:
    """What the UI was told, in order."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def _add(self, kind: str, message: str) -> None:
        self.lines.append((kind, message))

    def info(self, message: str) -> None:
        self._add("info", message)

    def warn(self, message: str) -> None:
        self._add("warn", message)

    def result(self, message: str) -> None:
        self._add("result", message)

    def command(self, text: str) -> None:
        pass

    def log_line(self, stream: str, line: str) -> None:
        self._add("log", line)

    def waiting(self, text: str, since: float | None = None) -> None:
        self._add("waiting", text)

    def interrupted(self) -> None:
        self._add("interrupted", "")

    def done_waiting(self) -> None:
        pass

    def interactive(self) -> bool:
        return False

    def ask(self, prompt: str, secret: bool = False) -> str:
        raise AssertionError("the engine must not prompt here")

    def connected(self, record: SessionRecord, models: list[str], first_token_s: float) -> None:
        self._add("connected", ",".join(models))

    def text(self, kind: str | None = None) -> str:
        return "\n".join(m for k, m in self.lines if kind is None or k == kind)


class FakeConn:
    def __init__(self) -> None:
        self.opts = SSHOptions(host="alvis2")
        self.control = Path("/nonexistent/ctl")
        self.prompter = Say()
        self.reachable = True
        self.up = False
        self.opened = 0

    def open(self) -> None:
        if not self.reachable:
            raise ConnectionLost("Cannot connect to alvis2.")
        self.up = True
        self.opened += 1

    def reopen(self) -> None:
        self.open()

    def alive(self) -> bool:
        return self.up and self.reachable

    def close(self) -> None:
        self.up = False


class FakeTunnel:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.is_up = False
        self.alive_calls = 0
        self.raise_after: tuple[int, BaseException] | None = None

    def up(self) -> bool:
        return self.is_up

    def open(self) -> str:
        self.is_up = True
        return ""

    def alive(self) -> bool:
        self.alive_calls += 1
        if self.raise_after and self.alive_calls >= self.raise_after[0]:
            raise self.raise_after[1]
        return self.is_up

    def close(self) -> None:
        self.is_up = False


Step = Event | BaseException


class FakeAgent:
    """Each wait answers the next scripted Event (or raises the scripted
    exception); jobinfo and cancel answer what the test set."""

    def __init__(self) -> None:
        self.starts: deque[Step] = deque()
        self.readies: deque[Step] = deque()
        self.job = RUNNING
        self.cancel_answer = ""  # "" = confirmed, else why not
        self.cancels: list[tuple[str, str]] = []
        self.stream_script = "import time; time.sleep(30)"
        self.streams = 0
        self.stream_from: list[Mark | None] = []  # each stream's start (``since``)
        self.marks = 0
        self.submitted = 0

    def submit(
        self, run_dir: str, key: str | None, script: str, args: list[str]
    ) -> tuple[str, str]:
        self.submitted += 1
        return "/home/u/run", "42"

    def find(self, job_name: str) -> str | None:
        return None

    def jobinfo(self, job_id: str) -> JobInfo:
        return self.job

    @staticmethod
    def _next(queue: deque[Step]) -> Event:
        step = queue.popleft() if queue else Event("WAIT")
        if isinstance(step, BaseException):
            raise step
        return step

    def wait_start(self, run_dir: str, job_id: str, slice_s: float, interval: float) -> Event:
        return self._next(self.starts)

    def wait_ready(
        self, run_dir: str, job_id: str, slice_s: float, interval: float, address_known: bool
    ) -> Event:
        return self._next(self.readies)

    def tail(self, run_dir: str, lines: int) -> list[tuple[str, str]]:
        return [("err", "RuntimeError: boom")]

    def mark(self, run_dir: str) -> Mark | None:
        self.marks += 1
        return Mark(100 * self.marks, 10 * self.marks)

    def stream(
        self,
        run_dir: str,
        job_id: str,
        lines: int,
        check_every: float = 30,
        since: Mark | None = None,
    ) -> subprocess.Popen[bytes]:
        self.streams += 1
        self.stream_from.append(since)
        # A real local process in place of the ssh channel: it prints the
        # agent's records as the remote side would.
        return subprocess.Popen(
            [sys.executable, "-c", self.stream_script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def cancel(self, job_id: str, job_name: str, confirm_s: float = 30) -> CancelReply:
        self.cancels.append((job_id, job_name))
        return CancelReply(not self.cancel_answer, self.cancel_answer)


def make_runner(
    tmp: Path,
    state: str = "idle",
    *,
    detach: bool = True,
    supervised: bool = False,
    name: str = "s",
    **settings: dict[str, Any],
) -> tuple[Runner, FakeAgent, FakeConn, Say, Store]:
    cfg = load_settings(
        {
            "session": {"state_dir": str(tmp / "state")},
            "timeouts": {"job_start": 60, "server_ready": 60},
            **settings,
        }
    )
    store = Store(cfg.state_dir)
    record = SessionRecord(
        name=name,
        model="m",
        state=state,
        local_port=58000,
        run_dir=f"~/runs/{name}",
        job_name=f"alvis-fsm-{name}-abc",
        served_name="org/m",
        api_key="k",
        control_path=str(tmp / f"ctl-{name}"),
        tunnel_control_path=str(tmp / f"ctl-{name}.t"),
    )
    if state != "idle":
        record.job_id = "42"
        record.entered_at[state] = time.time()
    if state in ("serving", "tunneled"):
        record.node, record.port = "alvis7-07", 8000
    store.save(record)
    agent, conn, say = FakeAgent(), FakeConn(), Say()
    runner = Runner(
        cfg,
        record,
        store,
        say,
        detach=detach,
        conn=conn,  # type: ignore[arg-type]
        agent=agent,  # type: ignore[arg-type]
        tunnel_factory=FakeTunnel,  # type: ignore[arg-type]
        verifier=lambda port, key, deadline, served, **_: Verified(["org/m"], 0.01),
        driver=Driver.SUPERVISOR if supervised else Driver.CLIENT,
        job_script=lambda run_dir: "#!/bin/bash\n",
    )
    return runner, agent, conn, say, store
