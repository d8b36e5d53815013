"""A batch's results: the shards' raw rows merged into OpenAI's output and error files."""

from __future__ import annotations

import json
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from alvis_fsm.cluster.remote import batch_runner
from alvis_fsm.engine.batch.input import disk_index
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.files import atomic_writer

_UNDONE = {
    BatchStatus.EXPIRED: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    BatchStatus.CANCELLED: (
        "batch_cancelled",
        "This request was not executed because the batch was cancelled.",
    ),
    BatchStatus.FAILED: ("batch_failed", "This request was not executed because the batch failed."),
}


def merge(
    ids: Iterable[str], rows: Iterable[Mapping[str, Any]], status: BatchStatus
) -> Iterator[tuple[bool, dict[str, Any]]]:
    """(ok, line) for every custom_id of the input, once each and in input
    order: its result when a shard wrote one (the first, should a shard have
    written one twice), else, for an ended batch, an error line saying why
    it was not run. Internal keys (``_i``) are dropped.

    Streaming: ``rows`` (in any order: a shard writes its results as they
    complete, and a resumed shard after the ones it kept) go to an on-disk
    index by custom_id, then ``ids`` is walked in input order with one
    lookup each; memory stays flat whatever the number of lines."""
    undone = _UNDONE.get(status)
    with tempfile.TemporaryDirectory(prefix="alvis-fsm-merge-") as tmp:
        db = disk_index(Path(tmp) / "results.db", "res")
        try:
            for raw in rows:
                cid = raw.get("custom_id")
                if isinstance(cid, str):
                    row = {k: v for k, v in raw.items() if not k.startswith("_")}
                    db.execute(
                        "INSERT OR IGNORE INTO res VALUES (?, ?)",
                        (cid, json.dumps(row, ensure_ascii=False)),
                    )
            db.execute("COMMIT")
            for cid in ids:
                hit = db.execute("SELECT value FROM res WHERE cid = ?", (cid,)).fetchone()
                if hit is not None:
                    found: dict[str, Any] = json.loads(hit[0])
                    yield batch_runner.is_ok(found), found  # the runner's rule, once
                elif undone is not None:
                    yield (
                        False,
                        {
                            "id": "batch_req_" + secrets.token_hex(12),
                            "custom_id": cid,
                            "response": None,
                            "error": {"code": undone[0], "message": undone[1]},
                        },
                    )
        finally:
            db.close()


def result_rows(text: str | Iterable[str]) -> Iterator[dict[str, Any]]:
    """The result rows of the shards' raw files: their text, or their lines
    (a file handle, streamed)."""
    for line in text.split("\n") if isinstance(text, str) else text:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line a shard is writing right now: it comes whole next time
        if isinstance(row, dict):
            yield row


def write_results(
    ids: Iterable[str], rows: str | Iterable[str], status: BatchStatus, out: Path, errors: Path
) -> tuple[int, int]:
    """Merge the shards' raw results (their text, or their lines streamed)
    into OpenAI's output and error files, each replaced atomically, a line
    at a time. Returns the line counts."""
    n_ok = n_err = 0
    with atomic_writer(out) as ok_file, atomic_writer(errors) as err_file:
        for ok, row in merge(ids, result_rows(rows), status):
            (ok_file if ok else err_file).write(json.dumps(row, ensure_ascii=False) + "\n")
            n_ok, n_err = n_ok + ok, n_err + (not ok)
    return n_ok, n_err
