"""The observer of a session: the one interface through which the engine
tells the world what happens (it never prints). The terminal front prints
the events (fronts/ui.py ``Reporter``), the Python API logs them
(fronts/api/session.py), a gateway records them per model. ``ask`` is how a prompt
(an ssh passphrase) reaches a person, through the front."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from alvis_fsm.engine.session.store import SessionRecord


class Observer(Protocol):
    """Every event the engine reports, in the order it happens. Must be
    thread-safe: log lines arrive from a reader thread. The events are
    no-ops here, so that a class deriving from it keeps only what it wants
    (``Quiet``); ``interactive`` and ``ask`` each front must say."""

    def info(self, message: str) -> None:
        return None

    def warn(self, message: str) -> None:
        return None

    def result(self, message: str) -> None:
        return None

    def command(self, text: str) -> None:
        return None

    def log_line(self, stream: str, line: str) -> None:
        return None

    def waiting(self, text: str, since: float | None = None) -> None:
        return None

    def interrupted(self) -> None:
        return None

    def done_waiting(self) -> None:
        return None

    def interactive(self) -> bool: ...
    def ask(self, prompt: str, secret: bool = False) -> str: ...
    def connected(
        self, record: SessionRecord, models: list[str], first_token_s: float | None = None
    ) -> None:
        return None


class Quiet(Observer):
    """An observer that keeps nothing and asks nothing (the gateway's batch
    calls): every event is the protocol's own no-op."""

    def interactive(self) -> bool:
        return False

    def ask(self, prompt: str, secret: bool = False) -> str:
        from alvis_fsm.errors import UsageError

        raise UsageError(
            f"alvis-fsm cannot ask here: {prompt.strip()}", hint="Load your ssh key into ssh-agent."
        )
