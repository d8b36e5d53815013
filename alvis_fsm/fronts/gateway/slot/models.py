"""Each catalog model's place in the gateway: one session serving at a time
(started by the first request however many arrive at once), its state as
clients see it, the requests in flight, the idle stop, and the rollover
before the job's time limit (SLURM does not extend a running job): a
successor session is started; once it serves, new requests go to it, those
in flight finish on the old one, then the old one is stopped.

Everything here runs on the gateway's event loop thread, except a session's
``drive`` (a thread of its own, as the engine allows); the thread reports
its end back onto the loop, so no state is shared across threads but the
session's record, which the loop only reads."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
import time
from collections.abc import Callable
from enum import Enum, auto
from typing import TYPE_CHECKING, Protocol

from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord
from alvis_fsm.errors import AlvisError, Interrupted
from alvis_fsm.fronts.gateway.observe import usage
from alvis_fsm.fronts.gateway.slot.recorder import Recorder

# What clients see (names fixed by issue 14; "failed" is spelt as the session's).
COLD, QUEUED, LOADING, READY, FAILED = "cold", "queued", "loading", "ready", State.FAILED.value

# The session's machine state -> the model's state.
_OF_RECORD = {
    State.IDLE: QUEUED,
    State.SUBMITTED: QUEUED,
    State.RUNNING: LOADING,
    State.SERVING: LOADING,  # also: the tunnel dropped and is being reopened
    State.TUNNELED: READY,
}


class Handle(Protocol):
    """A session as the gateway drives it (``engine.session.runner.Runner`` is one)."""

    record: SessionRecord

    def drive(self) -> None: ...
    def request_stop(self, reason: str = "stopped") -> None: ...


# model name, observer, lane -> a new session of the model, not yet driven.
# The lane (0, 1, ...) is one no other live session of the model has, so that
# a successor's session name differs from the one it replaces.
Factory = Callable[[str, Recorder, int], Handle]
# model, GPUs -> its expected load time in seconds (engine/fit/loadtimes.py), or None.
LoadTime = Callable[[str, str], float | None]


class Unavailable(Exception):
    """The session a request waited for ended without serving it."""


def describe(exc: BaseException) -> str:
    """The root cause of a failed session, in one line for an error body."""
    if isinstance(exc, AlvisError):
        from alvis_fsm.cluster.slurm import FATAL_PATTERNS

        lines = [line.strip() for line in (exc.details or "").splitlines() if line.strip()]
        # The engine's details list vLLM's fatal lines first; of those, the
        # exceptions raised, first raised first (the root cause, e.g. CUDA out
        # of memory, before "Engine core initialization failed").
        fatal = [line for line in lines if FATAL_PATTERNS.search(line)]
        raised = [line for line in fatal if re.match(r"[\w.]*(Error|Exception): ", line)]
        cause = raised[:2] or [x for x in fatal if not x.startswith("Traceback")][:2] or lines[-2:]
        return exc.message + (": " + " | ".join(cause) if cause else "")
    return f"{type(exc).__name__}: {exc}"


def rollover_lead(record: SessionRecord, floor: float, load_time: LoadTime | None) -> float:
    """How long before the time limit a successor must be started to serve
    in time: the job's own queue wait plus the model's expected load time,
    at least ``floor`` (gateway.rollover_lead)."""
    at = record.entered_at
    wait = 0.0
    if State.SUBMITTED in at and State.RUNNING in at:
        wait = max(0.0, at[State.RUNNING] - at[State.SUBMITTED])
    load = (load_time(record.model, record.gpus) if load_time is not None else None) or 0.0
    return max(floor, wait + load)


class Run:
    """One session of a model as the gateway tracks it: its handle and thread,
    the requests proxied to it and not yet finished, the requests it served."""

    def __init__(self, handle: Handle, generation: int, lane: int, observer: Recorder) -> None:
        self.handle = handle
        self.generation = generation
        self.lane = lane
        self.observer = observer
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.in_flight = 0
        self.served = 0
        self.failure = ""  # root cause, if it ended failed and the model with it

    @property
    def state(self) -> str:
        # A session cleaning up after a failure is failed already.
        return _OF_RECORD.get(State(self.handle.record.state), FAILED)

    @property
    def job_id(self) -> str:
        return self.handle.record.job_id

    def stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.handle.request_stop(reason)


class SlotPhase(Enum):
    """Where a model's slot is in its life (``Slot.phase``); what clients see
    (``Slot.state``) follows from it and the serving session's own state."""

    COLD = auto()  # no session: the next request starts one
    FAILED = auto()  # no session: the last one failed (``error``); the next request starts one
    SERVING = auto()  # one session (queued, loading or ready): new requests go to it
    ROLLING = auto()  # and its successor starts, to take over before the job's time limit
    LAST = auto()  # its successor failed: serve on it until its job ends
    STOPPING = auto()  # its sessions are stopped (idle timeout): going cold
    CLOSED = auto()  # the gateway shuts down: nothing starts any more


_ANY = list(SlotPhase)
_ONE = [SlotPhase.SERVING, SlotPhase.LAST, SlotPhase.STOPPING]  # one current session, no successor

# The slot's machine, as data: (trigger, sources, dest, conditions, before).
# ``ended`` (a session's drive returned) lists its cases in the order they
# are tried; dest None keeps the phase. Every callback runs on the loop thread.
TRANSITIONS: list[tuple[str, list[SlotPhase], SlotPhase | None, list[str], str | None]] = [
    ("start", [SlotPhase.COLD, SlotPhase.FAILED], SlotPhase.SERVING, [], "_open"),
    ("roll", [SlotPhase.SERVING], SlotPhase.ROLLING, [], "_open_successor"),
    ("refused", [SlotPhase.SERVING], SlotPhase.LAST, [], "_successor_refused"),
    ("promote", [SlotPhase.ROLLING], SlotPhase.SERVING, ["_successor_serves"], "_take_over"),
    ("ended", [SlotPhase.ROLLING], SlotPhase.SERVING, ["_is_current"], "_hand_over"),
    ("ended", [SlotPhase.ROLLING], SlotPhase.LAST, ["_is_successor"], "_successor_lost"),
    ("ended", _ONE, SlotPhase.FAILED, ["_is_current", "_with_error"], "_drop"),
    ("ended", _ONE, SlotPhase.COLD, ["_is_current"], "_drop"),
    ("ended", [SlotPhase.CLOSED], None, ["_is_current"], "_drop"),
    ("ended", _ANY, None, [], "_unretire"),
    ("halt", [SlotPhase.SERVING, SlotPhase.ROLLING, SlotPhase.LAST], SlotPhase.STOPPING, [], None),
    ("close", _ANY, SlotPhase.CLOSED, [], None),
]


class Lifecycle:
    """A model's sessions and its phase, a declared machine (``SlotPhase``,
    ``TRANSITIONS``) run by pytransitions. The sessions are its data:
    ``run`` (new requests go to it), ``successor`` (started to replace it
    before its time limit) and ``retiring`` (replaced or stopped, not yet
    ended). Its callbacks run on the gateway's loop thread."""

    def __init__(self, name: str, factory: Factory, echo: Callable[[str], None] | None) -> None:
        from transitions import Machine

        self.name = name
        self.factory = factory
        self.echo = echo
        self.phase = SlotPhase.COLD
        self.run: Run | None = None  # the session new requests go to
        self.successor: Run | None = None  # started to replace ``run`` before its time limit
        self.retiring: list[Run] = []  # replaced or stopped, not yet ended
        self.generation = 0  # one per session started
        self.error = ""  # root cause of the last failure (until the next start)
        self.rollover_error = ""  # why the last successor failed (until one serves)
        self.sessions = 0
        self.rollovers = 0
        self.gpu_hours_ended = 0.0  # held by this model's ended sessions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        Machine(
            model=self,
            states=SlotPhase,
            initial=SlotPhase.COLD,
            transitions=[
                {"trigger": t, "source": s, "dest": d, "conditions": c, "before": b}
                for t, s, d, c, b in TRANSITIONS
            ],
            model_attribute="phase",
            after_state_change="_notify",
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )

    if TYPE_CHECKING:  # the triggers, bound by the machine (``TRANSITIONS``)

        def start(self) -> bool: ...
        def roll(self) -> bool: ...
        def refused(self, why: str) -> bool: ...
        def promote(self) -> bool: ...
        def ended(self, run: Run, error: str) -> bool: ...
        def halt(self, reason: str) -> bool: ...
        def close(self, reason: str) -> bool: ...

    @property
    def closing(self) -> bool:
        return self.phase is SlotPhase.CLOSED

    @property
    def job_id(self) -> str:
        return self.run.job_id if self.run is not None else ""

    def runs(self) -> list[Run]:
        """Every session of the model not yet ended."""
        return [r for r in (self.run, self.successor) if r is not None] + self.retiring

    def _say(self, line: str) -> None:
        if self.echo is not None:
            self.echo(f"[{self.name}] {line}")

    def _notify(self, *_: object) -> None:
        """Wake the requests held for this model (loop thread only)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _session_changed(self) -> None:
        self._promote()
        self._notify()

    def notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._session_changed)

    def _retire_reason(self) -> str:
        return f"rolled over to job {self.job_id}" if self.job_id else "rolled over"

    def _start(self) -> Run:
        """A new session of the model, driven in its own thread."""
        self._loop = asyncio.get_running_loop()
        lanes = {r.lane for r in self.runs()}
        lane = next(n for n in itertools.count() if n not in lanes)
        observer = Recorder(self.name, self.notify_threadsafe, self.echo)
        handle = self.factory(self.name, observer, lane)
        self.generation += 1
        run = Run(handle, self.generation, lane, observer)
        self.sessions += 1
        run.thread = threading.Thread(
            target=self._drive, args=(run,), name=f"gateway-{self.name}", daemon=True
        )
        run.thread.start()
        return run

    def _current(self) -> Run:
        """The session new requests go to, started if there is none (single
        flight: this runs on the loop thread, without an await between the
        check and the start, so a burst of requests to a cold model makes
        exactly one session)."""
        if self.run is None:
            if self.closing:
                raise Unavailable("the gateway is shutting down")
            self.start()
        assert self.run is not None
        return self.run

    def _drive(self, run: Run) -> None:
        error = ""
        try:
            run.handle.drive()
        except Interrupted:
            pass  # stopped by the gateway (idle, shutdown, rollover): a normal end
        except BaseException as exc:  # reported to the held requests
            error = describe(exc)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._ended, run, error)

    def _ended(self, run: Run, error: str) -> None:
        self.gpu_hours_ended += usage.held(run.handle.record)
        self.ended(run, error)

    # -- the machine's callbacks: conditions, then each transition's ``before`` --
    def _is_current(self, run: Run, error: str) -> bool:
        return run is self.run

    def _is_successor(self, run: Run, error: str) -> bool:
        return run is self.successor

    def _with_error(self, run: Run, error: str) -> bool:
        return bool(error)

    def _successor_serves(self) -> bool:
        return self.successor is not None and self.successor.state == READY

    def _open(self) -> None:
        self.error = ""
        self.run = self._start()

    def _open_successor(self) -> None:
        self.successor = self._start()

    def _successor_refused(self, why: str) -> None:
        self.rollover_error = why
        self._say(f"rollover failed: {why}; requests stay on job {self.job_id}")

    def _successor_lost(self, run: Run, error: str) -> None:
        self.successor = None
        self.rollover_error = why = error or "it ended before it served"
        self._say(
            f"rollover failed: {why}; requests stay on job {self.job_id}"
            " until its time limit, then the next request starts a new job"
        )

    def _hand_over(self, run: Run, error: str) -> None:
        """The job ended before its successor served: requests are held on
        the successor as for a cold start."""
        successor = self.successor
        assert successor is not None
        self._say(
            f"job {run.job_id} ended"
            + (f" ({error})" if error else "")
            + f" before job {successor.job_id or '(not yet submitted)'} serves;"
            " requests wait for it"
        )
        self.run, self.successor = successor, None

    def _drop(self, run: Run, error: str) -> None:
        self._say(f"failed: {error}" if error else "stopped")
        self.run = None
        if error:
            self.error = run.failure = error

    def _unretire(self, run: Run, error: str) -> None:
        if run in self.retiring:
            self.retiring.remove(run)

    def _take_over(self) -> None:
        """The successor serves: new requests go to it; the session it replaces
        is stopped as soon as its requests in flight are done."""
        old, self.run, self.successor = self.run, self.successor, None
        self.rollover_error = ""
        self.rollovers += 1
        if old is None or self.run is None:
            return
        self.retiring.append(old)
        self._say(f"rolled over: job {old.job_id} → job {self.run.job_id}")
        if old.in_flight == 0:
            old.stop(self._retire_reason())

    def on_enter_STOPPING(self, reason: str) -> None:
        self._stop_all(reason)

    def on_enter_CLOSED(self, reason: str) -> None:
        self._stop_all(reason)

    def _stop_all(self, reason: str) -> None:
        for run in self.runs():
            run.stop(reason)
        if self.successor is not None:
            self.retiring.append(self.successor)
            self.successor = None

    def _promote(self) -> None:
        if self.phase is SlotPhase.ROLLING:
            self.promote()


class Slot(Lifecycle):
    """One catalog model in the gateway: its sessions (``Lifecycle``), what
    clients see of it, and the requests held for it and proxied to it."""

    def __init__(
        self, name: str, served: str, factory: Factory, echo: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(name, factory, echo)
        self.served = served
        self.in_flight = 0  # requests for this model, held or proxied
        self.last_active = time.monotonic()
        self.served_requests = 0
        self.idle_stops = 0
        self.idle_timeout: float | None = None  # this model's own (catalog), else the gateway's
        self.gpu_hours_saved = 0.0  # left on the jobs its idle stops cancelled

    @property
    def handle(self) -> Handle | None:
        return self.run.handle if self.run is not None else None

    @property
    def observer(self) -> Recorder | None:
        return self.run.observer if self.run is not None else None

    @property
    def stopping(self) -> bool:
        return self.run is not None and self.run.stopping

    @property
    def state(self) -> str:
        run = self.run
        if run is None:
            return FAILED if self.error else COLD
        if run.stopping:
            return COLD  # going cold: its job is being cancelled
        return run.state

    @property
    def gpu_hours_used(self) -> float:
        return self.gpu_hours_ended + sum(usage.held(r.handle.record) for r in self.runs())

    def time_left(self) -> float | None:
        return self.run.handle.record.time_left() if self.run is not None else None

    async def changed(self, timeout: float) -> None:
        """Until the state may have changed, or ``timeout`` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def enter(self) -> None:
        self.in_flight += 1
        self.last_active = time.monotonic()

    def leave(self) -> None:
        self.in_flight -= 1
        self.last_active = time.monotonic()

    def _run_of(self, handle: Handle) -> Run | None:
        return next((r for r in self.runs() if r.handle is handle), None)

    def begin(self, handle: Handle) -> Handle:
        """A request is proxied to ``handle``'s session: the session to send it
        to, counted in flight there until ``finish``. A session replaced since
        the request was given it (a rollover between its wait and now) gives
        way to the one that replaced it."""
        run = self._run_of(handle)
        current = self.run
        serving = current is not None and current.state == READY and not current.stopping
        if run is not current and serving:
            run = current
        if run is None:
            return handle
        run.in_flight += 1
        return run.handle

    def finish(self, handle: Handle, served: bool) -> None:
        """The request ``begin`` sent to ``handle`` is done (``served``: answered
        to the end); a replaced session is stopped once its last one is."""
        if served:
            self.served_requests += 1
        run = self._run_of(handle)
        if run is None:
            return
        run.in_flight -= 1
        if served:
            run.served += 1
        if run in self.retiring and run.in_flight == 0:
            run.stop(self._retire_reason())

    def roll_over(self, floor: float, load_time: LoadTime | None = None) -> bool:
        """Start a successor if the serving session was used and its job is
        within its rollover lead of its time limit; whether one was started.
        At most one successor at a time, none while a replaced session still
        ends, none again for a session whose successor failed (``LAST``)."""
        self._promote()
        run = self.run
        if (
            self.phase is not SlotPhase.SERVING
            or run is None
            or run.state != READY
            or not run.served
        ):
            return False
        if self.retiring:
            return False
        left = run.handle.record.time_left()
        if left is None or left > rollover_lead(run.handle.record, floor, load_time):
            return False
        try:
            self.roll()
        except Exception as exc:  # a session refused before it runs (e.g. a busy port)
            self.refused(describe(exc))
            return False
        self._say(
            f"job {run.job_id} reaches its time limit in {left:.0f} s: starting its successor"
        )
        return True

    def stop(self, reason: str) -> None:
        """Stop every session of the model (idle stop)."""
        if self.phase in (SlotPhase.SERVING, SlotPhase.ROLLING, SlotPhase.LAST):
            self.halt(reason)

    async def ready(self, tick: float, on_tick: Callable[[str], object] | None = None) -> Handle:
        """Wait until this model's session serves, starting it if needed.
        ``on_tick(state)`` is awaited (if it returns an awaitable) about every
        ``tick`` seconds while waiting. Raises ``Unavailable`` with the root
        cause if the session fails."""
        waited = self._current()
        next_tick = time.monotonic()
        while True:
            run = self.run
            if run is waited:
                if run.state == READY and not run.stopping:
                    return run.handle
            elif waited.failure:
                raise Unavailable(f"{self.name} failed to start: {waited.failure}")
            else:
                # What we waited for ended without failing (stopped while idle,
                # replaced by its successor, or a new session already runs):
                # wait for the current one.
                waited = self._current()
                continue
            now = time.monotonic()
            if on_tick is not None and now >= next_tick:
                next_tick = now + tick
                result = on_tick(self.state)
                if asyncio.iscoroutine(result):
                    await result
            await self.changed(min(0.25, max(0.01, next_tick - time.monotonic())))


class Models:
    """Every catalog model, by name and by the served ORG/NAME alias."""

    def __init__(
        self,
        served: dict[str, str],
        factory: Factory,
        echo: Callable[[str], None] | None = None,
        load_time: LoadTime | None = None,
    ) -> None:
        self.slots = {name: Slot(name, served[name], factory, echo) for name in sorted(served)}
        self.aliases = {slot.served: slot for slot in self.slots.values() if slot.served}
        self.load_time = load_time

    def find(self, name: str) -> Slot | None:
        return self.slots.get(name) or self.aliases.get(name)

    def names(self) -> list[str]:
        return list(self.slots)

    def stop_idle(self, idle_timeout: float) -> list[str]:
        """Stop every session with no request in flight and none finished
        for the model's own idle timeout, else ``idle_timeout`` seconds; the
        names of those stopped."""
        now = time.monotonic()
        stopped = []
        for slot in self.slots.values():
            if (
                slot.handle is not None
                and not slot.stopping
                and slot.in_flight == 0
                and now - slot.last_active >= (slot.idle_timeout or idle_timeout)
            ):
                slot.idle_stops += 1
                # An adopted session (someone else's) is let go, not cancelled.
                slot.gpu_hours_saved += sum(
                    usage.left(r.handle.record)
                    for r in slot.runs()
                    if not getattr(r.handle, "adopted", False)
                )
                slot.stop("idle timeout")
                stopped.append(slot.name)
        return stopped

    def roll_over(self, lead: float) -> list[str]:
        """Start a successor for every used model near its job's time limit
        (``lead``: gateway.rollover_lead, the least lead); the names of those
        started."""
        return [name for name, slot in self.slots.items() if slot.roll_over(lead, self.load_time)]

    async def shutdown(self, timeout: float) -> list[str]:
        """Stop every session (successors and replaced ones too) and wait for
        each to clean up (its job cancelled and confirmed); the names of the
        models with one still not ended after ``timeout``."""
        threads: list[tuple[str, threading.Thread]] = []
        for slot in self.slots.values():
            slot.close("gateway shutdown")
            threads += [(slot.name, r.thread) for r in slot.runs() if r.thread is not None]
        deadline = time.monotonic() + timeout

        def join() -> list[str]:
            for _, thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            return sorted({name for name, thread in threads if thread.is_alive()})

        return await asyncio.to_thread(join)
