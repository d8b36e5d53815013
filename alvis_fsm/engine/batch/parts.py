"""Batches (the OpenAI Batch API on SLURM): the pure parts.

Validation of an input file (OpenAI's batch JSONL), the local record of a
batch and its store (``STATE_DIR/batches/``), reading the cluster's answer
about a batch (progress files, failure notes, the queue) into a status,
and merging the shards' results into OpenAI's output and error files. No
network here: ``engine.batch.service`` talks to the cluster."""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from alvis_fsm.cluster.remote import batch_runner
from alvis_fsm.engine.session.states import BatchStatus as BatchStatus
from alvis_fsm.engine.session.states import ShardState as ShardState
from alvis_fsm.engine.session.store import atomic_write, atomic_writer
from alvis_fsm.errors import SessionError, UsageError

FORMAT = 1
ID_RE = re.compile(r"^batch_[0-9a-f]{16}$")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
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


# -- validation ---------------------------------------------------------------


@dataclass(frozen=True)
class Validated:
    """An input file that passed: what to upload and what to remember. The
    re-serialised requests and the custom_ids are on disk, in a private
    temporary directory removed with this object, so the laptop's memory
    does not grow with the file."""

    endpoint: str
    model: str  # the catalog name
    served_name: str
    total: int  # the number of requests
    dir: Path  # requests.jsonl (what to upload) and ids.jsonl (the custom_ids, in order)

    @property
    def requests_path(self) -> Path:
        """One request a line, body.model set to the served name."""
        return self.dir / "requests.jsonl"

    @property
    def ids_path(self) -> Path:
        """The custom_ids in input order, one JSON string a line."""
        return self.dir / "ids.jsonl"

    def iter_ids(self) -> Iterator[str]:
        return read_ids(self.ids_path)

    @property
    def ids(self) -> list[str]:
        return list(self.iter_ids())

    @property
    def lines(self) -> list[str]:
        with self.requests_path.open(encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle]


def read_ids(path: Path) -> Iterator[str]:
    """The custom_ids of an ids file (``Validated.ids_path``, ``ID.ids``), streamed."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _index(path: Path, table: str) -> sqlite3.Connection:
    """An on-disk table keyed by custom_id (duplicates at validation, the
    results at the merge): its memory is SQLite's page cache, bounded by
    ``CACHE_KIB`` whatever the number of lines."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA temp_store=FILE")
    db.execute(f"CREATE TABLE {table}(cid TEXT PRIMARY KEY, value) WITHOUT ROWID")
    db.execute("BEGIN")
    return db


# SQLite's page cache for the on-disk indexes (KiB): the bound on the memory
# they take, whatever the number of lines.
CACHE_KIB = 2048


def _refuse(number: int, what: str, hint: str | None = None) -> UsageError:
    return UsageError(f"Line {number}: {what}", hint=hint or "Nothing was uploaded or submitted.")


def validate(
    lines: Iterable[str],
    resolve: Mapping[str, tuple[str, str]],
    model_flag: str | None = None,
) -> Validated:
    """Check every line of an OpenAI batch file; the first problem is refused
    with its line number. ``resolve`` maps both catalog names and served
    names to (catalog name, served name); ``model_flag`` (``-m``) fills a
    missing ``body.model`` and must agree with any given.

    Streaming: ``lines`` is read once, line by line; the re-serialised
    requests and the custom_ids go to files and the duplicate check to an
    on-disk index, so memory stays flat whatever the number of lines."""
    work = Path(tempfile.mkdtemp(prefix="alvis-fsm-batch-"))  # 0700
    try:
        with (
            (work / "requests.jsonl").open("w", encoding="utf-8") as out,
            (work / "ids.jsonl").open("w", encoding="utf-8") as ids,
        ):
            endpoint, model, total = _validate(lines, resolve, model_flag, work, out, ids)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    valid = Validated(
        endpoint=endpoint, model=model[0], served_name=model[1], total=total, dir=work
    )
    weakref.finalize(valid, shutil.rmtree, work, True)
    return valid


def _validate(
    lines: Iterable[str],
    resolve: Mapping[str, tuple[str, str]],
    model_flag: str | None,
    work: Path,
    out: TextIO,
    ids: TextIO,
) -> tuple[str, tuple[str, str], int]:
    endpoint = ""
    model: tuple[str, str] | None = None
    if model_flag is not None:
        if model_flag not in resolve:
            raise UsageError(
                f"-m/--model: unknown model {model_flag!r}",
                hint="`alvis-fsm models` lists the catalog.",
            )
        model = resolve[model_flag]
    seen = _index(work / "seen.db", "seen")
    try:
        return _check_lines(lines, resolve, endpoint, model, seen, out, ids)
    finally:
        seen.close()
        (work / "seen.db").unlink(missing_ok=True)


def _check_lines(
    lines: Iterable[str],
    resolve: Mapping[str, tuple[str, str]],
    endpoint: str,
    model: tuple[str, str] | None,
    seen: sqlite3.Connection,
    out: TextIO,
    ids: TextIO,
) -> tuple[str, tuple[str, str], int]:
    total = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        req = _parse_line(number, text)
        cid = req["custom_id"]
        try:
            seen.execute("INSERT INTO seen VALUES (?, ?)", (cid, number))
        except sqlite3.IntegrityError:
            (first,) = seen.execute("SELECT value FROM seen WHERE cid = ?", (cid,)).fetchone()
            raise _refuse(number, f"duplicate custom_id {cid!r} (first on line {first})") from None
        endpoint = _check_url(number, req, endpoint)
        model = _check_model(number, req["body"], resolve, model)
        _check_body(number, req["body"], endpoint)
        total += 1
        ids.write(json.dumps(cid, ensure_ascii=False) + "\n")
        out.write(
            json.dumps({**req, "body": {**req["body"], "model": model[1]}}, ensure_ascii=False)
            + "\n"
        )
    if not total or model is None:
        raise UsageError("The batch file holds no requests", hint="One JSON request per line.")
    return endpoint, model, total


def _parse_line(number: int, text: str) -> dict[str, Any]:
    """A line as a request object with its keys and a custom_id (the rest
    is checked by the steps after)."""
    try:
        req = json.loads(text)
    except ValueError as exc:
        raise _refuse(number, f"not valid JSON ({exc})") from None
    if not isinstance(req, dict):
        raise _refuse(number, "a request must be a JSON object")
    extra = sorted(set(req) - {"custom_id", "method", "url", "body"})
    if extra:
        raise _refuse(
            number,
            f"unknown key(s) {', '.join(map(repr, extra))}",
            "Each line is {custom_id, method, url, body}.",
        )
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise _refuse(number, "custom_id must be a non-empty string")
    return req


def _check_url(number: int, req: dict[str, Any], endpoint: str) -> str:
    """The method and the url (one url per batch): the batch's endpoint."""
    if req.get("method") != "POST":
        raise _refuse(number, f'method must be "POST", not {req.get("method")!r}')
    url = req.get("url")
    if url not in ENDPOINTS:
        raise _refuse(number, f"url {url!r} is not one of {', '.join(ENDPOINTS)}")
    if endpoint and url != endpoint:
        raise _refuse(
            number,
            f"url {url!r} differs from {endpoint!r} above",
            "One endpoint per batch: split the file.",
        )
    if not isinstance(req.get("body"), dict):
        raise _refuse(number, "body must be a JSON object")
    return str(url)


def _check_model(
    number: int,
    body: dict[str, Any],
    resolve: Mapping[str, tuple[str, str]],
    model: tuple[str, str] | None,
) -> tuple[str, str]:
    """body.model (or -m's), one model per batch: (catalog name, served name)."""
    name = body.get("model")
    if name is None:
        if model is None:
            raise _refuse(
                number, "body.model is missing", "Name the model in each body, or -m MODEL."
            )
        return model
    if not isinstance(name, str) or name not in resolve:
        raise _refuse(number, f"unknown model {name!r}", "`alvis-fsm models` lists the catalog.")
    if model is not None and resolve[name] != model:
        raise _refuse(
            number,
            f"model {name!r} differs from {model[0]!r}",
            "One model per batch: split the file.",
        )
    return resolve[name]


def _check_body(number: int, body: dict[str, Any], endpoint: str) -> None:
    """What the endpoint needs in the body (and no streaming)."""
    if endpoint != "/v1/embeddings" and body.get("stream"):
        raise _refuse(number, "body.stream is not allowed in a batch")
    if endpoint == "/v1/chat/completions" and not isinstance(body.get("messages"), list):
        raise _refuse(number, "body.messages must be a list for /v1/chat/completions")
    if endpoint == "/v1/completions" and "prompt" not in body:
        raise _refuse(number, "body.prompt is missing for /v1/completions")
    if endpoint == "/v1/embeddings" and "input" not in body:
        raise _refuse(number, "body.input is missing for /v1/embeddings")


# -- the local record ---------------------------------------------------------


@dataclass
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass
class BatchRecord:
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
    status: str = BatchStatus.VALIDATING.value  # compare with BatchStatus.X
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
    times: dict[str, int] = field(default_factory=dict)  # status -> epoch it was entered
    format: int = FORMAT

    def set_status(self, status: BatchStatus, now: float | None = None) -> None:
        if self.status != status:
            self.status = status.value
        key = {
            BatchStatus.IN_PROGRESS: "in_progress_at",
            BatchStatus.FINALIZING: "finalizing_at",
            BatchStatus.COMPLETED: "completed_at",
            BatchStatus.FAILED: "failed_at",
            BatchStatus.EXPIRED: "expired_at",
            BatchStatus.CANCELLING: "cancelling_at",
            BatchStatus.CANCELLED: "cancelled_at",
        }.get(status)
        if key and key not in self.times:
            self.times[key] = int(time.time() if now is None else now)

    @property
    def ended(self) -> bool:
        return BatchStatus(self.status).ended

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
            BatchStatus(record.status)
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

    def ids(self, batch_id: str) -> list[str]:
        return list(self.iter_ids(batch_id))

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
    status = BatchStatus(record.status)
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


# -- the cluster's answer -----------------------------------------------------


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
    if snap.cancelled_mark:
        if answered and not live:
            record.set_status(BatchStatus.CANCELLED, now)
        else:
            record.set_status(BatchStatus.CANCELLING, now)
        return record
    if record.status == BatchStatus.VALIDATING and (live or snap.progress):
        record.set_status(BatchStatus.IN_PROGRESS, now)
    if not answered or live:
        if snap.progress or live:
            record.set_status(BatchStatus.IN_PROGRESS, now)
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


# -- results ------------------------------------------------------------------

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


# What counts as an answer (not an error): the runner's own rule, once.
is_ok = batch_runner.is_ok


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
        db = _index(Path(tmp) / "results.db", "res")
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
                    yield is_ok(found), found
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
