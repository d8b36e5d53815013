"""The gateway's request log: one JSON line per request in the state dir
(``gateway-requests.jsonl``, 0600), rotated by size, with what a request
was and how it went (time, model, route, status, latency, tokens), never
its body or a key. The page shows the last ones; ``alvis-fsm gateway log``
reads the file.

Kept light (standard library and the foundation's text.py only): the CLI's
``gateway log`` imports it."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from alvis_fsm.text import inert_line

FILE = "gateway-requests.jsonl"
# The routes a request is logged and counted under (``route_of``): vLLM's
# OpenAI routes the gateway passes on; any other path is OTHER. A fixed set:
# a client's path never becomes a log line's or a metric label's text, and
# ``/metrics`` keeps a bounded number of series whatever paths are tried.
ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/score",
        "/v1/rerank",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)
OTHER = "other"
MAX_BYTES = 10 * 1024 * 1024  # a file this large is rotated
KEEP = 3  # rotated files kept: gateway-requests.jsonl.1 .. .3


@dataclass(frozen=True)
class Entry:
    """One request as the log keeps it."""

    time: float  # epoch seconds, when it arrived
    model: str  # the catalog name ("" for a request naming none)
    route: str  # one of ROUTES (e.g. /v1/chat/completions), or OTHER
    status: int  # the HTTP status sent (a stream's error event keeps its 200)
    latency_s: float  # arrival to the last byte sent
    ok: bool  # answered to the end without an error
    prompt_tokens: int | None = None  # from the answer's usage, if it had one
    completion_tokens: int | None = None
    stream: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, line: str) -> Entry | None:
        """The entry a log line holds, or None (damaged, another version)."""
        try:
            data = json.loads(line)
            return cls(
                time=float(data["time"]),
                model=str(data["model"]),
                route=str(data["route"]),
                status=int(data["status"]),
                latency_s=float(data["latency_s"]),
                ok=bool(data["ok"]),
                prompt_tokens=_int(data.get("prompt_tokens")),
                completion_tokens=_int(data.get("completion_tokens")),
                stream=bool(data.get("stream", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None


def route_of(path: str) -> str:
    """The route a request's path is logged and counted under: one of
    ``ROUTES``, else ``OTHER``."""
    return path if path in ROUTES else OTHER


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def path_of(state_dir: Path) -> Path:
    return state_dir / FILE


class RequestLog:
    """Appends entries (one ``write`` each, so a reader never sees half a
    line); rotates once the file passes ``max_bytes``."""

    def __init__(self, state_dir: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.path = path_of(state_dir)
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(self._fd, 0o600)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def write(self, entry: Entry) -> None:
        line = (json.dumps(entry.to_json(), separators=(",", ":")) + "\n").encode()
        try:
            fd = self._open()
            os.write(fd, line)
            self._size += len(line)
            if self._size >= self.max_bytes:
                self._rotate()
        except OSError:
            self.close()  # a full disk loses log lines, never a request

    def _rotate(self) -> None:
        self.close()
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.keep:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def format_entry(entry: Entry) -> str:
    """One line for a terminal: when, model, route, status, latency, tokens
    (the file's text made inert: it may come from another version, or be edited)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.time))
    tokens = "-" if entry.prompt_tokens is None else str(entry.prompt_tokens)
    tokens += "/" + ("-" if entry.completion_tokens is None else str(entry.completion_tokens))
    mark = "" if entry.ok else "  error"
    model, route = inert_line(entry.model) or "-", inert_line(entry.route)
    return (
        f"{when}  {model:<20} {route:<24} {entry.status:>3}"
        f" {entry.latency_s * 1000:>9.1f} ms  tokens {tokens}"
        f"{'  stream' if entry.stream else ''}{mark}"
    )


def read(state_dir: Path, last: int | None = None) -> list[Entry]:
    """The entries in the log (rotated files first, oldest first); the last
    ``last`` of them if given."""
    path = path_of(state_dir)
    files = [path.with_name(f"{path.name}.{n}") for n in range(KEEP, 0, -1)] + [path]
    entries: list[Entry] = []
    for file in files:
        with contextlib.suppress(FileNotFoundError):
            for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
                entry = Entry.parse(line)
                if entry is not None:
                    entries.append(entry)
    return entries[-last:] if last else entries


def follow(state_dir: Path, poll: float = 0.5) -> Iterator[Entry]:
    """New entries as they are written from this call on (``tail -f``),
    across rotations; until the caller stops iterating."""
    path = path_of(state_dir)
    handle: BinaryIO | None
    try:  # opened now, not at the generator's first next(): "new" is from here
        handle = path.open("rb")
        handle.seek(0, os.SEEK_END)
    except FileNotFoundError:
        handle = None  # a file made later is read whole
    return _follow(path, poll, handle)


def _follow(path: Path, poll: float, handle: BinaryIO | None) -> Iterator[Entry]:
    inode = os.fstat(handle.fileno()).st_ino if handle is not None else None
    partial = ""
    try:
        while True:
            if handle is None:
                try:
                    handle = path.open("rb")
                except FileNotFoundError:
                    time.sleep(poll)
                    continue
                inode = os.fstat(handle.fileno()).st_ino
                partial = ""
            chunk = handle.read().decode("utf-8", "replace")
            if chunk:
                partial += chunk
                *lines, partial = partial.split("\n")
                for line in lines:
                    entry = Entry.parse(line)
                    if entry is not None:
                        yield entry
                continue
            try:
                rotated = os.stat(path).st_ino != inode
            except FileNotFoundError:
                rotated = True
            if rotated:
                handle.close()
                handle = None
                continue
            time.sleep(poll)
    finally:
        if handle is not None:
            handle.close()
