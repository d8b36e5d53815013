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
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from alvis_fsm.engine.session.states import LIVE_STATES, State
from alvis_fsm.engine.settings.layers import env_name, user_config_path
from alvis_fsm.errors import SessionError, UsageError
from alvis_fsm.files import atomic_write
from alvis_fsm.paths import packaged_default

# A held lock whose holder has not written its pid yet (it does so right
# after taking it): not a pid, never signalled.
UNNAMED_HOLDER: Final = -1

# 2: who drives the session is one field, ``driver`` (with ``driver_pid``);
# format 1's ``detached``, ``client_pid`` and ``supervisor_pid`` are read
# into it (``_legacy_driver``), never written.
FORMAT = 2
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
_KNOWN_STATES = frozenset(State)
STATE_DIR_ENV = env_name("session", "state_dir")


def default_state_dir() -> Path:
    """The state directory without loading the settings (``status --offline``,
    shell completion): the environment, else the user's settings file
    (``[session] state_dir``), else the packaged default. The same order as
    the settings; the user file is only read with tomllib, not validated."""
    for key, value in os.environ.items():
        if key.upper() == STATE_DIR_ENV and value:
            return Path(value).expanduser()
    conf = user_config_path()
    try:
        with conf.open("rb") as handle:
            section = tomllib.load(handle).get("session", {})
        configured = section.get("state_dir") if isinstance(section, dict) else None
        if isinstance(configured, str) and configured:
            return Path(configured).expanduser()
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        pass  # the full settings load reports a bad file; here, fall back
    return Path(packaged_default("session.state_dir")).expanduser()


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"Invalid session name {name!r}",
            hint="Use letters, digits, '.', '_' or '-' "
            "(at most 41 characters, not starting with '.', '_' or '-').",
        )
    return name


class Driver(StrEnum):
    """Who drives a session: the process that holds its lock and runs its
    machine, as its record says (``SessionRecord.driver``, with the pid).
    ``engine/session/ownership.py`` changes the driver from outside."""

    NOBODY = "nobody"  # new, or its driver let go: ended, or kept for `resume`
    CLIENT = "client"  # a foreground client: `start`, `resume`, a front's thread
    HANDING_OVER = "handing over"  # detached: its supervisor is taking the lock
    SUPERVISOR = "supervisor"  # the background keeper of a detached session's tunnel


# Who may follow whom (a move to the driver already there changes nothing).
# Whoever holds the lock drives: a client or a supervisor takes the session
# from anyone (the one before let go, or died and lost the lock with its
# process); only a client detaches, handing over to a supervisor.
DRIVER_TRANSITIONS: Final[dict[Driver, frozenset[Driver]]] = {
    Driver.NOBODY: frozenset({Driver.CLIENT, Driver.SUPERVISOR}),
    Driver.CLIENT: frozenset({Driver.NOBODY, Driver.HANDING_OVER, Driver.SUPERVISOR}),
    Driver.HANDING_OVER: frozenset({Driver.NOBODY, Driver.CLIENT, Driver.SUPERVISOR}),
    Driver.SUPERVISOR: frozenset({Driver.NOBODY, Driver.CLIENT}),
}
# Driven in the background: a holder of the lock is the supervisor (or one
# still starting up), which `stop` and `resume` take the session over from.
IN_BACKGROUND: Final = frozenset({Driver.HANDING_OVER, Driver.SUPERVISOR})


@dataclass
class SessionRecord:
    """Everything ``resume``, ``status`` and ``stop`` need. The first keys are
    the requirements' .vllm-session keys."""

    name: str
    model: str
    state: str = State.IDLE.value  # compare with State.X
    job_id: str = ""
    node: str = ""
    port: int = 0  # vLLM's port on the node (route login)
    remote_socket: str = ""  # vLLM's unix socket on the node (route jump)
    local_port: int = 0
    # The tunnel's private local end, a unix socket: the tool's own checks go
    # there (cluster/tunnel.py); the only end of a gateway session.
    local_socket: str = ""
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
    gpus: str = ""  # as asked of SLURM (--gpus-per-node), e.g. A40:1
    running_since: float = 0.0  # epoch seconds the job started running
    # While the job is pending: the scheduler's reason, in words, and its
    # expected start (cluster time, "YYYY-MM-DD HH:MM"), when it gives one.
    queue_reason: str = ""
    expected_start: str = ""
    driver: Driver = Driver.NOBODY
    driver_pid: int = 0  # a client's or a supervisor's; 0 for nobody, handing over
    end_reason: str = ""
    # The scheduler's state of the ended job (e.g. CANCELLED), when the end
    # was recorded from its answer (a supervisor or `status` noticing it).
    final_job_state: str = ""
    history: list[list[str]] = field(default_factory=list)  # [state, iso time]
    entered_at: dict[str, float] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def drive_as(self, driver: Driver, pid: int = 0) -> None:
        """The driver changes (``DRIVER_TRANSITIONS``); not saved. A client
        or a supervisor gives its pid, nobody and handing over none."""
        if driver is not self.driver and driver not in DRIVER_TRANSITIONS[self.driver]:
            raise ValueError(
                f"session {self.name!r}: no change of driver {self.driver} -> {driver}"
            )
        self.driver = driver
        self.driver_pid = pid if driver in (Driver.CLIENT, Driver.SUPERVISOR) else 0

    def let_go(self) -> None:
        """Its driver lets go: nobody drives the session (not saved)."""
        self.drive_as(Driver.NOBODY)

    def driven_by(self, driver: Driver, pid: int | None) -> bool:
        """Whether the record names ``pid`` as its driver, ``driver``."""
        return self.driver is driver and pid is not None and pid == self.driver_pid

    def outcome(self) -> str:
        """'job 5: stopped by the user' — how a finished session ended."""
        return f"job {self.job_id or '-'}" + (f": {self.end_reason}" if self.end_reason else "")

    def time_left(self, now: float | None = None) -> float | None:
        """Seconds until the job's time limit, judged by its start on the
        cluster's clock (``running_since``); None before it runs or without
        a limit."""
        if not self.running_since or not self.time_limit_s:
            return None
        return max(
            0.0, self.running_since + self.time_limit_s - (time.time() if now is None else now)
        )

    @property
    def url(self) -> str:
        if self.local_port:
            return f"http://localhost:{self.local_port}"
        return f"unix:{self.local_socket}" if self.local_socket else ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> SessionRecord:
        if not isinstance(data, dict) or "name" not in data or "model" not in data:
            raise SessionError(
                f"Session file {path} is not an alvis-fsm session", hint=_keep_hint(path)
            )
        fmt = data.get("format", 0)
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise SessionError(
                f"Session file {path} is damaged: 'format' is {fmt!r}", hint=_keep_hint(path)
            )
        if fmt > FORMAT:
            raise SessionError(
                f"Session file {path} was written by a newer alvis-fsm (format {fmt})",
                hint="Upgrade alvis-fsm to manage this session; the file was left untouched.",
            )
        values: dict[str, Any] = _legacy_driver(data, path) if "driver" not in data else {}
        for f in dataclasses.fields(cls):
            if f.name not in data or f.name == "format":
                continue  # read in any format up to FORMAT, held (and written) in FORMAT
            value = data[f.name]
            problem = _type_problem(f.name, value)
            if problem:
                raise SessionError(
                    f"Session file {path} is damaged: {problem}", hint=_keep_hint(path)
                )
            values[f.name] = _typed(f.name, value)
        if values["name"] != path.stem:
            raise SessionError(
                f"Session file {path} names session {values['name']!r}, not {path.stem!r}",
                hint=_keep_hint(path),
            )
        return cls(**values)


def _typed(name: str, value: Any) -> Any:
    if name == "running_since":
        return float(value)
    return Driver(value) if name == "driver" else value


def _legacy_driver(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Who drives a session whose record format 1 wrote, from its three
    fields: a client that is not the supervisor (a supervisor's runner
    recorded its pid as the client's too), else the supervisor, else a
    detached session handing over, else nobody."""
    old = {key: data.get(key, default) for key, default in _LEGACY.items()}
    for key, value in old.items():
        problem = _type_problem(key, value)
        if problem:
            raise SessionError(f"Session file {path} is damaged: {problem}", hint=_keep_hint(path))
    client, supervisor = old["client_pid"], old["supervisor_pid"]
    if client > 0 and client != supervisor:
        return {"driver": Driver.CLIENT, "driver_pid": client}
    if supervisor > 0:
        return {"driver": Driver.SUPERVISOR, "driver_pid": supervisor}
    return {"driver": Driver.HANDING_OVER if old["detached"] else Driver.NOBODY}


# Format 1's fields for the driver, with their defaults.
_LEGACY: dict[str, Any] = {"detached": False, "client_pid": 0, "supervisor_pid": 0}

# The JSON type each field must have (int accepted for a float).
_TYPES: dict[str, tuple[type, ...]] = {
    "port": (int,),
    "local_port": (int,),
    "time_limit_s": (int,),
    "driver_pid": (int,),
    "client_pid": (int,),
    "supervisor_pid": (int,),
    "running_since": (int, float),
    "detached": (bool,),
    "history": (list,),
    "entered_at": (dict,),
    "format": (int,),
}


def _type_problem(name: str, value: Any) -> str:
    want = _TYPES.get(name, (str,))
    if isinstance(value, bool) and bool not in want:
        return f"{name!r} is {value!r}"
    if not isinstance(value, want):
        return f"{name!r} is {value!r}"
    if name == "name" and isinstance(value, str) and not NAME_RE.fullmatch(value):
        return f"'name' is {value!r}"
    if name == "state" and isinstance(value, str) and value not in _KNOWN_STATES:
        return f"unknown state {value!r}"
    if name == "driver" and isinstance(value, str) and value not in _KNOWN_DRIVERS:
        return f"unknown driver {value!r}"
    if isinstance(value, list) and not all(
        isinstance(h, list) and all(isinstance(x, str) for x in h) for h in value
    ):
        return "'history' is not a list of [state, time]"
    if isinstance(value, dict) and not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        return "'entered_at' is not a map of state to time"
    return ""


_KNOWN_DRIVERS = frozenset(Driver)


def _keep_hint(path: Path) -> str:
    return (
        f"The file was left as it is. Inspect it, or move it away (mv {path} {path}.bad) "
        "and check `squeue -u $USER` on the login node for a job left running."
    )


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.sessions = state_dir / "sessions"
        self._writable: set[str] = set()  # names whose file was checked before the first write

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
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SessionError(
                f"No session named '{name}'",
                hint="`alvis-fsm status --offline` lists the sessions.",
            ) from None
        except OSError as exc:
            raise SessionError(
                f"Cannot read session file {path}: {exc.strerror or exc}", hint=_keep_hint(path)
            ) from exc
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise SessionError(
                f"Session file {path} is corrupt (not UTF-8 text at byte {exc.start})",
                hint=_keep_hint(path),
            ) from exc
        except json.JSONDecodeError as exc:
            raise SessionError(
                f"Session file {path} is corrupt (line {exc.lineno}: {exc.msg})",
                hint=_keep_hint(path),
            ) from exc
        except RecursionError as exc:
            raise SessionError(
                f"Session file {path} is corrupt (nested too deeply)", hint=_keep_hint(path)
            ) from exc
        return SessionRecord.from_json(data, path)

    def save(self, record: SessionRecord) -> None:
        """Write atomically (0600). Refuses to replace a file it cannot read
        (corrupt, or from a newer alvis-fsm), checked before the first write."""
        self.ensure()
        path = self.path(record.name)
        self._check_writable(record.name)
        atomic_write(path, json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")

    def _check_writable(self, name: str) -> None:
        """Raise (naming the file) if the session's file exists but is not one
        this version may replace. Checked once per session and store."""
        if name in self._writable:
            return
        if self.path(name).exists():
            self.load(name)
        self._writable.add(name)

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

    def prune(self, keep_days: float, now: float | None = None) -> list[str]:
        """Remove the files of sessions finished (cleaned) more than
        ``keep_days`` ago, judged by the file's last write; the names removed.
        Failed sessions are kept (their job's cancel may be unconfirmed), as
        are those someone holds the lock of, and everything when
        ``keep_days`` is 0."""
        if keep_days <= 0:
            return []
        cutoff = (time.time() if now is None else now) - keep_days * 86400
        removed = []
        records, _ = self.all()
        for record in records:
            if record.state != State.CLEANED or self.locked(record.name):
                continue
            try:
                if self.path(record.name).stat().st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            self.delete(record.name)
            with contextlib.suppress(OSError):
                self._lock_path(record.name).unlink()
            removed.append(record.name)
        return removed

    def _lock_path(self, name: str) -> Path:
        return self.sessions / f".{check_name(name)}.lock"

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the session's lock, or fail at once naming who holds it.

        flock is tied to the open file: it goes away with the process, so a
        killed client never leaves a stale lock. The holder's pid is written
        into the file for messages and for ``stop``."""
        self.ensure()
        fd = os.open(self._lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                raise SessionError(
                    f"Session '{name}' is being driven by another alvis-fsm"
                    + (f" (pid {pid})" if pid else ""),
                    hint=f"Use that terminal, or `alvis-fsm stop {name}` to end the session; "
                    "`alvis-fsm status` shows it.",
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            # Holding the lock means meaning to write: a file we could not
            # replace safely (corrupt, newer) stops us here, before any work.
            self._check_writable(name)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def holder(self, name: str) -> int | None:
        """The pid of the process holding the session's lock, or None if free;
        ``UNNAMED_HOLDER`` while the holder has not written its pid yet."""
        try:
            fd = os.open(self._lock_path(name), os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(fd) or UNNAMED_HOLDER
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def locked(self, name: str) -> bool:
        return self.holder(name) is not None

    def wait_unlocked(self, name: str, timeout: float, poll: float = 0.1) -> bool:
        """Wait until nobody holds the session's lock: True once free, False
        if it is still held after ``timeout`` seconds (the caller says why
        that matters). Polls: flock cannot wait with a timeout."""
        deadline = time.monotonic() + timeout
        while self.locked(name):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True


def _read_pid(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def session_names() -> list[str]:
    """For shell completion: never raises, reads no settings."""
    try:
        return Store(default_state_dir()).names()
    except (OSError, SessionError, UsageError):
        return []
