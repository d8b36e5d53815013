"""Each catalog model's place in the gateway: at most one session at a time
(started by the first request however many arrive at once), its state as
clients see it, the requests in flight, the idle stop.

Everything here runs on the gateway's event loop thread, except a session's
``drive`` (a thread of its own, as the engine allows); the thread reports
its end back onto the loop, so no state is shared across threads but the
session's record, which the loop only reads."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol

from alvis_fsm.engine.states import State
from alvis_fsm.engine.store import SessionRecord
from alvis_fsm.errors import AlvisError, Interrupted
from alvis_fsm.fronts.gateway import usage
from alvis_fsm.fronts.gateway.recorder import Recorder

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
    """A session as the gateway drives it (``engine.runner.Runner`` is one)."""

    record: SessionRecord

    def drive(self) -> None: ...
    def request_stop(self, reason: str = "stopped") -> None: ...


# model name, observer -> a new session of the model, not yet driven.
Factory = Callable[[str, Recorder], Handle]


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


class Slot:
    def __init__(
        self, name: str, served: str, factory: Factory, echo: Callable[[str], None] | None = None
    ) -> None:
        self.name = name
        self.served = served
        self.factory = factory
        self.echo = echo
        self.handle: Handle | None = None
        self.observer: Recorder | None = None
        self.thread: threading.Thread | None = None
        self.generation = 0  # one per session started
        self.failed_generation = -1
        self.error = ""  # root cause of the last failure (until the next start)
        self.stopping = False
        self.closing = False  # the gateway shuts down: start nothing more
        self.in_flight = 0
        self.last_active = time.monotonic()
        self.served_requests = 0
        self.sessions = 0
        self.idle_stops = 0
        self.idle_timeout: float | None = None  # this model's own (catalog), else the gateway's
        self.gpu_hours_ended = 0.0  # held by this model's ended sessions
        self.gpu_hours_saved = 0.0  # left on the jobs its idle stops cancelled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    # -- state --------------------------------------------------------------
    @property
    def state(self) -> str:
        handle = self.handle
        if handle is None:
            return FAILED if self.error else COLD
        if self.stopping:
            return COLD  # going cold: its job is being cancelled
        # A session cleaning up after a failure is failed already.
        return _OF_RECORD.get(State(handle.record.state), FAILED)

    @property
    def gpu_hours_used(self) -> float:
        live = usage.held(self.handle.record) if self.handle is not None else 0.0
        return self.gpu_hours_ended + live

    @property
    def job_id(self) -> str:
        return self.handle.record.job_id if self.handle is not None else ""

    def _notify(self) -> None:
        """Wake the requests held for this model (loop thread only)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._notify)

    async def changed(self, timeout: float) -> None:
        """Until the state may have changed, or ``timeout`` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # -- requests ----------------------------------------------------------------
    def enter(self) -> None:
        self.in_flight += 1
        self.last_active = time.monotonic()

    def leave(self) -> None:
        self.in_flight -= 1
        self.last_active = time.monotonic()

    # -- the session ---------------------------------------------------------------
    def ensure_started(self) -> int:
        """The generation of the session to wait for, starting one if there
        is none (single flight: this runs on the loop thread, without an
        await between the check and the start, so a burst of requests to a
        cold model makes exactly one session)."""
        if self.handle is not None:
            return self.generation
        if self.closing:
            raise Unavailable("the gateway is shutting down")
        self._loop = asyncio.get_running_loop()
        self.generation += 1
        self.error = ""
        self.stopping = False
        self.observer = Recorder(self.name, self.notify_threadsafe, self.echo)
        handle = self.factory(self.name, self.observer)
        self.handle = handle
        self.sessions += 1
        self.thread = threading.Thread(
            target=self._drive, args=(handle, self.generation), name=f"gateway-{self.name}",
            daemon=True,
        )  # fmt: skip
        self.thread.start()
        self._notify()
        return self.generation

    def _drive(self, handle: Handle, generation: int) -> None:
        error = ""
        try:
            handle.drive()
        except Interrupted:
            pass  # stopped by the gateway (idle, shutdown): a normal end
        except BaseException as exc:  # reported to the held requests
            error = describe(exc)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._ended, generation, error)

    def _ended(self, generation: int, error: str) -> None:
        if generation != self.generation:
            return
        if self.echo is not None:
            self.echo(f"[{self.name}] " + (f"failed: {error}" if error else "stopped"))
        if self.handle is not None:
            self.gpu_hours_ended += usage.held(self.handle.record)
        self.handle = None
        self.thread = None
        self.stopping = False
        if error:
            self.error = error
            self.failed_generation = generation
        self._notify()

    def stop(self, reason: str) -> None:
        if self.handle is not None and not self.stopping:
            self.stopping = True
            self.handle.request_stop(reason)
            self._notify()

    async def ready(self, tick: float, on_tick: Callable[[str], object] | None = None) -> Handle:
        """Wait until this model's session serves, starting it if needed.
        ``on_tick(state)`` is awaited (if it returns an awaitable) about every
        ``tick`` seconds while waiting. Raises ``Unavailable`` with the root
        cause if the session fails."""
        generation = self.ensure_started()
        next_tick = time.monotonic()
        while True:
            handle = self.handle
            if handle is not None and self.generation == generation:
                if self.state == READY and not self.stopping:
                    return handle
            elif self.failed_generation == generation:
                raise Unavailable(f"{self.name} failed to start: {self.error}")
            else:
                # What we waited for ended without failing (stopped while idle,
                # or a new session already runs): wait for the current one.
                generation = self.ensure_started()
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

    def __init__(self, served: dict[str, str], factory: Factory,
                 echo: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.slots = {name: Slot(name, served[name], factory, echo) for name in sorted(served)}
        self.aliases = {slot.served: slot for slot in self.slots.values() if slot.served}

    def find(self, name: str) -> Slot | None:
        return self.slots.get(name) or self.aliases.get(name)

    def names(self) -> list[str]:
        return list(self.slots)

    def stop_idle(self, idle_timeout: float) -> list[str]:
        """Stop every session with no request in flight and none finished
        for ``idle_timeout`` seconds; the names of those stopped."""
        now = time.monotonic()
        stopped = []
        for slot in self.slots.values():
            if (
                slot.handle is not None and not slot.stopping and slot.in_flight == 0
                and now - slot.last_active >= (slot.idle_timeout or idle_timeout)
            ):  # fmt: skip
                slot.idle_stops += 1
                slot.gpu_hours_saved += usage.left(slot.handle.record)
                slot.stop("idle timeout")
                stopped.append(slot.name)
        return stopped

    async def shutdown(self, timeout: float) -> list[str]:
        """Stop every session and wait for each to clean up (its job cancelled
        and confirmed); the names of those still not ended after ``timeout``."""
        for slot in self.slots.values():
            slot.closing = True
            slot.stop("gateway shutdown")
        threads = [(s.name, s.thread) for s in self.slots.values() if s.thread is not None]
        deadline = time.monotonic() + timeout

        def join() -> list[str]:
            for _, thread in threads:
                assert thread is not None
                thread.join(max(0.0, deadline - time.monotonic()))
            return [name for name, thread in threads if thread is not None and thread.is_alive()]

        return await asyncio.to_thread(join)
