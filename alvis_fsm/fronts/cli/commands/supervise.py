"""The background keeper of a detached session (``start --detach``,
``resume --detach``): it drives the session from ``tunneled`` with the same
loop as a foreground client, so a tunnel that drops (Wi-Fi change, sleep) is
reopened without anyone running `resume`.

It never ends a job. It lets go (exits, leaving job, tunnel and state) when
asked to (SIGTERM: `stop` and `resume` take over that way), when the job
ends (`status` then reports how), and when the job's time limit has passed.
While the network is gone it waits with backoff. Its output goes to
``sessions/NAME.supervisor.log`` in the state directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from alvis_fsm.engine.observer import Observer
from alvis_fsm.engine.store import SessionRecord, Store
from alvis_fsm.errors import SessionError
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import reporter, settings
from alvis_fsm.fronts.ui import Verbosity

# How long the supervisor waits for the command that started it to let go of
# the session's lock.
HANDOVER_S = 15.0


def log_path(store: Store, name: str) -> str:
    return str(store.sessions / f"{name}.supervisor.log")


def spawn(store: Store, record: SessionRecord) -> subprocess.Popen[bytes]:
    """Start the supervisor of a detached session, in the background, in a
    session of its own (a closed terminal does not end it)."""
    path = log_path(store, record.name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "alvis_fsm", "_supervise", record.name],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        os.close(fd)


class Handover:
    """A detach, in two halves: ``spawn`` runs while the detaching command
    still holds the session's lock (the engine's ``on_detached``); ``wait``
    runs once it has let go, and returns only when the supervisor holds the
    lock. Without the wait a `stop` or `resume` run the moment `start
    --detach` returns could find the lock free, skip the take-over, and then
    lose the lock to the supervisor picking it up."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._spawned: tuple[str, subprocess.Popen[bytes]] | None = None

    def spawn(self, record: SessionRecord) -> None:
        self._spawned = (record.name, spawn(self.store, record))

    def wait(self, ui: Observer, timeout: float = HANDOVER_S) -> bool:
        """True once the supervisor holds the lock; False (with a warning)
        if it exited or did not take it in time. Nothing was spawned: True."""
        if self._spawned is None:
            return True
        name, proc = self._spawned
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The lock, then the pid in the record: `status` names it too.
            if self.store.holder(name) == proc.pid and self._recorded(name) == proc.pid:
                return True
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        ui.warn(
            f"The background supervisor of session '{name}' did not take over "
            f"(see {log_path(self.store, name)}); the job keeps running, but a dropped "
            f"tunnel will not be reopened until `alvis-fsm resume {name}`"
        )
        return False

    def _recorded(self, name: str) -> int:
        try:
            return self.store.load(name).supervisor_pid
        except SessionError:
            return 0


def take_over(store: Store, record: SessionRecord, timeout: float = 60) -> bool:
    """If the session's lock is held by its supervisor, ask it to let go
    (SIGTERM) and wait until it has. True when there was one."""
    holder = store.holder(record.name)
    if not holder or holder < 0:
        return False
    fresh = store.load(record.name)
    # The supervisor, or one still starting (it holds the lock but has not
    # written its pid yet): a detached session's lock held by a process that
    # is not its foreground client. Until it drives, SIGTERM just ends it.
    if not (holder == fresh.supervisor_pid or (fresh.detached and holder != fresh.client_pid)):
        return False
    pid = holder
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if not store.wait_unlocked(record.name, timeout):
        raise SessionError(
            f"The background supervisor (pid {pid}) of session '{record.name}' "
            f"did not let go within {timeout:.0f} s",
            hint=f"Check that process (ps -p {pid}); kill it, then try again.",
        )
    return True


def run(name: str) -> None:
    from alvis_fsm.engine import service

    cfg = settings()
    store = Store(cfg.state_dir)
    ui = reporter(Verbosity.NORMAL)
    deadline = time.monotonic() + HANDOVER_S
    while True:
        try:
            with store.lock(name):
                service.supervise(cfg, store, name, ui, drive=signals.drive,
                                  shield=signals.shielded)  # fmt: skip
            return
        except SessionError:
            # The command that started us still holds the lock: wait a moment.
            if time.monotonic() > deadline or not store.exists(name):
                raise
            time.sleep(0.2)
