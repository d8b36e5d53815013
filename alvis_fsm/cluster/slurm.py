"""SLURM's answers, parsed. Pure functions: the commands themselves run on
the login node through the agent (``agent.py``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from alvis_fsm.errors import SchedulerError
from alvis_fsm.text import inert_line


class Phase(StrEnum):
    """Where a job is in its life, as the tool needs to know it."""

    WAITING = "waiting"  # queued, held or suspended: no server yet, it may still run
    RUNNING = "running"  # its script runs on its node
    ENDING = "ending"  # its script is over; SLURM is still releasing its node
    ENDED = "ended"  # over: SLURM holds nothing of it any more


class JobState(StrEnum):
    """Every state SLURM prints (squeue %T, sacct State): the names of
    ``job_state_string`` in SchedMD/slurm src/common/slurm_protocol_defs.c,
    flags first, as SLURM prints a flag in place of the base state."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    REQUEUED = "REQUEUED"
    REQUEUE_FED = "REQUEUE_FED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    SUSPENDED = "SUSPENDED"
    RUNNING = "RUNNING"
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STOPPED = "STOPPED"
    COMPLETING = "COMPLETING"
    STAGE_OUT = "STAGE_OUT"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    UNKNOWN = "UNKNOWN"  # the scheduler has no record of it, or a word we do not know

    @classmethod
    def parse(cls, text: str) -> JobState:
        word = text.strip().split(" ")[0].rstrip("+")  # sacct: "CANCELLED by 1000"
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN

    @property
    def phase(self) -> Phase | None:
        """None for UNKNOWN: missing information is no phase at all."""
        return PHASES.get(self)

    @property
    def waiting(self) -> bool:
        return self.phase is Phase.WAITING

    @property
    def ended(self) -> bool:
        """The job's run is over (its script has ended), though SLURM may
        still hold its node a moment (COMPLETING): a session on it is over."""
        return self.phase in (Phase.ENDING, Phase.ENDED)

    @property
    def released(self) -> bool:
        """SLURM holds nothing of the job any more (COMPLETING is not yet):
        what a cancel waits for before it says "Cleaned up"."""
        return self.phase is Phase.ENDED


# Each state's phase, written once: the agent gets it as shell variables
# (``protocol.shell_definitions``). SPECIAL_EXIT is a job its epilog held
# after it ended (only a person can release it) and REVOKED a federated
# sibling another cluster runs: both ended for this tool.
PHASES: dict[JobState, Phase] = {
    **dict.fromkeys(
        (
            JobState.PENDING,
            JobState.CONFIGURING,
            JobState.REQUEUED,
            JobState.REQUEUE_FED,
            JobState.REQUEUE_HOLD,
            JobState.RESV_DEL_HOLD,
            JobState.SUSPENDED,
        ),
        Phase.WAITING,
    ),
    **dict.fromkeys(
        (JobState.RUNNING, JobState.RESIZING, JobState.SIGNALING, JobState.STOPPED), Phase.RUNNING
    ),
    **dict.fromkeys((JobState.COMPLETING, JobState.STAGE_OUT), Phase.ENDING),
    **dict.fromkeys(
        (
            JobState.COMPLETED,
            JobState.CANCELLED,
            JobState.FAILED,
            JobState.TIMEOUT,
            JobState.NODE_FAIL,
            JobState.PREEMPTED,
            JobState.OUT_OF_MEMORY,
            JobState.BOOT_FAIL,
            JobState.DEADLINE,
            JobState.REVOKED,
            JobState.SPECIAL_EXIT,
        ),
        Phase.ENDED,
    ),
}


@dataclass(frozen=True)
class JobInfo:
    """One answer of squeue (while the controller knows the job) or sacct,
    or the lack of one: "none" (both answered, neither knows the job) and
    "unknown" (a query failed or timed out; ``reason`` says why)."""

    source: str  # "squeue", "sacct", "none" or "unknown"
    state: JobState
    node: str = ""
    reason: str = ""
    start: str = ""  # expected start while pending, actual start otherwise
    time_left: str = ""
    exit_code: str = ""

    @property
    def known(self) -> bool:
        """The scheduler answered with a state for the job."""
        return self.source in ("squeue", "sacct")

    @property
    def ended(self) -> bool:
        """Authoritatively over: a terminal state from squeue or sacct. Missing
        information (a failed query, no record) is never an end."""
        return self.known and self.state.ended

    @property
    def unanswered(self) -> str:
        """Why the scheduler gave no state ("" when it did)."""
        if self.source == "none":
            return "the scheduler has no record of the job"
        if self.source == "unknown":
            return self.reason or "the scheduler did not answer"
        return ""


def parse_jobinfo(line: str) -> JobInfo:
    """Parse the agent's ``JOB|source|state|node|reason|start|timeleft|exitcode``."""
    parts = line.rstrip("\n").split("|")
    if len(parts) < 8 or parts[0] != "JOB":
        raise SchedulerError("Unexpected answer from the scheduler", details=line)
    _, source, state, node, reason, start, left, code = parts[:8]
    if source == "none":
        return JobInfo(source="none", state=JobState.UNKNOWN)
    if source not in ("squeue", "sacct"):
        # "unknown", or anything this client does not know: not an answer.
        return JobInfo(source="unknown", state=JobState.UNKNOWN, reason=reason)
    return JobInfo(
        source=source,
        state=JobState.parse(state),
        node=node if node not in ("None assigned", "(null)") else "",
        reason=reason if reason not in ("None", "(null)") else "",
        start=start if start not in ("N/A", "Unknown", "None") else "",
        time_left=left if left not in ("INVALID", "UNLIMITED", "NOT_SET") else "",
        exit_code=code,
    )


def parse_job_id(text: str) -> str:
    """sbatch --parsable prints ``jobid`` or ``jobid;cluster``."""
    first = text.strip().splitlines()[-1] if text.strip() else ""
    job_id = first.split(";")[0].strip()
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise SchedulerError("sbatch did not print a job id", details=text.strip() or "(nothing)")
    return job_id


# What SLURM's pending reasons mean for someone waiting for a GPU.
_REASONS = {
    "Resources": "waiting for a free {gpu}",
    "Priority": "other jobs are ahead of yours in the queue",
    "QOSGrpGRES": "your group's GPU limit is reached",
    "AssocGrpGRES": "your group's GPU limit is reached",
    "QOSMaxGRESPerUser": "your personal GPU limit is reached",
    "AssocGrpGRESMinutes": "your project's GPU-hour allocation is used up",
    "QOSGrpGRESMinutes": "your project's GPU-hour allocation is used up",
    "AssocMaxJobsLimit": "you have as many jobs as you may run at once",
    "QOSMaxJobsPerUserLimit": "you have as many jobs as you may run at once",
    "AssocGrpJobsLimit": "your group has as many jobs as it may run at once",
    "ReqNodeNotAvail": "the requested nodes are unavailable (maintenance?)",
    "PartitionTimeLimit": "the time asked for is above the partition's limit",
    "BeginTime": "the job's start time has not come yet",
    "Dependency": "waiting for another job to finish",
    "JobHeldUser": "the job is held (scontrol release)",
    "JobHeldAdmin": "the job is held by an administrator",
    "Reservation": "waiting for a reservation",
    "None": "being scheduled",
    "": "being scheduled",
}


def describe_reason(reason: str, gpus: str = "GPU") -> str:
    gpu = gpus.split(":")[0] if ":" in gpus else "GPU"
    text = _REASONS.get(reason)
    if text is None:
        return reason
    return text.format(gpu=gpu)


def _gres_counts(text: str) -> dict[str, int]:
    """``gpu:A40:4(S:0-1),gpu:T4:2`` -> {"A40": 4, "T4": 2}."""
    counts: dict[str, int] = {}
    for item in re.split(r",(?=gpu:)", text):
        match = re.match(r"gpu:([^:(,]+):(\d+)", item)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + int(match.group(2))
    return counts


def _count(counts: dict[str, int], gpu_type: str) -> int:
    # An untyped request ("--gpus 2") can use any type.
    return sum(counts.values()) if not gpu_type else counts.get(gpu_type, 0)


def free_gpus(lines: list[str], gpu_type: str) -> tuple[int, int, int]:
    """(free, total, nodes with some free) GPUs of a type, from the agent's
    ``node|gres|gres_used|state`` lines. Nodes that are down, drained or
    reserved count for nothing free."""
    free = total = nodes = 0
    for line in lines:
        parts = line.split("|")
        if len(parts) < 4:
            continue
        _, gres, used, state = parts[:4]
        have = _count(_gres_counts(gres), gpu_type)
        total += have
        if state.rstrip("*~#!%$@^-") not in ("idle", "mix", "mixed"):
            continue
        spare = max(0, have - _count(_gres_counts(used), gpu_type))
        free += spare
        nodes += 1 if spare else 0
    return free, total, nodes


# vLLM lines that explain why it died; shown as the root cause.
FATAL_PATTERNS = re.compile(
    r"CUDA out of memory|OutOfMemoryError|Engine core initialization failed|"
    r"No available memory for the cache blocks|max_model_len|max_seq_len|"
    r"CUDA error|RuntimeError|ValueError|FATAL|Traceback \(most recent call last\)|"
    r"EngineCore encountered a fatal error|Error|error:",
)


def root_cause(lines: list[str], tail: int = 8) -> list[str]:
    """The lines that explain a crash: fatal-pattern matches, then the tail.

    A WARNING line alone never counts: vLLM prints many harmless ones."""
    clean = [inert_line(line).rstrip() for line in lines]
    fatal = [
        line
        for line in clean
        if FATAL_PATTERNS.search(line)
        and not re.match(r"^\s*(WARNING|\(.*\) WARNING)", line)
        and "WARNING" not in line.split(":", 1)[0]
    ]
    chosen: list[str] = []
    for line in fatal[-6:] + clean[-tail:]:
        if line and line not in chosen:
            chosen.append(line)
    return chosen
