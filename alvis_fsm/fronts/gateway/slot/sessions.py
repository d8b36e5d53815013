"""How the gateway makes a model's session: through the session service
(engine/session/service.py), as every front does, without blocking the event loop
(the login, the account and an ``auto`` GPU choice, which ask the cluster,
happen in the session's own thread)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from alvis_fsm.engine.session.store import NAME_RE, SessionRecord, Store, check_name
from alvis_fsm.errors import Interrupted

if TYPE_CHECKING:
    from alvis_fsm.engine.fit.catalog import Catalog
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.session.runner import Runner
    from alvis_fsm.engine.session.service import NewSession
    from alvis_fsm.engine.settings.model import Settings


PREFIX = "gw-"


def session_name(model: str, lane: int = 0) -> str:
    """``gw-<model>`` (lane 0), ``gw-<model>-2`` (lane 1), ...: safe for a file
    name, never the name `start` gives; a rollover's successor is in another
    lane than the session it replaces, so the two live sessions differ."""
    from alvis_fsm.engine.session.spec import name_for_model

    # Room for "gw-" and a lane's "-NN" in a session name's 41 characters.
    base = name_for_model(model)[:35].rstrip("-._")
    return check_name(PREFIX + base + (f"-{lane + 1}" if lane else ""))


def is_gateway_session(name: str) -> bool:
    """A session the gateway made (``status`` marks them, ``gateway stop``
    checks them)."""
    return name.startswith(PREFIX)


def session_of(store: Store, name: str | None) -> str | None:
    """NAME as given, or the gateway's session of model NAME (``gw-NAME``,
    or ``gw-NAME-2`` after a rollover: the live one, else the newest) when
    there is no session called NAME but the gateway has served it:
    `alvis-fsm logs lab-ok` or `status lab-ok` then show what the gateway ran."""
    if not name or not NAME_RE.fullmatch(name) or is_gateway_session(name):
        return name
    from alvis_fsm.engine.session.states import State
    from alvis_fsm.errors import SessionError

    lanes = [
        store.load(n) for n in (session_name(name, lane) for lane in (0, 1)) if store.exists(n)
    ]
    if store.exists(name):
        # A session called NAME: it, unless it has ended while the gateway's
        # session of model NAME is live (the one serving it now).
        try:
            own_live = store.load(name).live
        except SessionError:
            return name  # its own error is reported by whoever loads it
        if own_live or not any(r.live for r in lanes):
            return name
        lanes = [r for r in lanes if r.live]
    if not lanes:
        return name
    # The one serving now (after a rollover, the successor), else the newest.
    lanes.sort(key=lambda r: (r.live and r.state == State.TUNNELED, r.live, r.started))
    return lanes[-1].name


def orphans(store: Store) -> list[SessionRecord]:
    """Live gateway sessions nobody drives: left by a gateway killed before
    its shutdown cancelled them (SIGKILL, a crash, a power cut). Their jobs
    may still hold GPUs, and each keeps its model from starting again (a
    live session's name is taken)."""
    records, _ = store.all()
    return [
        r for r in records if is_gateway_session(r.name) and r.live and not store.locked(r.name)
    ]


def clean_up_orphans(cfg: Settings, store: Store, echo: Callable[[str], None]) -> list[str]:
    """Cancel the jobs of ``orphans`` (confirmed by the scheduler, as every
    stop is); the names of those not confirmed, kept for a later try."""
    from alvis_fsm.engine.session import service
    from alvis_fsm.errors import AlvisError
    from alvis_fsm.fronts.gateway.slot.recorder import Recorder

    left = []
    for record in orphans(store):
        echo(
            f"[{record.name}] left live by a gateway that did not shut down (job"
            f" {record.job_id or '-'}, {record.state}): cleaning it up"
        )
        try:
            service.stop(cfg, store, record.name, Recorder(record.name, echo=echo))
        except AlvisError as exc:
            echo(
                f"[{record.name}] not cleaned up: {exc.message}; `alvis-fsm stop {record.name}` tries again"
            )
            left.append(record.name)
    return left


def budgets(cfg: Settings) -> Settings:
    """The gateway's own budgets for a model's start (gateway.queue_timeout,
    gateway.load_timeout) in the session's timeouts, so the engine judges
    them as every session's: by the cluster's clock, per state. No warnings
    before the time limit: they tell a person to start another session,
    which the gateway does itself (its rollover)."""
    timeouts = cfg.timeouts.model_copy(
        update={
            "job_start": cfg.gateway.queue_timeout,
            "server_ready": cfg.gateway.load_timeout,
        }
    )
    session = cfg.session.model_copy(update={"warn_before_end": []})
    return cfg.model_copy(update={"timeouts": timeouts, "session": session})


def new_session(
    cfg: Settings, catalog: Catalog, model: str, store: Store, ui: Observer, lane: int = 0
) -> ServiceSession:
    """A model's session, made by the session service as for every front:
    checked at once with no network (catalog entry, time, GPUs, record, API
    key), prepared (login, account, ``auto`` GPUs, job script) in the
    session's own thread when it is driven, so the event loop never waits
    on the cluster. ``catalog`` is the gateway's (already checked) one;
    ``lane`` picks the session name (``session_name``)."""
    from alvis_fsm.engine.session import service
    from alvis_fsm.engine.session.spec import StartOptions

    catalog.get(model)  # an unknown model fails here, as before
    # The tunnel ends in a unix socket in the private state dir: the
    # gateway's clients never see it, and no other local process can use it.
    # short_ok: the gateway plans for the job's time limit itself (its rollover).
    options = StartOptions(
        model=model,
        name=session_name(model, lane),
        force_new=True,
        local_socket=True,
        short_ok=True,
    )
    new = service.create(budgets(cfg), options, store=store)
    # Lane 0 only: a rollover's successor is the gateway's own session, never
    # the session it replaces adopted again.
    lead = float(cfg.gateway.rollover_lead) if lane == 0 else None
    return ServiceSession(new, ui, adopt_if_left=lead)


# How often an adopted session's record is read again (its owner may stop it).
FOLLOW_S = 1.0


def adoptable(store: Store, model: str, least_left: float = 0.0) -> SessionRecord | None:
    """A live session of ``model`` started by someone else (`start`, the
    Python API, `start --detach`) that answers now: one live session per
    model, whoever started it. Not one about to reach its time limit
    (``least_left`` seconds), which the gateway would replace at once."""
    from alvis_fsm.cluster.tunnel import health
    from alvis_fsm.engine.session.states import State

    records, _ = store.all()
    for record in sorted(records, key=lambda r: r.started, reverse=True):
        if is_gateway_session(record.name) or record.model != model:
            continue
        if record.state != State.TUNNELED or not record.url:
            continue
        left = record.time_left()
        if left is not None and left <= least_left:
            continue
        if health(
            record.local_port, api_key=record.api_key or None, local_socket=record.local_socket
        ):
            return record
    return None


class ServiceSession:
    """What the gateway drives (its ``Handle``): a prepared-on-drive session
    of the service, stoppable before and after it has a Runner."""

    def __init__(self, new: NewSession, ui: Observer, adopt_if_left: float | None = None) -> None:
        self._new = new
        self._ui = ui
        self.record: SessionRecord = new.record
        self._runner: Runner | None = None
        self._stop: str | None = None
        self._guard = threading.Lock()
        self._woken = threading.Event()
        # Look for a live session of the model to adopt first (with at least
        # this many seconds left), in the session's own thread (it asks the
        # server whether it answers); None: never adopt.
        self._adopt_if_left = adopt_if_left
        self.adopted = False

    def drive(self) -> None:
        if self._adopt_if_left is not None and self._stop is None:
            found = adoptable(self._new.store, self.record.model, self._adopt_if_left)
            if found is not None:
                self._follow(found)
                return
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

    def _follow(self, record: SessionRecord) -> None:
        """Serve through a session someone else started, and never stop it:
        route to it while it is live; a stop (idle, shutdown, rollover) only
        lets go of it. Its owner (`alvis-fsm stop`, Ctrl+C) ends it."""
        store = self._new.store
        self.adopted = True
        self.record = record
        self._ui.info(
            f"serving through session '{record.name}' (job {record.job_id}, started outside"
            f" the gateway) at {record.url}: no second job; the gateway never stops it"
        )
        while self._stop is None:
            self._woken.wait(FOLLOW_S)
            try:
                fresh = store.load(record.name)
            except Exception:  # removed or unreadable: it is not ours to judge
                break
            self.record = fresh
            if not fresh.live:
                self._ui.info(
                    f"session '{record.name}' ended ({fresh.outcome()}); "
                    "the next request starts the gateway's own"
                )
                break
        if self._stop is not None:
            self._ui.info(f"let go of session '{record.name}' ({self._stop}); it keeps running")

    def request_stop(self, reason: str = "stopped") -> None:
        with self._guard:
            self._stop = reason
            self._woken.set()
            if self._runner is not None:
                self._runner.request_stop(reason)
