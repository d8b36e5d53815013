"""The gateway's Files and Batches API (OpenAI's ``/v1/files`` and
``/v1/batches``), so that ``client.files.create``, ``client.batches.create``,
``client.batches.retrieve`` and ``client.files.content`` run unchanged
against the gateway.

Files live in ``STATE_DIR/files/`` (``file-….jsonl`` and its ``.json``
object, 0600). A batch is the engine's (engine/batch/):
it runs on the cluster, so stopping the gateway does not stop it, and a
restarted gateway or the CLI sees it. Its output and error files are
downloaded into the file store the first time it is retrieved ended.

Calls that talk to the cluster (create, retrieve of an unfinished batch,
cancel) run in a worker thread; ``ops`` replaces them in unit tests."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from alvis_fsm.engine.batch.input import ENDPOINTS, Validated, validate
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import (
    DEFAULT_WINDOW,
    BatchRecord,
    BatchStore,
    check_id,
    openai_object,
    window_seconds,
)
from alvis_fsm.engine.observer import Quiet
from alvis_fsm.errors import AlvisError, UsageError
from alvis_fsm.files import atomic_write
from alvis_fsm.fronts.gateway.openai.proxy import BadBody, read_json
from alvis_fsm.text import has_controls

if TYPE_CHECKING:
    from alvis_fsm.engine.settings.model import Settings

FILE_ID_CHARS = "0123456789abcdef"
MAX_FILE = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
CHUNK = 1 << 20  # bytes per read when receiving an upload
MAX_FILENAME = 255  # characters in an uploaded file's name (most file systems' limit)


@dataclass
class Ops:
    """What the routes ask of the cluster (by default, engine/batch/service.py)."""

    submit: Callable[[Validated, str, dict[str, str], str], BatchRecord]
    refresh: Callable[[BatchRecord], BatchRecord]
    cancel: Callable[[BatchRecord], BatchRecord]
    results: Callable[[BatchRecord, Path, Path], tuple[int, int]]
    resolve: Callable[[], dict[str, tuple[str, str]]] = field(default=dict)


def cluster_ops(settings: Settings) -> Ops:
    from alvis_fsm.engine.batch import service as batch_service

    ui = Quiet()

    def submit(
        valid: Validated, window: str, metadata: dict[str, str], file_id: str
    ) -> BatchRecord:
        options = batch_service.SubmitOptions(
            validated=valid, completion_window=window, metadata=metadata, input_file_id=file_id
        )
        return batch_service.submit(settings, options, ui)

    return Ops(
        submit=submit,
        refresh=lambda r: batch_service.refresh(settings, r, ui),
        cancel=lambda r: batch_service.cancel(settings, r, ui),
        results=lambda r, out, err: batch_service.results(settings, r, ui, out, err),
        resolve=lambda: batch_service.resolver(settings),
    )


async def _receive(part: BodyPartReader, path: Path) -> int:
    """Write an upload's part to ``path`` a chunk at a time (stopping past
    MAX_FILE); the bytes received."""
    size = 0
    with path.open("wb") as handle:
        while chunk := await part.read_chunk(CHUNK):
            size += len(chunk)
            if size > MAX_FILE:
                break
            handle.write(chunk)
    return size


def _validate_file(path: Path, resolve: dict[str, tuple[str, str]]) -> Validated:
    """An uploaded input file, validated line by line (see engine.batch.input.validate)."""
    with path.open(encoding="utf-8") as handle:
        return validate((line.removesuffix("\n") for line in handle), resolve)


def _filename(given: str | None) -> str:
    """An upload's file name as given (it is shown back, as OpenAI does),
    or ``BadBody`` for one that is not a short plain line."""
    if given is None:
        return "upload.jsonl"
    if has_controls(given):
        raise BadBody(
            _error(
                400,
                "The file name holds control characters (a NUL, a newline, an"
                " escape...): give the file a plain name",
                "invalid_filename",
            )
        )
    if len(given) > MAX_FILENAME:
        raise BadBody(
            _error(
                400,
                f"The file name is {len(given)} characters long: at most {MAX_FILENAME} are kept",
                "invalid_filename",
            )
        )
    return given


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return web.json_response(body, status=status)


class Files:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "files"

    def _meta(self, file_id: str) -> Path:
        if not (
            file_id.startswith("file-")
            and all(c in FILE_ID_CHARS for c in file_id[5:])
            and len(file_id) == 29
        ):
            raise KeyError(file_id)
        return self.dir / f"{file_id}.json"

    def content_path(self, file_id: str) -> Path:
        return self._meta(file_id).with_suffix(".jsonl")

    def staging(self) -> Path:
        """A new private file in the store's directory, for content written
        piece by piece before ``add`` moves it into place."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=self.dir)  # 0600
        os.close(fd)
        return Path(name)

    def add(self, source: Path, filename: str, purpose: str) -> dict[str, Any]:
        """Move ``source`` (a file in ``self.dir``, e.g. from ``staging``)
        into the store as a new file; its object."""
        file_id = "file-" + secrets.token_hex(12)
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": source.stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }
        source.chmod(0o600)
        os.replace(source, self.content_path(file_id))
        atomic_write(self._meta(file_id), json.dumps(obj))
        return obj

    def get(self, file_id: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._meta(file_id).read_text(encoding="utf-8"))
        except (KeyError, OSError, ValueError):
            raise KeyError(file_id) from None
        return data

    def all(self) -> list[dict[str, Any]]:
        out = []
        for path in self.dir.glob("file-*.json"):
            try:
                out.append(self.get(path.stem))
            except KeyError:
                continue
        return sorted(out, key=lambda f: (f["created_at"], f["id"]))

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self.content_path(file_id).unlink(missing_ok=True)
        self._meta(file_id).unlink(missing_ok=True)


class Batches:
    def __init__(self, state_dir: Path, ops: Ops) -> None:
        self.files = Files(state_dir)
        self.store = BatchStore(state_dir)
        self.ops = ops
        self.assembling: set[str] = set()  # batches whose results are being downloaded

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self.upload)
        router.add_get("/v1/files", self.list_files)
        router.add_get("/v1/files/{id}", self.file)
        router.add_get("/v1/files/{id}/content", self.content)
        router.add_delete("/v1/files/{id}", self.delete_file)
        router.add_post("/v1/batches", self.create)
        router.add_get("/v1/batches", self.list_batches)
        router.add_get("/v1/batches/{id}", self.retrieve)
        router.add_post("/v1/batches/{id}/cancel", self.cancel)

    # -- files ----------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return _error(400, "Upload a file as multipart/form-data with 'file' and 'purpose'")
        purpose, filename, size = "", "upload.jsonl", 0
        staged = self.files.staging()
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    filename = _filename(part.filename)
                    size = await _receive(part, staged)
                    if size > MAX_FILE:
                        return _error(
                            413, f"The file is larger than {MAX_FILE // (1024 * 1024)} MB"
                        )
            if purpose != "batch":
                return _error(
                    400,
                    f"purpose {purpose!r} is not supported: the gateway keeps files for batches"
                    " (purpose=batch)",
                )
            if not size:
                return _error(400, "No file in the upload ('file' part)")
            return web.json_response(self.files.add(staged, filename, purpose))
        finally:
            staged.unlink(missing_ok=True)  # gone already when added

    async def list_files(self, request: web.Request) -> web.Response:
        data = self.files.all()
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def file(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.files.get(request.match_info["id"]))
        except KeyError:
            return _error(404, f"No such file: {request.match_info['id']}", "file_not_found")

    async def content(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["id"]
        try:
            self.files.get(file_id)
            return web.FileResponse(
                self.files.content_path(file_id),
                headers={"Content-Type": "application/octet-stream"},
            )
        except KeyError:
            return _error(404, f"No such file: {file_id}", "file_not_found")

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        try:
            self.files.delete(file_id)
        except KeyError:
            return _error(404, f"No such file: {file_id}", "file_not_found")
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # -- batches --------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        body = await read_json(request, 'a JSON object with "input_file_id" and "endpoint"')
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object")
        file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window") or DEFAULT_WINDOW
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            return _error(400, "metadata must be an object of strings")
        try:
            window_seconds(str(window))
            self.files.get(str(file_id))
        except UsageError as exc:
            return _error(400, exc.message)
        except KeyError:
            return _error(400, f"No such file: {file_id}", "file_not_found")
        if endpoint not in ENDPOINTS:
            return _error(400, f"endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
        path = self.files.content_path(str(file_id))
        try:
            resolve = await asyncio.to_thread(self.ops.resolve)
            valid = await asyncio.to_thread(_validate_file, path, resolve)
        except UnicodeDecodeError:
            return _error(400, "The input file is not UTF-8 text")
        except UsageError as exc:
            return _error(400, f"{exc.message} (input file {file_id}; nothing was submitted)")
        if valid.endpoint != endpoint:
            return _error(
                400, f"The input file's requests go to {valid.endpoint}, not to {endpoint}"
            )
        try:
            record = await asyncio.to_thread(
                self.ops.submit, valid, str(window), metadata, str(file_id)
            )
        except AlvisError as exc:
            return _error(
                502 if exc.exit_code >= 4 else 400,
                exc.message + (f" ({exc.hint})" if exc.hint else ""),
            )
        return web.json_response(openai_object(record))

    def find(self, batch_id: str) -> BatchRecord | None:
        """The batch of that id on this gateway, or None (no such batch, or not an id)."""
        try:
            return self.store.load(check_id(batch_id))
        except AlvisError:
            return None

    async def retrieve(self, request: web.Request) -> web.Response:
        record = self.find(request.match_info["id"])
        if record is None:
            return _error(404, f"No such batch: {request.match_info['id']}", "batch_not_found")
        try:
            if not record.ended:
                record = await asyncio.to_thread(self.ops.refresh, record)
            # Checked and marked with no await between: one download per batch.
            if (
                record.ended
                and not (record.output_file_id or record.error_file_id)
                and record.id not in self.assembling
            ):
                self.assembling.add(record.id)
                try:
                    await asyncio.to_thread(self._download, record)
                finally:
                    self.assembling.discard(record.id)
        except AlvisError:
            pass  # missing information is not bad news: the last known state
        # A completed batch is finalizing until its files are in the store.
        ready = bool(record.output_file_id or record.error_file_id)
        return web.json_response(openai_object(record, assembling=not ready))

    def _download(self, record: BatchRecord) -> None:
        out = self.files.dir / f".{record.id}.out"
        err = self.files.dir / f".{record.id}.err"
        self.files.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        n_ok, n_err = self.ops.results(record, out, err)
        if n_ok:
            record.output_file_id = self.files.add(
                out, f"{record.id}_output.jsonl", "batch_output"
            )["id"]
        if n_err:
            record.error_file_id = self.files.add(err, f"{record.id}_errors.jsonl", "batch_output")[
                "id"
            ]
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        self.store.save(record)

    async def list_batches(self, request: web.Request) -> web.Response:
        records = list(reversed(self.store.all()))  # newest first, as OpenAI lists
        after = request.query.get("after")
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return _error(400, "limit must be a whole number from 1 to 100")
        if not 1 <= limit <= 100:
            return _error(400, "limit must be a whole number from 1 to 100")
        if after:
            ids = [r.id for r in records]
            if after not in ids:
                return _error(400, f"after: no such batch {after}")
            records = records[ids.index(after) + 1 :]
        page = records[:limit]
        data = [openai_object(r) for r in page]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "has_more": len(records) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        record = self.find(request.match_info["id"])
        if record is None:
            return _error(404, f"No such batch: {request.match_info['id']}", "batch_not_found")
        if record.ended:
            return _error(409, f"Batch {record.id} has already ended ({record.status})")
        try:
            record = await asyncio.to_thread(self.ops.cancel, record)
        except AlvisError as exc:
            # Marked cancelled at least: the scheduler has not confirmed yet.
            record = self.find(record.id) or record
            if record.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
                return _error(502, exc.message)
        return web.json_response(openai_object(record))
