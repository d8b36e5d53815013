"""The cluster's answer about a batch (the batch agent's ``status``) read into its status."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from alvis_fsm.engine.batch.lifecycle import BatchStatus, ShardState
from alvis_fsm.engine.batch.record import BatchRecord


@dataclass
class BatchReport:
    """One answer of the batch agent's ``status`` (batch_agent.sh)."""

    now: int = 0
    deadline: int = 0
    run_dir_gone: bool = False
    cancelled_mark: bool = False
    progress: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    expired: set[int] = field(default_factory=set)
    attempts: dict[int, int] = field(default_factory=dict)
    queue: list[tuple[str, str, str]] = field(default_factory=list)  # (id, state, reason)
    queue_unknown: str = ""  # why the queue could not be read ("" = it answered)


def parse_status(stdout: str) -> BatchReport:
    snap = BatchReport()
    for line in stdout.split("\n"):
        kind, _, rest = line.partition("|")
        try:
            if kind == "NOW":
                snap.now = int(rest)
            elif kind == "DEADLINE":
                snap.deadline = int(rest)
            elif kind == "NORUN":
                snap.run_dir_gone = True
            elif kind == "CANCELLED":
                snap.cancelled_mark = True
            elif kind == "PROGRESS":
                k, _, text = rest.partition("|")
                data = json.loads(text)
                if isinstance(data, dict):
                    snap.progress[int(k)] = data
            elif kind == "FAILED":
                k, _, cause = rest.partition("|")
                snap.failed[int(k)] = cause
            elif kind == "EXPIRED":
                snap.expired.add(int(rest))
            elif kind == "ATTEMPTS":
                k, _, n = rest.partition("|")
                snap.attempts[int(k)] = int(n)
            elif kind == "QUEUE":
                job, _, more = rest.partition("|")
                state, _, reason = more.partition("|")
                snap.queue.append((job, state, reason))
            elif kind == "QUEUE_UNKNOWN":
                snap.queue_unknown = rest or "squeue did not answer"
        except ValueError:
            continue  # a record cut by a lost connection: ignore, ask again later
    return snap


def _shard_done(snap: BatchReport, k: int) -> bool:
    return snap.progress.get(k, {}).get("state") == ShardState.DONE


def apply(record: BatchRecord, snap: BatchReport) -> BatchRecord:
    """The record updated by what the cluster says. Missing information is
    not bad news: without an answer from squeue a shard that is not done is
    still in progress; only an answer ("no job of this batch is queued or
    running") lets an unfinished batch end."""
    if record.ended:
        return record
    now = snap.now or int(time.time())
    record.completed = sum(int(p.get("completed", 0)) for p in snap.progress.values())
    record.failed = sum(int(p.get("errored", 0)) for p in snap.progress.values())
    record.prompt_tokens = sum(int(p.get("prompt_tokens", 0)) for p in snap.progress.values())
    record.completion_tokens = sum(
        int(p.get("completion_tokens", 0)) for p in snap.progress.values()
    )
    if snap.run_dir_gone:
        return record  # not ours to judge: the run dir may be on a file system that is away
    live = bool(snap.queue)
    answered = not snap.queue_unknown
    all_done = all(_shard_done(snap, k) for k in range(record.shards))
    if all_done:
        # Every line has run (as OpenAI's finalizing): the results are being
        # assembled while a shard's job is still finishing; completed once
        # none is left (or the queue cannot say: every result is written).
        record.set_status(BatchStatus.FINALIZING, now)
        if not live:
            record.set_status(BatchStatus.COMPLETED, now)
        return record
    if snap.cancelled_mark or record.status == BatchStatus.CANCELLING:
        # Cancelling (marked: no successor starts) until no job is left.
        record.set_status(BatchStatus.CANCELLING, now)
        if answered and not live:
            record.set_status(BatchStatus.CANCELLED, now)
        return record
    if record.status == BatchStatus.VALIDATING and (live or snap.progress):
        record.set_status(BatchStatus.IN_PROGRESS, now)
    if not answered or live:
        return record
    # The scheduler answered: nothing of this batch is queued or running.
    if snap.failed:
        k = min(snap.failed)
        record.error = f"shard {k}: {snap.failed[k]}"
        record.set_status(BatchStatus.FAILED, now)
    elif snap.expired or (snap.deadline and now >= snap.deadline):
        record.set_status(BatchStatus.EXPIRED, now)
    else:
        unfinished = [k for k in range(record.shards) if not _shard_done(snap, k)]
        record.error = (
            f"shard {unfinished[0]}: its job ended before the shard was done "
            "(cancelled outside alvis-fsm, or a node failure without requeue)"
        )
        record.set_status(BatchStatus.FAILED, now)
    return record
