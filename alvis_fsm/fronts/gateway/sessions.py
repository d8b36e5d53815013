"""How the gateway makes a model's session: through the session service
(engine/service.py), as every front does, without blocking the event loop
(the login, the account and an ``auto`` GPU choice, which ask the cluster,
happen in the session's own thread)."""

from __future__ import annotations

import re
import socket
import threading
from typing import TYPE_CHECKING

from alvis_fsm.engine.store import SessionRecord, Store
from alvis_fsm.errors import Interrupted

if TYPE_CHECKING:
    from alvis_fsm.engine.catalog import Catalog
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.runner import Runner
    from alvis_fsm.engine.service import NewSession
    from alvis_fsm.engine.settings import Settings


PREFIX = "gw-"


def session_name(model: str) -> str:
    """``gw-<model>``, safe for a file name: never the name `start` gives."""
    return PREFIX + (re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-._")[:38] or "model")


def is_gateway_session(name: str) -> bool:
    """A session the gateway made (``status`` marks them, ``gateway stop``
    checks them)."""
    return name.startswith(PREFIX)


def free_port(bind: str = "127.0.0.1") -> int:
    """A local port for the session's tunnel, picked by the gateway (the
    gateway's clients never see it: they go through the gateway)."""
    with socket.socket() as s:
        s.bind((bind, 0))
        return int(s.getsockname()[1])


def new_session(
    cfg: Settings, catalog: Catalog, model: str, store: Store, ui: Observer
) -> ServiceSession:
    """A model's session, made by the session service as for every front:
    checked at once with no network (catalog entry, time, GPUs, record, API
    key), prepared (login, account, ``auto`` GPUs, job script) in the
    session's own thread when it is driven, so the event loop never waits
    on the cluster. ``catalog`` is the gateway's (already checked) one."""
    from alvis_fsm.engine import service
    from alvis_fsm.engine.session_spec import StartOptions

    catalog.get(model)  # an unknown model fails here, as before
    # The tunnel ends on a port the gateway picks; its clients never see it.
    local = cfg.model_copy(
        update={"tunnel": cfg.tunnel.model_copy(update={"local_port": free_port(cfg.tunnel.bind)})}
    )
    new = service.create(local, StartOptions(model=model, name=session_name(model), force_new=True),
                         store=store)  # fmt: skip
    return ServiceSession(new, ui)


class ServiceSession:
    """What the gateway drives (its ``Handle``): a prepared-on-drive session
    of the service, stoppable before and after it has a Runner."""

    def __init__(self, new: NewSession, ui: Observer) -> None:
        self._new = new
        self._ui = ui
        self.record: SessionRecord = new.record
        self._runner: Runner | None = None
        self._stop: str | None = None
        self._guard = threading.Lock()

    def drive(self) -> None:
        # The session's lock, from prepare to the end, as `start` holds it:
        # `stop NAME` from another shell finds the gateway driving it.
        with self._new.lock():
            if self._stop is not None:
                raise Interrupted(f"Stopped by {self._stop} before it was submitted")
            runner = self._new.prepare(self._ui)
            with self._guard:
                self._runner = runner
                if self._stop is not None:
                    runner.request_stop(self._stop)
            runner.drive()

    def request_stop(self, reason: str = "stopped") -> None:
        with self._guard:
            self._stop = reason
            if self._runner is not None:
                self._runner.request_stop(reason)
