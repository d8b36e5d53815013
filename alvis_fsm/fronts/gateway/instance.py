"""The running gateway's entry in the state dir: ``gateway.json`` (pid,
port, started, log path; 0600, written atomically once it listens, removed
when it ends) under ``gateway.lock``, an flock the gateway holds for its
whole life. The lock, not the file, says whether a gateway runs: it goes
away with the process however it ends, so a file left by a killed gateway
is stale and is replaced, and a reused pid is never mistaken for it.

``stop`` ends the running gateway (the CLI's `gateway stop`, the Python
API's). Kept light (standard library and the store only; ``stop`` imports
the rest when called): ``status --offline`` reads it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alvis_fsm.errors import CancelUnconfirmed, SessionError
from alvis_fsm.files import atomic_write

if TYPE_CHECKING:
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.session.store import Store
    from alvis_fsm.engine.settings.model import Settings

FILE = "gateway.json"
LOCK = "gateway.lock"
LOG = "gateway.log"
OPEN = "gateway-open.html"  # the browser's way to a login link (``open_file``)
# `gateway stop` waits for the gateway's own shutdown wait (``shutdown_wait``)
# and this much more.
STOP_MARGIN_S = 30.0


@dataclass(frozen=True)
class Instance:
    pid: int
    port: int
    started: float  # epoch seconds
    log: str = ""  # the background gateway's log ("" in the foreground)

    @property
    def base_url(self) -> str:
        return f"http://localhost:{self.port}/v1"

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "base_url": self.base_url}


def file_path(state_dir: Path) -> Path:
    return state_dir / FILE


def log_path(state_dir: Path) -> Path:
    return state_dir / LOG


def open_file(state_dir: Path, url: str) -> Path:
    """A page that sends the browser on to ``url`` (a login link), written
    0600 in the private state dir, to open as ``file://``: the browser is
    started with this file's path, never the link's token on a command line
    another local user could read (as Jupyter's ``jupyter-*-open.html``).
    Replaced by the next; its token works once, for a short while."""
    from html import escape

    link = escape(url, quote=True)
    path = state_dir / OPEN
    atomic_write(
        path,
        (
            '<!doctype html>\n<html><head><meta charset="utf-8">'
            '<meta name="referrer" content="no-referrer">'
            f'<meta http-equiv="refresh" content="0;url={link}">'
            "<title>alvis-fsm gateway</title></head>\n"
            f'<body><p>Opening the gateway\'s page: <a href="{link}">follow this link</a>'
            " if nothing happens.</p></body></html>\n"
        ),
    )
    return path


def parse(text: str) -> Instance | None:
    """The instance a ``gateway.json`` describes, or None if it is not one
    (damaged, half-written by another version): never raises."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    pid, port, started, log = (data.get(k) for k in ("pid", "port", "started", "log"))
    if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
        return None
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
        return None
    if not isinstance(started, int | float) or isinstance(started, bool):
        return None
    return Instance(pid, port, float(started), log if isinstance(log, str) else "")


def _lock_held(state_dir: Path) -> bool:
    try:
        fd = os.open(state_dir / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def running(state_dir: Path) -> Instance | None:
    """The gateway that runs now, or None: a ``gateway.json`` whose lock is
    held (a stale file, its gateway gone, is ignored). None also while a
    gateway is starting and not yet listening (it has no port to give)."""
    if not _lock_held(state_dir):
        return None
    try:
        text = file_path(state_dir).read_text(encoding="utf-8")
    except OSError:
        return None
    return parse(text)


def claimed(state_dir: Path) -> bool:
    """A gateway holds the lock (listening, about to, or stopping)."""
    return _lock_held(state_dir)


class Registration:
    """This process's claim to be the gateway of ``state_dir`` (``claim``)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def publish(self, port: int, log: str = "") -> Instance:
        """Say where this gateway listens: call once it does."""
        instance = Instance(os.getpid(), port, time.time(), log)
        atomic_write(file_path(self.state_dir), json.dumps(instance.to_json(), indent=2) + "\n")
        return instance


@contextlib.contextmanager
def claim(state_dir: Path) -> Iterator[Registration]:
    """Be the gateway of ``state_dir`` for the block: fails at once, naming
    the port, if another one is; a stale ``gateway.json`` is replaced. The
    file is removed when the block ends (the lock goes with the process
    even if it is killed)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise already_running(state_dir) from None
        # Ours now: whatever gateway.json says is of a gateway that is gone.
        with contextlib.suppress(FileNotFoundError):
            file_path(state_dir).unlink()
        try:
            yield Registration(state_dir)
        finally:
            with contextlib.suppress(FileNotFoundError):
                file_path(state_dir).unlink()
    finally:
        os.close(fd)  # releases the flock


def already_running(state_dir: Path) -> SessionError:
    """The error for a second gateway of the same state dir."""
    try:
        other = parse(file_path(state_dir).read_text(encoding="utf-8"))
    except OSError:
        other = None
    where = f" on port {other.port} (pid {other.pid})" if other else " (starting)"
    return SessionError(
        f"A gateway is already running{where}",
        hint="Use it (`alvis-fsm env --gateway` prints its exports), or end it with"
        " `alvis-fsm gateway stop` first.",
    )


# -- stopping the gateway ----------------------------------------------------------------


def shutdown_wait(cfg: Settings) -> float:
    """How long the gateway's shutdown waits for its sessions to clean up
    (the cancel confirmation and 60 s)."""
    return cfg.timeouts.cancel_confirm + 60


def stop(cfg: Settings, ui: Observer) -> None:
    """SIGTERM to the recorded gateway (foreground or background), then wait
    until it has shut down: its jobs cancelled, confirmed or not (the CLI's
    `gateway stop`, and the Python API's through the gateway)."""
    from alvis_fsm.engine.session.ownership import terminate
    from alvis_fsm.engine.session.store import Store

    state_dir = cfg.state_dir
    found = running(state_dir)
    if found is None and not claimed(state_dir):
        # Idempotent, as `stop` is: nothing to stop is not a failure.
        ui.result("No gateway is running; nothing to stop.")
        return
    if found is None:
        raise SessionError(
            "A gateway is starting or stopping in this state directory",
            hint="Wait a moment, then `alvis-fsm gateway stop` again.",
        )
    ui.info(
        f"Stopping the gateway (pid {found.pid}, {found.base_url}); it cancels every job it started..."
    )
    terminate(found.pid, f"The gateway (pid {found.pid}) cannot be signalled by this user")
    wait = shutdown_wait(cfg) + STOP_MARGIN_S
    if not _wait_released(state_dir, wait):
        raise SessionError(
            f"The gateway (pid {found.pid}) did not stop within {wait:.0f} s",
            hint=f"Check that process (ps -p {found.pid})"
            + (f" and its log ({found.log})" if found.log else "")
            + "; `alvis-fsm gateway stop` again once it is gone.",
        )
    left = unconfirmed(Store(state_dir))
    if left:
        raise CancelUnconfirmed(
            "Gateway stopped; not confirmed that these jobs were cancelled: " + ", ".join(left),
            hint="`alvis-fsm status` lists them; `alvis-fsm stop NAME` tries again.",
        )
    ui.result("Gateway stopped; nothing left running")


def _wait_released(state_dir: Path, timeout: float) -> bool:
    # Polls: flock cannot wait with a timeout (as Store.wait_unlocked).
    deadline = time.monotonic() + timeout
    while claimed(state_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def unconfirmed(store: Store) -> list[str]:
    """Gateway sessions whose job may still exist: live, or failed with a
    cancel the scheduler did not confirm ("NAME (job ID)")."""
    from alvis_fsm.engine.session.service import needs_check
    from alvis_fsm.fronts.gateway.slot.sessions import is_gateway_session

    records, _ = store.all()
    return [
        f"{r.name} (job {r.job_id or '-'})"
        for r in records
        if is_gateway_session(r.name) and needs_check(r)
    ]


class LogFile:
    """The background gateway's log (its stdout and stderr, ``fd``), rotated:
    past ``max_bytes`` it becomes ``gateway.log.1`` (the one before is
    dropped) and a new ``gateway.log`` (0600) takes descriptors 1 and 2, so
    whatever else the process writes goes there too. Lines from outside
    arrive inert already; a flood of them costs at most twice ``max_bytes``."""

    def __init__(self, path: Path, fd: int = 2, max_bytes: int = 5 * 1024 * 1024) -> None:
        self.path = path
        self.fd = fd
        self.max_bytes = max_bytes

    def write(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode("utf-8", "replace"))
        if os.fstat(self.fd).st_size >= self.max_bytes:
            self.rotate()

    def rotate(self) -> None:
        with contextlib.suppress(OSError):
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        new = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            if self.fd in (1, 2):
                os.dup2(new, 1)
                os.dup2(new, 2)
            else:
                os.dup2(new, self.fd)
        finally:
            os.close(new)
