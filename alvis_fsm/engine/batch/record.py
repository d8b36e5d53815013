"""A batch's local record, its store (``STATE_DIR/batches/``) and its OpenAI Batch object."""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alvis_fsm.engine.batch.input import read_ids
from alvis_fsm.engine.batch.lifecycle import ENTERED_AT, BatchStatus, check_move
from alvis_fsm.errors import SessionError, UsageError
from alvis_fsm.files import atomic_write, atomic_writer

FORMAT = 1
ID_RE = re.compile(r"^batch_[0-9a-f]{16}$")
# OpenAI accepts only "24h"; longer windows are for clusters with queues.
WINDOW_RE = re.compile(r"^([1-9][0-9]{0,3})h$")
DEFAULT_WINDOW = "24h"


def new_id() -> str:
    return "batch_" + secrets.token_hex(8)


def check_id(batch_id: str) -> str:
    if not ID_RE.fullmatch(batch_id):
        raise UsageError(
            f"Invalid batch id {batch_id!r}",
            hint="Batch ids look like batch_0123456789abcdef; `alvis-fsm batch list` shows them.",
        )
    return batch_id


def window_seconds(window: str) -> int:
    m = WINDOW_RE.fullmatch(window)
    if m is None:
        raise UsageError(
            f"Invalid completion window {window!r}", hint="Use hours, e.g. 24h (OpenAI's value)."
        )
    return int(m.group(1)) * 3600


@dataclass
class BatchRecord:
    """What the laptop knows of a batch: its plan, its status (moved only
    by ``set_status``) and its counts as last seen."""

    id: str
    model: str
    served_name: str
    endpoint: str
    total: int
    shards: int
    run_dir: str
    job_name: str
    created_at: int  # epoch seconds (laptop) the batch was created
    completion_window: str = DEFAULT_WINDOW
    status: BatchStatus = BatchStatus.VALIDATING
    job_id: str = ""  # the first job array's id
    gpus: str = ""
    time_limit: str = ""
    account: str = ""
    host: str = ""
    input_file_id: str = ""  # the gateway's file, when created through it
    output_file_id: str = ""
    error_file_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""  # the cause, when failed
    times: dict[str, int] = field(default_factory=dict)  # ENTERED_AT[status] -> epoch
    format: int = FORMAT

    def __post_init__(self) -> None:
        self.status = BatchStatus(self.status)  # a file's word: refused if unknown

    def set_status(self, status: BatchStatus, now: float | None = None) -> None:
        """Move to ``status``: a move of ``lifecycle.MOVES`` (else ``IllegalMove``,
        a bug); the time it is first entered is kept."""
        check_move(self.status, status)
        self.status = status
        key = ENTERED_AT.get(status)
        if key and key not in self.times:
            self.times[key] = int(time.time() if now is None else now)

    @property
    def ended(self) -> bool:
        return self.status.ended

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> BatchRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise SessionError(f"Batch file {path} is not an alvis-fsm batch")
        if data.get("format", 0) > FORMAT:
            raise SessionError(f"Batch file {path} is from a newer alvis-fsm; left alone")
        try:
            record = cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise SessionError(f"Batch file {path} is damaged ({exc}); left alone") from None
        return record


class BatchStore:
    """``STATE_DIR/batches/ID.json`` (the record) and ``ID.ids`` (the input's
    custom_ids in order, for the merge), written atomically, 0600."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "batches"

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)

    def path(self, batch_id: str, suffix: str = ".json") -> Path:
        return self.dir / f"{check_id(batch_id)}{suffix}"

    def save(self, record: BatchRecord, ids: Iterable[str] | None = None) -> None:
        """``ids`` (streamed: e.g. ``Validated.iter_ids()``) are written once, at submit."""
        self.ensure()
        if ids is not None:
            with atomic_writer(self.path(record.id, ".ids")) as handle:
                for cid in ids:
                    handle.write(json.dumps(cid) + "\n")
        atomic_write(self.path(record.id), json.dumps(record.to_json(), indent=2) + "\n")

    def load(self, batch_id: str) -> BatchRecord:
        path = self.path(batch_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SessionError(
                f"No batch {batch_id}", hint="`alvis-fsm batch list` shows your batches."
            ) from None
        except ValueError as exc:
            raise SessionError(f"Batch file {path} is damaged ({exc}); left alone") from None
        return BatchRecord.from_json(data, path)

    def iter_ids(self, batch_id: str) -> Iterator[str]:
        """The input's custom_ids in order, streamed from ``ID.ids``."""
        return read_ids(self.path(batch_id, ".ids"))

    def all(self) -> list[BatchRecord]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in self.dir.glob("batch_*.json"):
            try:
                out.append(self.load(path.stem))
            except (SessionError, UsageError):
                continue
        return sorted(out, key=lambda r: (r.created_at, r.id))


def openai_object(record: BatchRecord, assembling: bool = False) -> dict[str, Any]:
    """OpenAI's Batch object (openai-python types/batch.py) for a record.
    ``assembling``: a completed batch whose output and error files are not
    ready yet (the gateway is downloading them) shows as ``finalizing``."""
    times = dict(record.times)
    status = record.status
    if (
        status == BatchStatus.COMPLETED and "completed_at" in times
    ):  # a record from before finalizing
        times.setdefault("finalizing_at", times["completed_at"])
    if assembling and status == BatchStatus.COMPLETED:
        status = BatchStatus.FINALIZING
        times.pop("completed_at", None)
    errors = None
    if record.error:
        errors = {
            "object": "list",
            "data": [
                {"code": "batch_failed", "message": record.error, "param": None, "line": None}
            ],
        }
    window = window_seconds(record.completion_window)
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "errors": errors,
        "input_file_id": record.input_file_id or f"file-{record.id[len('batch_') :]}",
        "completion_window": record.completion_window,
        "status": status.value,
        "output_file_id": record.output_file_id or None,
        "error_file_id": record.error_file_id or None,
        "created_at": record.created_at,
        "in_progress_at": times.get("in_progress_at"),
        "expires_at": record.created_at + window,
        "finalizing_at": times.get("finalizing_at"),
        "completed_at": times.get("completed_at"),
        "failed_at": times.get("failed_at"),
        "expired_at": times.get("expired_at"),
        "cancelling_at": times.get("cancelling_at"),
        "cancelled_at": times.get("cancelled_at"),
        "request_counts": dict(
            total=record.total, completed=record.completed, failed=record.failed
        ),
        "metadata": record.metadata or None,
    }
