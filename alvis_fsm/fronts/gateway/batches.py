"""The batches the gateway's page and ``/metrics`` show, through a small
interface the batch feature plugs into (``Gateway.page`` takes any
``Batches``); until it does, ``NoBatches`` has none."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum, auto
from typing import Any, Protocol


class BatchStatus(StrEnum):
    """OpenAI's batch statuses (openai-python ``types/batch.py``): each
    value is its member's name in lower case."""

    VALIDATING = auto()
    IN_PROGRESS = auto()
    FINALIZING = auto()
    COMPLETED = auto()
    FAILED = auto()
    EXPIRED = auto()
    CANCELLING = auto()
    CANCELLED = auto()


RUNNING = {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING,
           BatchStatus.CANCELLING}  # fmt: skip


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
        return {**asdict(self), "status": self.status.value,
                "active": self.status in RUNNING}  # fmt: skip


class CancelRefused(Exception):
    """A batch that cannot be cancelled (unknown, or ended): the reason."""


class Batches(Protocol):
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
