"""Who drives a session, and its changes. One process at a time holds a
session's lock (the store's flock, with the holder's pid) and drives it; the
record says who, once (``store.Driver``, its moves ``DRIVER_TRANSITIONS``):
nobody, a foreground client (set by the Runner), a detached session handing
over to its background supervisor, or that supervisor (set here). A command
acting once (`stop`, `resume` before it drives) holds the lock without
driving. This module owns the changes of driver from outside:

- ``take_over``: a session driven in the background: its supervisor is asked
  to let go (SIGTERM) and waited for, so that `stop` or `resume` can drive it;
- ``stop_session``: a session stopped whoever drives it: its supervisor lets
  go, its foreground client is asked to stop as Ctrl+C would and waited for,
  then the job is cancelled and the cancel confirmed (``job_control.stop_job``);
- ``Handover``: a detached session handed to its supervisor, the detaching
  command returning only once the supervisor holds the lock;
- ``run_supervisor``: the supervisor's own loop, which keeps the tunnel up
  and never ends a job (it lets go when asked, when the job ends, and once
  the job's time limit has passed).

A front says only HOW a supervisor is started (``SupervisorCommand``: the
argv for a session's name); signal handlers stay the front's
(fronts/signals.py): here a signal is only ever sent to another process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alvis_fsm.engine.session.job_control import stop_job
from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import (
    IN_BACKGROUND,
    UNNAMED_HOLDER,
    Driver,
    SessionRecord,
    Store,
)
from alvis_fsm.errors import AlvisError, ConnectionLost, SessionError

if TYPE_CHECKING:
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.session.link import Shield
    from alvis_fsm.engine.session.runner import Runner
    from alvis_fsm.engine.settings.model import Settings

# The argv that starts the supervisor of the named session (the front's).
SupervisorCommand = Callable[[str], Sequence[str]]
Drive = Callable[["Runner"], None]

# How long a foreground client gets to cancel its job and exit after SIGTERM
# (its scancel goes through the cluster; give it the cancel timeout and more).
CLIENT_GRACE_S = 90.0
# How long a supervisor gets to let go of the lock when taken over.
TAKE_OVER_S = 60.0
# How long a detach waits for its supervisor to hold the lock, and the
# supervisor for the detaching command to let go of it.
HANDOVER_S = 15.0
# Past its time limit by this much, a job is surely gone: a supervisor
# started later has nothing left to watch.
AFTER_LIMIT_S = 300.0


def terminate(pid: int, refused: str) -> bool:
    """SIGTERM to ``pid``: False when it is gone already; a process this
    user cannot signal is a SessionError saying ``refused``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise SessionError(refused) from exc
    return True


# -- taking over, stopping ---------------------------------------------------------------


def take_over(store: Store, record: SessionRecord, timeout: float = TAKE_OVER_S) -> bool:
    """If the session's lock is held by its supervisor, ask it to let go
    (SIGTERM) and wait until it has. True when there was one."""
    holder = store.holder(record.name)
    if holder is None or holder == UNNAMED_HOLDER:
        return False
    # The supervisor, or one still starting (it holds the lock but has not
    # written its pid yet): a session driven in the background. Until it
    # drives, SIGTERM just ends it.
    if store.load(record.name).driver not in IN_BACKGROUND:
        return False
    refused = f"The background supervisor (pid {holder}) of session '{record.name}' cannot be signalled by this user"
    if not terminate(holder, refused):
        return False
    if not store.wait_unlocked(record.name, timeout):
        raise SessionError(
            f"The background supervisor (pid {holder}) of session '{record.name}' "
            f"did not let go within {timeout:.0f} s",
            hint=f"Check that process (ps -p {holder}); kill it, then try again.",
        )
    return True


def stop_client(ui: Observer, store: Store, name: str, pid: int) -> None:
    """A foreground client drives the session: ask it to clean up, as Ctrl+C
    would (SIGTERM), and wait until it has let go of the session."""
    if pid <= 0 or pid == os.getpid():
        raise SessionError(
            f"Session '{name}' is being driven by another alvis-fsm, which did not say its pid",
            hint="Stop it in its terminal (Ctrl+C), then run `alvis-fsm stop` again.",
        )
    ui.info(f"Asking the client (pid {pid}) to stop session '{name}'...")
    terminate(pid, f"Session '{name}' is driven by pid {pid}, which this user cannot signal")
    if not store.wait_unlocked(name, CLIENT_GRACE_S, poll=0.2):
        raise SessionError(
            f"The client (pid {pid}) of session '{name}' did not stop within "
            f"{CLIENT_GRACE_S:.0f} s",
            hint=f"Check that process (ps -p {pid}); `alvis-fsm stop {name}` again once it is gone.",
        )


def stop_session(
    settings: Settings,
    store: Store,
    name: str,
    ui: Observer,
    *,
    shield: Shield | None = None,
    **handles: Any,
) -> SessionRecord | None:
    """Stop the session whoever drives it: a detached session's supervisor
    lets go, a foreground client is asked to stop and waited for; then the
    job is cancelled (confirmed by the scheduler), the tunnel closed, the
    state cleaned (``job_control.stop_job``). None when this stopped it; the record
    when it was already stopped (said to ``ui``, with how it ended)."""
    record = store.load(name)
    take_over(store, record)
    holder = store.holder(name)
    if holder is not None:
        stop_client(ui, store, name, record.driver_pid if holder == UNNAMED_HOLDER else holder)
    ended = stop_job(settings, store, name, ui, shield=shield, **handles)
    if ended is not None:
        ui.result(f"Session '{ended.name}' is already stopped ({ended.outcome()}).")
    return ended


def wait_for_driver(store: Store, name: str, driven: bool) -> bool:
    """A detached session's supervisor (also one still starting up) lets go
    by itself once the job has ended: give it a moment. True when someone
    still drives the session (a foreground client notices the end itself)."""
    deadline = time.monotonic() + 5
    while driven and time.monotonic() < deadline:
        holder = store.holder(name)
        fresh = store.load(name)
        if holder is None:
            break
        if fresh.driven_by(Driver.CLIENT, holder):
            break
        time.sleep(0.1)
    return store.locked(name)


# -- handing over to a supervisor ----------------------------------------------------------


def supervisor_log(store: Store, name: str) -> Path:
    """Where a session's supervisor writes (its stdout and stderr)."""
    return store.sessions / f"{name}.supervisor.log"


def spawn_supervisor(
    store: Store, name: str, command: SupervisorCommand
) -> subprocess.Popen[bytes]:
    """Start the supervisor of a detached session, in the background, in a
    session of its own (a closed terminal does not end it)."""
    fd = os.open(supervisor_log(store, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            list(command(name)),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)


class Handover:
    """A detach, in two halves: ``spawn`` runs while the detaching command
    still holds the session's lock (the service's ``on_detached``); ``wait``
    runs once it has let go, and returns only when the supervisor holds the
    lock. Without the wait a `stop` or `resume` run the moment `start
    --detach` returns could find the lock free, skip the take-over, and then
    lose the lock to the supervisor picking it up."""

    def __init__(self, store: Store, command: SupervisorCommand) -> None:
        self.store = store
        self.command = command
        self._spawned: tuple[str, subprocess.Popen[bytes]] | None = None

    def spawn(self, record: SessionRecord) -> None:
        self._spawned = (record.name, spawn_supervisor(self.store, record.name, self.command))

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
            f"(see {supervisor_log(self.store, name)}); the job keeps running, but a dropped "
            f"tunnel will not be reopened until `alvis-fsm resume {name}`"
        )
        return False

    def _recorded(self, name: str) -> int:
        """The supervisor's pid the record names (0 for none)."""
        try:
            record = self.store.load(name)
        except SessionError:
            return 0
        return record.driver_pid if record.driver is Driver.SUPERVISOR else 0


# -- the supervisor ----------------------------------------------------------------------


def run_supervisor(
    settings: Settings,
    store: Store,
    name: str,
    ui: Observer,
    *,
    drive: Drive | None = None,
    shield: Shield | None = None,
    wait: float = HANDOVER_S,
    **handles: Any,
) -> None:
    """The supervisor's life: take the session's lock once the command that
    started it lets go (within ``wait``), then ``supervise``."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with store.lock(name):
                supervise(settings, store, name, ui, drive=drive, shield=shield, **handles)
            return
        except SessionError:
            # The command that started us still holds the lock: wait a moment.
            if time.monotonic() > deadline or not store.exists(name):
                raise
            time.sleep(0.2)


def supervise(
    settings: Settings,
    store: Store,
    name: str,
    ui: Observer,
    *,
    drive: Drive | None = None,
    shield: Shield | None = None,
    **handles: Any,
) -> None:
    """Keep a detached session's tunnel up (call with its lock held): the
    same engine loop as a foreground client, which never cancels anything —
    it lets go when the job ends or when `stop`/`resume` take over, and while
    the network is gone it waits with the one backoff policy."""
    from alvis_fsm.engine.session.runner import Runner
    from alvis_fsm.retry import Backoff

    backoff = Backoff(first=1.0, most=60.0)
    while True:
        record = store.load(name)
        if not _worth_watching(record):
            return
        record.drive_as(Driver.SUPERVISOR, os.getpid())
        store.save(record)
        runner = Runner(
            settings,
            record,
            store,
            ui,
            driver=Driver.SUPERVISOR,
            shield=shield or contextlib.nullcontext,
            **handles,
        )
        try:
            (drive or Runner.drive)(runner)  # returns when it lets go
            record.let_go()
            store.save(record)
            return
        except ConnectionLost as exc:
            # The network (or the login node) is away: keep the session and
            # wait for it, longer than a foreground client would.
            backoff.failed()
            ui.warn(f"{exc.message}; trying again in {backoff.delay:.0f} s")
            backoff.wait()
        except AlvisError:
            return  # drive() has already reported and cleaned up


def _worth_watching(record: SessionRecord) -> bool:
    """Serving or tunneled, and not long past its time limit."""
    if record.state not in (State.SERVING, State.TUNNELED):
        return False
    return not (
        record.running_since
        and record.time_limit_s
        and (time.time() > record.running_since + record.time_limit_s + AFTER_LIMIT_S)
    )
