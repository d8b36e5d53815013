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
