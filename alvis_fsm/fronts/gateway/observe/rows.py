"""Each model's row, computed once: what its slot shows of itself to
``GET /v1/models``, ``GET /gateway/status`` (server.py) and the page's data
(page/routes.py). Each endpoint names the facts its own way (its JSON is
read by clients, the page's script and users), but the facts, and how they
are rounded, are these.

The rounding rule, once: durations in whole seconds (``whole``);
GPU-hours and latencies to four places (``fine``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from alvis_fsm.engine.session.states import State
from alvis_fsm.fronts.gateway.slot.models import LOADING, QUEUED, LoadTime, Models, Slot

PLACES = 4  # GPU-hours and latencies


def whole(seconds: float | None) -> int | None:
    """A duration as whole seconds."""
    return None if seconds is None else round(seconds)


def fine(value: float) -> float:
    """GPU-hours or a latency, to ``PLACES`` places."""
    return round(value, PLACES)


@dataclass(frozen=True)
class ModelRow:
    """One model as its slot is now. The queue's reason and expected start
    are the scheduler's while the job is queued (None otherwise); how long
    it has loaded, and how long loading took before, while it loads."""

    name: str
    served: str  # the ORG/NAME alias clients may send
    state: str  # cold, queued, loading, ready, failed
    job_id: str | None
    node: str | None
    gpus: str | None
    time_left: int | None  # until the job's time limit
    error: str | None  # why the last session failed
    status: str | None  # the serving session's last word
    log: tuple[str, ...]  # its last lines
    in_flight: int
    served_requests: int
    sessions: int
    idle_stops: int
    rollovers: int
    successor_job_id: str | None
    retiring_job_ids: tuple[str, ...]
    rollover_error: str | None
    gpu_hours_used: float
    gpu_hours_saved: float
    queued: bool  # in the queue, the scheduler's words known
    queue_reason: str | None
    expected_start: str | None
    loading: bool  # loading, its record known
    loading_for_s: int | None
    expected_load_s: int | None

    @classmethod
    def of(
        cls, slot: Slot, now: float | None = None, load_time: LoadTime | None = None
    ) -> ModelRow:
        """``slot``'s row at ``now`` (the wall clock); ``load_time`` gives its
        expected load time while it loads (left out without it)."""
        now = time.time() if now is None else now
        r = slot.handle.record if slot.handle is not None else None
        state = slot.state
        queued = r is not None and state == QUEUED
        loading = r is not None and state == LOADING
        since = r.entered_at.get(State.RUNNING) if r is not None and loading else None
        expected = load_time(slot.name, r.gpus) if r is not None and loading and load_time else None
        obs = slot.observer
        return cls(
            name=slot.name,
            served=slot.served,
            state=state,
            job_id=slot.job_id or None,
            node=(r.node or None) if r is not None else None,
            gpus=(r.gpus or None) if r is not None else None,
            time_left=whole(slot.time_left()),
            error=slot.error or None,
            status=obs.status if obs is not None else None,
            log=tuple(obs.lines)[-10:] if obs is not None else (),
            in_flight=slot.in_flight,
            served_requests=slot.served_requests,
            sessions=slot.sessions,
            idle_stops=slot.idle_stops,
            rollovers=slot.rollovers,
            successor_job_id=(slot.successor.job_id or None) if slot.successor else None,
            retiring_job_ids=tuple(run.job_id for run in slot.retiring if run.job_id),
            rollover_error=slot.rollover_error or None,
            gpu_hours_used=fine(slot.gpu_hours_used),
            gpu_hours_saved=fine(slot.gpu_hours_saved),
            queued=queued,
            queue_reason=(r.queue_reason or None) if r is not None and queued else None,
            expected_start=(r.expected_start or None) if r is not None and queued else None,
            loading=loading,
            loading_for_s=whole(now - since) if since else None,
            expected_load_s=whole(expected),
        )


@dataclass(frozen=True)
class Totals:
    """Every model together."""

    requests_served: int
    # Saved: what the jobs cancelled for idleness would have held until their
    # time limit had nobody stopped them.
    gpu_hours_used: float
    gpu_hours_saved: float

    @classmethod
    def of(cls, models: Models) -> Totals:
        slots = models.slots.values()
        return cls(
            requests_served=sum(s.served_requests for s in slots),
            gpu_hours_used=fine(sum(s.gpu_hours_used for s in slots)),
            gpu_hours_saved=fine(sum(s.gpu_hours_saved for s in slots)),
        )
