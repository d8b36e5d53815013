"""A batch's lifecycle, as data: its statuses, the moves between them, a shard's states."""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """OpenAI's batch statuses (openai-python types/batch.py)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """No move leads out of it (``MOVES``)."""
        return not MOVES[self]


_S = BatchStatus

# The batch's machine, as data: each status and the ones it may move to.
# OpenAI's path is validating -> in_progress -> finalizing -> completed, with
# failed, expired and a cancel (cancelling -> cancelled) on the way; a batch
# may be finalizing at its first look (every line ran before it was asked),
# and a cancel that comes after every line ran ends completed. Staying is
# always allowed (each look at the cluster says the status again); the
# ended statuses have no way out.
MOVES: dict[BatchStatus, frozenset[BatchStatus]] = {
    _S.VALIDATING: frozenset({_S.IN_PROGRESS, _S.FINALIZING, _S.CANCELLING, _S.FAILED, _S.EXPIRED}),
    _S.IN_PROGRESS: frozenset({_S.FINALIZING, _S.CANCELLING, _S.FAILED, _S.EXPIRED}),
    _S.FINALIZING: frozenset({_S.COMPLETED, _S.CANCELLING, _S.FAILED, _S.EXPIRED}),
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.FINALIZING}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.EXPIRED: frozenset(),
    _S.CANCELLED: frozenset(),
}

# The Batch object's field for when a status was entered (validating's is
# ``created_at``, the record's own).
ENTERED_AT: dict[BatchStatus, str] = {s: f"{s.value}_at" for s in BatchStatus if s != _S.VALIDATING}


class IllegalMove(Exception):
    """A status change ``MOVES`` does not have: a bug in alvis-fsm, not the user's doing."""


def check_move(old: BatchStatus, new: BatchStatus) -> None:
    """Refuse a move the lifecycle does not have (staying is always allowed)."""
    if new != old and new not in MOVES[old]:
        allowed = ", ".join(sorted(MOVES[old])) or "none: it has ended"
        raise IllegalMove(f"A batch cannot go from {old} to {new} (from {old}: {allowed})")


class ShardState(StrEnum):
    """What a shard's progress file says (``cluster/remote/batch_runner.py`` writes these words)."""

    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    EXPIRED = "expired"
    SERVER_FAILED = "server_failed"
