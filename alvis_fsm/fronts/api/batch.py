"""Batches from Python (docs/guides/batch.md, docs/guides/python-api.md)::

    import alvis_fsm
    requests = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-oss-20b", "messages": [{"role": "user", "content": q}]}}
                for i, q in enumerate(questions)]
    b = alvis_fsm.batch(requests)          # or alvis_fsm.batch("requests.jsonl", model=...)
    print(b.id, b.status)                  # batch_… in_progress: it runs without this process
    b.wait()                               # polls the cluster until the batch ends
    for line in b.results():               # OpenAI's output lines, in input order
        print(line["custom_id"], line["response"]["body"]["choices"][0]["message"]["content"])
    for line in b.errors(): ...            # refusals and the requests not run
    alvis_fsm.batches()                    # every batch, as last seen (no network)

The same engine as ``alvis-fsm batch`` (engine/batch/service.py): the whole
input is validated before anything is uploaded (a ``UsageError`` naming the
request's number), the batch runs on the cluster, and its record in the
state directory is shared with the CLI and the gateway. Progress goes to the
``alvis_fsm`` logger; nothing is asked."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from alvis_fsm.engine.batch.input import validate
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord, BatchStore
from alvis_fsm.errors import UsageError

if TYPE_CHECKING:
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.settings.model import Settings

log = logging.getLogger("alvis_fsm")
POLL_S = 10.0


def _service() -> ModuleType:
    from alvis_fsm.engine.batch import service as batch_service

    return batch_service


def _observer() -> Observer:
    from alvis_fsm.fronts.api.session import LogReporter

    return LogReporter()


def _settings() -> Settings:
    from alvis_fsm.engine.settings.model import load_settings

    return load_settings()


class Batch:
    """One batch: its record (``STATE_DIR/batches/ID.json``) and what can be
    asked of it. ``service`` is engine/batch/service.py (tests give another)."""

    def __init__(self, record: BatchRecord, settings: Settings, service: Any = None) -> None:
        self.record = record
        self.settings = settings
        self.service = service or _service()
        self.store = BatchStore(settings.state_dir)

    def __repr__(self) -> str:
        r = self.record
        return f"<Batch {r.id} {r.status} {r.completed}/{r.total} done, {r.failed} failed>"

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def status(self) -> BatchStatus:
        """As last seen; ``refresh()`` asks the cluster."""
        return self.record.status

    @property
    def request_counts(self) -> dict[str, int]:
        r = self.record
        return dict(total=r.total, completed=r.completed, failed=r.failed)

    @property
    def error(self) -> str:
        """The cause, when the batch failed."""
        return self.record.error

    def refresh(self) -> Batch:
        """Ask the cluster (an ended batch is not asked again)."""
        self.service.refresh(self.settings, self.record, _observer(), store=self.store)
        return self

    def wait(
        self,
        timeout: float | None = None,
        poll: float = POLL_S,
        progress: Callable[[Batch], None] | None = None,
    ) -> Batch:
        """Poll the cluster (one connection) until the batch ends; ``progress``
        is called after each poll. Past ``timeout`` seconds: ``TimeoutError``
        (the batch runs on)."""
        ui = _observer()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.service.connected(self.settings, ui) as remote:
            while True:
                self.service.refresh(self.settings, self.record, ui, remote, self.store)
                if progress is not None:
                    progress(self)
                if self.record.ended:
                    return self
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"Batch {self.id} is still {self.record.status} after {timeout:.0f} s; "
                        "it runs on without this process"
                    )
                log.info(
                    "batch %s: %s, %d done, %d failed of %d",
                    self.id,
                    self.record.status,
                    self.record.completed,
                    self.record.failed,
                    self.record.total,
                )
                time.sleep(
                    poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
                )

    def download(self, out: str | Path, errors: str | Path) -> tuple[int, int]:
        """OpenAI's output and error files (every custom_id once across the
        two, in input order; for a batch still running, the results so far):
        their line counts."""
        lines: tuple[int, int] = self.service.results(
            self.settings, self.record, _observer(), Path(out), Path(errors), self.store
        )
        return lines

    def results(self) -> Iterator[dict[str, Any]]:
        """The output file's lines (the answers), one at a time."""
        return self._lines(errors=False)

    def errors(self) -> Iterator[dict[str, Any]]:
        """The error file's lines (refusals, and requests not run), one at a time."""
        return self._lines(errors=True)

    def _lines(self, errors: bool) -> Iterator[dict[str, Any]]:
        self.store.ensure()
        with tempfile.TemporaryDirectory(prefix=f".{self.id}-", dir=self.store.dir) as tmp:
            out, err = Path(tmp) / "output.jsonl", Path(tmp) / "errors.jsonl"
            self.download(out, err)
            if not self.record.ended:
                log.warning(
                    "batch %s is %s: these are the results so far", self.id, self.record.status
                )
            with (err if errors else out).open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield json.loads(line)

    def cancel(self) -> Batch:
        """Cancel, confirmed by the scheduler (``CancelUnconfirmed`` when it
        cannot say); the results so far are kept."""
        self.service.cancel(self.settings, self.record, _observer(), self.store)
        return self


def _request_lines(requests: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for number, request in enumerate(requests, start=1):
        try:
            yield json.dumps(request, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"Line {number}: the request is not JSON ({exc})",
                hint="Nothing was uploaded or submitted.",
            ) from None


def batch(
    requests: str | Path | Iterable[Mapping[str, Any]],
    *,
    model: str | None = None,
    time: str | None = None,
    jobs: int | str = 1,
    completion_window: str = "24h",
    metadata: Mapping[str, str] | None = None,
    service: Any = None,
) -> Batch:
    """Submit a batch: ``requests`` is a JSONL file (OpenAI's batch format)
    or the requests themselves (dicts of that format, read once: a
    generator is fine). ``model`` fills a missing ``body.model``; ``time``
    is each job's limit (as ``-t``), ``jobs`` a number or ``"auto"``. The
    whole input is validated first; a problem is a ``UsageError`` naming the
    line (the request's number) and nothing is uploaded or submitted.
    Returns once the jobs are submitted."""
    service = service or _service()
    cfg = _settings()
    options: dict[str, Any] = {
        "model": model,
        "time": time,
        "jobs": str(jobs),
        "completion_window": completion_window,
        "metadata": dict(metadata or {}),
    }
    if isinstance(requests, (str, Path)):
        options["path"] = Path(requests)
    else:
        options["validated"] = validate(_request_lines(requests), service.resolver(cfg), model)
    record = service.submit(cfg, service.SubmitOptions(**options), _observer())
    log.info(
        "batch %s: %d requests in %d job(s) of %s",
        record.id,
        record.total,
        record.shards,
        record.gpus,
    )
    return Batch(record, cfg, service)


def batches(service: Any = None) -> list[Batch]:
    """Every batch of this state directory, oldest first, as last seen (no
    network: ``refresh()`` asks the cluster)."""
    cfg = _settings()
    return [Batch(r, cfg, service) for r in BatchStore(cfg.state_dir).all()]


def get_batch(batch_id: str, service: Any = None) -> Batch:
    """The batch with this id (from the local record; ``refresh()`` asks the cluster)."""
    cfg = _settings()
    return Batch(BatchStore(cfg.state_dir).load(batch_id), cfg, service)
