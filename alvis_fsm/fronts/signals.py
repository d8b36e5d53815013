"""The terminal's signals, owned by the front (the engine never touches them).

In a terminal, SIGTERM and SIGHUP (the terminal closed) stop a session the
way Ctrl+C does, and while a session cleans up, a second Ctrl+C or SIGTERM
must not skip its scancel. ``signal.signal`` works only in the main thread:
that is why this lives here and not in the engine, which a front holding
many sessions runs in threads of its own."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from alvis_fsm.errors import StopRequested

if TYPE_CHECKING:
    from alvis_fsm.engine.session.runner import Runner


def _raise_stop(signum: int, frame: Any) -> None:
    raise StopRequested(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise StopRequested (the signal's name as reason)."""
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def shielded() -> Iterator[list[int]]:
    """Signals are noted, not acted on (for the Runner's cleanup)."""
    seen: list[int] = []

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield seen
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def drive(runner: Runner) -> None:
    """Drive a session from the terminal: SIGTERM/SIGHUP stop it (build the
    Runner with ``shield=shielded`` so its cleanup is shielded too)."""
    with stop_signals():
        runner.drive()
