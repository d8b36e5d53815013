"""A session's states, by name: the one place their spelling is written.

Kept light (only ``enum``): ``status --offline`` and the store import it
without the machine (pydantic, transitions). The machine (``machine``)
decides which transitions connect them; everyone else names a state through
``State``. A session file keeps the state as its plain string; compare it
with ``State.X`` (a ``StrEnum`` equals its value)."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    IDLE = "idle"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SERVING = "serving"
    TUNNELED = "tunneled"
    FAILED = "failed"
    CLEANED = "cleaned"


# States in which a job may exist on the cluster: leaving any of them must be
# possible without leaking a GPU job.
LIVE_STATES = frozenset({State.SUBMITTED, State.RUNNING, State.SERVING, State.TUNNELED})

# States a session has ended in (failed: its job's cancel may be unconfirmed).
ENDED_STATES = frozenset({State.FAILED, State.CLEANED})


# A batch's statuses (engine/batch/parts.py) are OpenAI's words, and a batch shard's
# are the node-side runner's (cluster/remote/batch_runner.py writes them into its
# progress file): spelled here, with the session's.
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
        return self in (
            BatchStatus.COMPLETED,
            BatchStatus.FAILED,
            BatchStatus.EXPIRED,
            BatchStatus.CANCELLED,
        )


class ShardState(StrEnum):
    """What a shard's progress file says (batch_runner.py writes these words)."""

    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    EXPIRED = "expired"
    SERVER_FAILED = "server_failed"
