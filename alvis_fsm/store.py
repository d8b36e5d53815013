"""Persisted session state: one JSON file per session in the state directory.

Written at every transition, atomically (temp file, fsync, rename) with mode
0600 in a 0700 directory: it holds the session's API key. A file that is
corrupt or from a newer format is reported and left alone, never silently
overwritten. A lock file (flock, portable to macOS) stops two processes
from driving one session. Kept light: ``status --offline`` imports only this."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alvis_fsm.errors import SessionError, UsageError

FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
LIVE = ("submitted", "running", "serving", "tunneled")


def default_state_dir() -> Path:
    return Path(os.environ.get("ALVIS_FSM_SESSION__STATE_DIR", "~/.alvis-vllm")).expanduser()


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"Invalid session name {name!r}",
            hint="Use letters, digits, '.', '_' or '-' (at most 41 characters, not starting with '.', '_' or '-').",
        )
    return name


@dataclass
class SessionRecord:
    """Everything ``resume``, ``status`` and ``stop`` need. The first keys are
    the requirements' .vllm-session keys."""

    name: str
    model: str
    state: str = "idle"
    job_id: str = ""
    node: str = ""
    port: int = 0  # vLLM's port on the node
    local_port: int = 0
    run_dir: str = ""
    started: str = ""  # ISO time the session was created
    job_name: str = ""
    served_name: str = ""
    api_key: str = ""
    route: str = "jump"
    bind: str = "127.0.0.1"
    login_host: str = ""
    control_path: str = ""  # the shared connection's socket
    tunnel_control_path: str = ""  # the route-jump tunnel's socket
    time_limit: str = ""
    time_limit_s: int = 0
    running_since: float = 0.0  # epoch seconds the job started running
    detached: bool = False
    client_pid: int = 0
    end_reason: str = ""
    history: list[list[str]] = field(default_factory=list)  # [state, iso time]
    entered_at: dict[str, float] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def url(self) -> str:
        return f"http://localhost:{self.local_port}" if self.local_port else ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> SessionRecord:
        if not isinstance(data, dict) or "name" not in data or "model" not in data:
            raise SessionError(f"Session file {path} is not an alvis-fsm session", hint=_keep_hint(path))
        if int(data.get("format", 0)) > FORMAT:
            raise SessionError(
                f"Session file {path} was written by a newer alvis-fsm (format {data.get('format')})",
                hint="Upgrade alvis-fsm to manage this session; the file was left untouched.",
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise SessionError(f"Session file {path} is damaged: {exc}", hint=_keep_hint(path)) from exc


def _keep_hint(path: Path) -> str:
    return (
        f"The file was left as it is. Inspect it, or move it away (mv {path} {path}.bad) "
        "and check `squeue -u $USER` on the login node for a job left running."
    )


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.sessions = state_dir / "sessions"

    def ensure(self) -> None:
        for d in (self.dir, self.sessions):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def path(self, name: str) -> Path:
        return self.sessions / f"{check_name(name)}.json"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def load(self, name: str) -> SessionRecord:
        path = self.path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SessionError(
                f"No session named '{name}'",
                hint="`alvis-fsm status --offline` lists the sessions.",
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SessionError(
                f"Session file {path} is corrupt (line {exc.lineno}: {exc.msg})", hint=_keep_hint(path)
            ) from exc
        return SessionRecord.from_json(data, path)

    def save(self, record: SessionRecord) -> None:
        self.ensure()
        path = self.path(record.name)
        data = json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{record.name}.", suffix=".tmp", dir=self.sessions)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()

    def names(self) -> list[str]:
        if not self.sessions.is_dir():
            return []
        return sorted(p.stem for p in self.sessions.glob("*.json") if NAME_RE.fullmatch(p.stem))

    def all(self) -> tuple[list[SessionRecord], list[SessionError]]:
        """Every readable session, and the errors for those that are not."""
        records: list[SessionRecord] = []
        errors: list[SessionError] = []
        for name in self.names():
            try:
                records.append(self.load(name))
            except SessionError as exc:
                errors.append(exc)
        return records, errors

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the session's lock, or fail at once naming who holds it."""
        self.ensure()
        lock_path = self.sessions / f".{check_name(name)}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                raise SessionError(
                    f"Session '{name}' is being driven by another alvis-fsm (pid {holder})",
                    hint="Use that terminal, or stop it first; `alvis-fsm status` shows the session.",
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def locked(self, name: str) -> bool:
        lock_path = self.sessions / f".{name}.lock"
        if not lock_path.exists():
            return False
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def session_names() -> list[str]:
    """For shell completion: never raises, reads no settings."""
    try:
        return Store(default_state_dir()).names()
    except OSError:
        return []
