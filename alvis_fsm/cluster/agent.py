"""The remote agent (``agent.sh``) called over the shared connection.

Each method is one channel on the shared ssh connection: no new login, and
each wait happens on the login node next to the run directory."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from alvis_fsm.cluster import protocol
from alvis_fsm.cluster.protocol import STREAM_NEWS, WAIT_REPLIES, Reply
from alvis_fsm.cluster.slurm import JobInfo, JobState, parse_job_id, parse_jobinfo
from alvis_fsm.cluster.ssh import Connection
from alvis_fsm.errors import JobRefused, SchedulerError, SSHError


def agent_source() -> str:
    """The agent as it is sent (``protocol.agent_script``)."""
    return protocol.agent_script("agent.sh")


def agent_argv(command: str, args: Mapping[str, object], rest: Sequence[str] = ()) -> list[str]:
    """The local argv that runs one agent command (``protocol.COMMANDS``)."""
    return [
        "bash",
        "-c",
        agent_source(),
        "alvis-fsm-agent",
        *protocol.command_args(command, args, rest),
    ]


def _lines(text: str) -> list[str]:
    """The agent's records: one per "\\n". Not str.splitlines, which also
    breaks at \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029: characters a
    run dir or log line may hold (settings refuse only NUL, CR and LF)."""
    return text.split("\n")


def _records(text: str, kind: str) -> list[str]:
    prefix = kind + "|"
    return [line[len(prefix) :] for line in _lines(text) if line.startswith(prefix)]


@dataclass(frozen=True)
class Mark:
    """A point in vLLM's logs: the bytes of ``vllm.out`` and ``vllm.err``
    written so far (the agent's ``MARK|OUT,ERR``). A stream started from it
    shows every line written since."""

    out: int
    err: int

    @classmethod
    def parse(cls, text: str) -> Mark | None:
        out, _, err = text.partition(",")
        return cls(int(out), int(err)) if out.isdigit() and err.isdigit() else None

    def __str__(self) -> str:
        return f"{self.out},{self.err}"


@dataclass(frozen=True)
class JobNews:
    """What the agent said of the job's end (EXITED, ENDED, GONE), or that
    the scheduler did not answer (UNKNOWN), with the record's detail."""

    kind: Reply
    detail: str = ""

    @classmethod
    def parse(cls, line: str) -> JobNews | None:
        """The news a record of the log stream holds, if it is news."""
        head, bar, detail = line.partition("|")
        return cls(Reply(head), detail) if bar and head in STREAM_NEWS else None

    @property
    def ends_job(self) -> bool:
        return self.kind != Reply.UNKNOWN

    @property
    def at_time_limit(self) -> bool:
        """The job reached its time limit: the normal end of a session."""
        return (self.kind == Reply.ENDED and self.detail == protocol.TIME_LIMIT) or (
            self.kind == Reply.GONE and self.detail == JobState.TIMEOUT.value
        )

    def says(self, job_id: str, *, before_ready: bool = False) -> str:
        """The news in words: the error of a job that ended (``before_ready``:
        while vLLM was still starting), `logs --follow`'s last line."""
        if self.kind == Reply.EXITED:
            return f"vLLM exited with status {self.detail}" + (
                " before it was ready" if before_ready else ""
            )
        if self.kind == Reply.ENDED:
            before = " before vLLM was ready" if before_ready else ""
            return f"The job stopped{before} ({self.detail})"
        if self.kind == Reply.GONE:
            return f"Job {job_id} is no longer running ({self.detail})"
        # UNKNOWN: no answer, which is not news of the job (it goes on).
        return f"Could not check job {job_id}: {self.detail or 'the scheduler did not answer'}"


@dataclass(frozen=True)
class Event:
    """One outcome of a wait (``protocol.WAIT_REPLIES``) plus the
    scheduler's view (``job``) when it was asked."""

    kind: Reply
    value: str = ""
    job: JobInfo | None = None
    # Seconds since the waited-for state began, on the cluster's clock (None
    # when the agent could not tell): timeouts are judged by this, never by
    # the client's own clock, which stops while a laptop sleeps.
    age: float | None = None
    # With READY: where vLLM's logs stood when it was found ready (``Mark``).
    mark: Mark | None = None

    @property
    def news(self) -> JobNews | None:
        """The job's end, when the wait ended with it (EXITED, ENDED)."""
        return JobNews(self.kind, self.value) if self.kind in STREAM_NEWS else None


@dataclass(frozen=True)
class CancelReply:
    """What `cancel` found: the scheduler confirmed the job's end, or not,
    and then what is still unknown (``why``, in words)."""

    confirmed: bool
    why: str = ""

    @classmethod
    def parse(cls, record: str) -> CancelReply:
        """A ``CANCEL|confirmed|`` or ``CANCEL|unconfirmed|<why>`` record's fields."""
        verdict, _, why = record.partition("|")
        if verdict == "confirmed":
            return cls(True)
        return cls(False, why or "not confirmed")


@dataclass
class Agent:
    conn: Connection

    def call(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        *,
        rest: Sequence[str] = (),
        input: str | None = None,
        timeout: float = 60,
        retry: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run one agent command with its named arguments (``protocol.COMMANDS``)."""
        argv = agent_argv(command, args or {}, rest)
        proc = self.conn.run(argv, input=input, timeout=timeout, retry=retry)
        for line in _records(proc.stdout, "CMD"):
            self.conn.prompter.command(f"{self.conn.opts.host}: {line}")
        return proc

    # -- submission ---------------------------------------------------------
    def submit(
        self, run_dir: str, api_key: str | None, job_script: str, sbatch_args: list[str]
    ) -> tuple[str, str]:
        """Create the run dir, write the key and the job script, sbatch: one
        round trip. Returns (absolute run dir, job id). Never retried
        blindly: a lost connection during sbatch is ambiguous (see ``find``)."""
        payload = (api_key + "\n" if api_key else "") + job_script
        proc = self.call(
            "submit",
            {"run": run_dir, "has_key": 1 if api_key else 0},
            rest=sbatch_args,
            input=payload,
            retry=False,
        )
        if proc.returncode == 4:
            raise JobRefused(
                "sbatch refused the job",
                hint="Check the account (slurm.account), the GPU type (--gpus) and the time (-t).",
                details=proc.stderr.strip(),
            )
        found = _records(proc.stdout, "SUBMITTED")
        if proc.returncode != 0 or not found:
            raise SchedulerError(
                f"Job submission failed in {run_dir}", details=proc.stderr.strip() or None
            )
        return _records(proc.stdout, "RUN")[0], parse_job_id(found[0])

    def find(self, job_name: str) -> str | None:
        found = _records(self.call("find", {"job_name": job_name}).stdout, "FOUND")
        return found[0] if found and found[0] else None

    # -- waiting ------------------------------------------------------------
    def jobinfo(self, job_id: str) -> JobInfo:
        proc = self.call("jobinfo", {"job": job_id})
        lines = [line for line in _lines(proc.stdout) if line.startswith("JOB|")]
        if not lines:
            # No answer is not an answer: the caller keeps the job and retries.
            why = proc.stderr.strip().splitlines()[-1:] or ["the scheduler did not answer"]
            return JobInfo(source="unknown", state=JobState.UNKNOWN, reason=why[0])
        return parse_jobinfo(lines[0])

    def wait_start(self, run_dir: str, job_id: str, slice_s: float, interval: float) -> Event:
        proc = self.call(
            "wait-start",
            {
                "run": run_dir,
                "job": job_id,
                "slice": f"{slice_s:.3f}",
                "interval": f"{interval:.3f}",
            },
            timeout=slice_s + 60,
        )
        return _event(proc)

    def wait_ready(
        self, run_dir: str, job_id: str, slice_s: float, interval: float, address_known: bool
    ) -> Event:
        proc = self.call(
            "wait-ready",
            {
                "run": run_dir,
                "job": job_id,
                "slice": f"{slice_s:.3f}",
                "interval": f"{interval:.3f}",
                "known": 1 if address_known else 0,
            },
            timeout=slice_s + 60,
        )
        return _event(proc)

    def tail(self, run_dir: str, lines: int) -> list[tuple[str, str]]:
        """The last lines of both logs, as (stream, line) with stream 'out'/'err'."""
        proc = self.call(
            "stream",
            {
                "run": run_dir,
                "job": 0,
                "lines": lines,
                "from": "",
                "follow": 0,
                "interval": 1,
                "check": 30,
            },
        )
        return [parse_log_line(line) for line in _lines(proc.stdout) if line[:2] in ("O|", "E|")]

    def mark(self, run_dir: str) -> Mark | None:
        """Where vLLM's logs stand now (None if the agent could not tell)."""
        found = _records(self.call("mark", {"run": run_dir}).stdout, "MARK")
        return Mark.parse(found[0]) if found else None

    def stream(
        self,
        run_dir: str,
        job_id: str,
        lines: int,
        check_every: float = 30,
        since: Mark | None = None,
    ) -> subprocess.Popen[bytes]:
        """Follow both logs: from ``since`` when given, else their last ``lines``."""
        return self.conn.popen(
            agent_argv(
                "stream",
                {
                    "run": run_dir,
                    "job": job_id,
                    "lines": lines,
                    "from": str(since) if since else "",
                    "follow": 1,
                    "interval": 0.2,
                    "check": max(1, round(check_every)),
                },
            )
        )

    def cancel(self, job_id: str, job_name: str, confirm_s: float = 30) -> CancelReply:
        """scancel, then wait up to ``confirm_s`` for the scheduler to confirm a
        terminal state."""
        proc = self.call(
            "cancel",
            {"job": job_id, "job_name": job_name, "confirm": f"{confirm_s:.0f}"},
            timeout=confirm_s + 60,
            retry=True,
        )
        found = _records(proc.stdout, "CANCEL")
        if proc.returncode != 0 or not found:
            why = proc.stderr.strip() or f"the cancel did not run (exit status {proc.returncode})"
            return CancelReply(False, why)
        return CancelReply.parse(found[-1])

    def gpus(self) -> list[str]:
        """sinfo's per-node GPU lines (``node|gres|gres_used|state``)."""
        return _records(self.call("gpus").stdout, "NODE")

    def discover(self, hub: str) -> tuple[list[tuple[str, str]], list[str]]:
        """(snapshot path, config.json text) for every snapshot in the hub,
        and the hub paths skipped because no record can carry their name
        (control characters, shown as "?")."""
        proc = self.call("discover", {"hub": hub}, timeout=120)
        lines = _lines(proc.stdout)
        out: list[tuple[str, str]] = []
        for i, line in enumerate(lines):
            if line.startswith("SNAPSHOT|") and i + 1 < len(lines):
                out.append((line[len("SNAPSHOT|") :], lines[i + 1]))
        return out, _records(proc.stdout, "SKIP")


def parse_log_line(line: str) -> tuple[str, str]:
    tag, _, text = line.partition("|")
    return ("out" if tag == "O" else "err", text)


def _event(proc: subprocess.CompletedProcess[str]) -> Event:
    if proc.returncode != 0:
        raise SSHError("The remote wait failed", details=proc.stderr.strip() or None)
    job: JobInfo | None = None
    kind, value = Reply.WAIT, ""
    age: float | None = None
    mark: Mark | None = None
    for line in _lines(proc.stdout):
        if line.startswith("JOB|"):
            job = parse_jobinfo(line)
        elif line.startswith("AGE|"):
            with contextlib.suppress(ValueError):
                age = float(line[4:])
        elif line.startswith("MARK|"):
            mark = Mark.parse(line[5:])
        elif "|" in line:
            head, _, rest = line.partition("|")
            if head in WAIT_REPLIES:
                kind, value = Reply(head), rest
    return Event(kind=kind, value=value, job=job, age=age, mark=mark)


def accounts(agent: Agent) -> list[str]:
    """The SLURM accounts the remote user may charge (``sacctmgr show assoc``),
    sorted, each once: one round trip on the shared connection."""
    proc = agent.call("accounts")
    if proc.returncode != 0:
        raise SchedulerError(
            "Could not list your SLURM accounts (sacctmgr failed)",
            hint="Set the account to charge: alvis-fsm config set slurm.account NAISS2025-XX-YYYY"
            " (`projinfo` on the login node lists your projects).",
            details=proc.stderr.strip() or None,
        )
    return sorted({a for a in _records(proc.stdout, "ACCOUNT") if a})
