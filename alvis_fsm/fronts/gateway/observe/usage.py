"""What the gateway's jobs cost and what its idle stops saved, in GPU-hours:
from a session's record only (the GPUs SLURM was asked for, the job's start
on the cluster's clock, its time limit), so the figures need no query."""

from __future__ import annotations

import time

from alvis_fsm.cluster.syntax import GPUS_RE
from alvis_fsm.engine.session.store import SessionRecord


def gpu_count(gpus: str) -> int:
    """GPUs per node as asked of SLURM: ``A40:2`` → 2, ``2`` → 2; ``auto``
    not yet resolved (or nothing) → 0: nothing is held before the job runs."""
    match = GPUS_RE.fullmatch(gpus)
    return int(match.group(1)) if match else 0


def held(record: SessionRecord, now: float | None = None) -> float:
    """GPU-hours the session's job has held so far (until ``now``, at most
    its time limit); 0 before it runs."""
    if not record.running_since:
        return 0.0
    seconds = max(0.0, (time.time() if now is None else now) - record.running_since)
    if record.time_limit_s:
        seconds = min(seconds, float(record.time_limit_s))
    return gpu_count(record.gpus) * seconds / 3600


def left(record: SessionRecord, now: float | None = None) -> float:
    """GPU-hours the job would still hold until its time limit: what an idle
    stop saves (a job nobody uses runs to its limit otherwise)."""
    return gpu_count(record.gpus) * (record.time_left(now) or 0.0) / 3600
