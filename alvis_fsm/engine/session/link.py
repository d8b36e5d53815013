"""A session's link to the cluster: what every part of the runner holds.

The driver (``runner.py``), the tunnel keeper, the log stream, job control
and the read-only looks all work on one session through the same few
things: its settings, its record and store, the observer that hears every
event, the ssh connection and the agent on the login node, the front's
``shield`` for cleanup, and the switch a front flips to stop it. They are
gathered here once (``open_link``), so each part takes one argument and a
front swapping the observer (``Runner.ui``) swaps it for all of them."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alvis_fsm.cluster.agent import Agent
from alvis_fsm.cluster.ssh import Connection, SSHOptions, control_path
from alvis_fsm.engine.observer import Observer
from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.errors import StopRequested

if TYPE_CHECKING:  # settings imports pydantic; the link only reads it
    from alvis_fsm.engine.settings.model import Settings

Shield = Callable[[], AbstractContextManager[object]]


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def ssh_options(settings: Settings) -> SSHOptions:
    s = settings.ssh
    return SSHOptions(
        host=s.host,
        user=s.user,
        config_file=s.config_file,
        connect_timeout=int(s.connect_timeout),
        keepalive_interval=int(s.keepalive_interval),
        keepalive_count=int(s.keepalive_count),
        reconnect_window=float(s.reconnect_window),
        control_persist=int(s.control_persist),
    )


def record_entry(record: SessionRecord, state: State) -> None:
    """Write on the record that the session entered ``state`` (not saved)."""
    record.state = str(state)
    record.history.append([str(state), now_iso()])
    record.entered_at[str(state)] = time.time()


class StopSwitch:
    """How a front holding many sessions stops one (no signals): the parts
    of its runner check it between their waits, and wait on it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = reason
        self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            raise StopRequested(self.reason or "stopped")

    def pause(self, seconds: float) -> bool:
        """Wait; True when a stop was requested meanwhile (not raised)."""
        return self.event.wait(seconds)


@dataclass
class Link:
    settings: Settings
    record: SessionRecord
    store: Store
    ui: Observer
    conn: Connection
    agent: Agent
    shield: Shield = contextlib.nullcontext
    stop: StopSwitch = field(default_factory=StopSwitch)
    # A look (status, logs) saves nothing: another client may drive the session.
    readonly: bool = False

    def save(self) -> None:
        if not self.readonly:
            self.store.save(self.record)


def open_link(
    settings: Settings,
    record: SessionRecord,
    store: Store,
    ui: Observer,
    *,
    look: bool = False,
    conn: Connection | None = None,
    agent: Agent | None = None,
    shield: Shield = contextlib.nullcontext,
    **_tunnel_handles: object,
) -> Link:
    """The session's link; ``conn`` and ``agent`` can be handed in (unit tests
    drive the session with a fake agent object), by default OpenSSH and
    agent.sh; the tunnel's handles (``tunnel_factory``, ``verifier``) are
    the runner's, not the link's. ``look``: read-only (see ``_connection``)."""
    store.ensure()
    if not record.control_path:
        record.control_path = str(
            control_path(store.dir, f"{store.dir.resolve()}|{record.name}@{settings.ssh.host}")
        )
        record.tunnel_control_path = record.control_path + ".t"
    conn = conn or _connection(settings, record, store, ui, look)
    return Link(settings, record, store, ui, conn, agent or Agent(conn), shield, readonly=look)


def _connection(
    settings: Settings, record: SessionRecord, store: Store, ui: Observer, look: bool
) -> Connection:
    """The session's shared connection. A read-only look (status, logs)
    reuses it when it is up but never opens or closes it: another client
    may be driving the session through it, and closing a master we
    opened while that client reconnects would cut it off. When it is
    down, a look opens a private one of its own and closes that."""
    shared = Connection(ssh_options(settings), Path(record.control_path), ui)
    if not look or shared.alive():
        return shared
    private = control_path(
        store.dir, f"{store.dir.resolve()}|{record.name}@{settings.ssh.host}|look|{os.getpid()}"
    )
    return Connection(ssh_options(settings), private, ui)
