"""A batch's input file (OpenAI's JSONL): its validation, streamed, and its custom_ids."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from alvis_fsm.errors import UsageError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


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


def read_ids(path: Path) -> Iterator[str]:
    """The custom_ids of an ids file (``Validated.ids_path``, ``ID.ids``), streamed."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def disk_index(path: Path, table: str) -> sqlite3.Connection:
    """An on-disk table keyed by custom_id (duplicates at validation, the
    results at the merge: ``results.merge``): its memory is SQLite's page cache, bounded by
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
    seen = disk_index(work / "seen.db", "seen")
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
