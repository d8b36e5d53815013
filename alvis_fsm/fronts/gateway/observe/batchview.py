"""The batches the gateway's page and ``/metrics`` show, through a small
interface (``Page`` takes any ``BatchSource``): ``Board`` shows the gateway's own
batches (``gateway/batches.py``); ``NoBatches`` has none."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from alvis_fsm.engine.batch.lifecycle import ENTERED_AT, BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord
from alvis_fsm.errors import AlvisError

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.openai.batches import Batches


@dataclass(frozen=True)
class BatchView:
    id: str
    model: str
    status: BatchStatus
    total: int
    completed: int
    failed: int
    created_at: float  # epoch seconds
    eta_s: float | None = None  # expected seconds to the end, if known
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value, "active": not self.status.ended}


class CancelRefused(Exception):
    """A batch that cannot be cancelled (unknown, or ended): the reason."""


class BatchSource(Protocol):
    def list(self) -> list[BatchView]:
        """Running batches and recent ones, newest first."""
        ...

    async def cancel(self, batch_id: str) -> BatchView:
        """Cancel a batch; return once the cancel is confirmed (its jobs
        gone), raising ``CancelRefused`` with the reason if it cannot be."""
        ...


class NoBatches:
    def list(self) -> list[BatchView]:
        return []

    async def cancel(self, batch_id: str) -> BatchView:
        raise CancelRefused(f"No batch {batch_id!r} on this gateway")


class Board:
    """The gateway's batches (its ``/v1/batches``) as the page shows them:
    the last known state of each, asked of the cluster again at most every
    ``refresh_s`` while it runs (in a thread; an unanswered refresh keeps the
    last known state)."""

    def __init__(self, batches: Batches, refresh_s: float = 10.0) -> None:
        self.batches = batches
        self.refresh_s = refresh_s
        self._asked: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def list(self) -> list[BatchView]:
        views = []
        for record in reversed(self.batches.store.all()):  # newest first
            if not record.ended:
                self._refresh_later(record)
            views.append(_view(record))
        return views[:50]

    def _refresh_later(self, record: BatchRecord) -> None:
        now = time.monotonic()
        if now - self._asked.get(record.id, -self.refresh_s) < self.refresh_s:
            return
        self._asked[record.id] = now
        with contextlib.suppress(RuntimeError):  # no running loop: not from the page
            task = asyncio.get_running_loop().create_task(self._refresh(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refresh(self, record: BatchRecord) -> None:
        with contextlib.suppress(AlvisError):
            await asyncio.to_thread(self.batches.ops.refresh, record)

    async def cancel(self, batch_id: str) -> BatchView:
        record = self.batches.find(batch_id)
        if record is None:
            raise CancelRefused(f"No batch {batch_id!r} on this gateway")
        if record.ended:
            raise CancelRefused(f"Batch {batch_id} has already ended ({record.status})")
        try:
            record = await asyncio.to_thread(self.batches.ops.cancel, record)
        except AlvisError as exc:
            raise CancelRefused(exc.message) from None
        return _view(record)


def _view(record: BatchRecord) -> BatchView:
    status = record.status
    done = record.completed + record.failed
    eta: float | None = None
    started = record.times.get(ENTERED_AT[BatchStatus.IN_PROGRESS])
    if status is BatchStatus.IN_PROGRESS and started and 0 < done < record.total:
        eta = (time.time() - started) / done * (record.total - done)
    return BatchView(
        id=record.id,
        model=record.model,
        status=status,
        total=record.total,
        completed=record.completed,
        failed=record.failed,
        created_at=float(record.created_at),
        eta_s=eta,
        error=record.error,
    )
