"""What one model's session tells the gateway: an engine ``Observer``
(engine/observer.py) that records instead of printing (the last status line
and the last log lines) and wakes the requests held for the model."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from alvis_fsm.errors import ConfigError
from alvis_fsm.text import inert


class Recorder:
    """Called from the session's own thread; ``on_change`` must be safe to
    call from there (the gateway passes ``loop.call_soon_threadsafe``)."""

    def __init__(
        self,
        model: str,
        on_change: Callable[[], None] = lambda: None,
        echo: Callable[[str], None] | None = None,
        lines: int = 50,
    ) -> None:
        self.model = model
        self.on_change = on_change
        self.echo = echo
        self.status = ""
        self.lines: deque[str] = deque(maxlen=lines)
        self._said = ""

    def _say(self, kind: str, message: str) -> None:
        self.status = message
        if self.echo is not None and message != self._said:
            self._said = message
            self.echo(f"[{self.model}] {kind}{message}")
        self.on_change()

    def info(self, message: str) -> None:
        self._say("", message)

    def warn(self, message: str) -> None:
        self._say("warning: ", message)

    def result(self, message: str) -> None:
        self._say("", message)

    def command(self, text: str) -> None:
        pass

    def log_line(self, stream: str, line: str) -> None:
        self.lines.append(f"[{stream}] {inert(line)}")  # /gateway/status shows them

    def waiting(self, text: str, since: float | None = None) -> None:
        self._say("", text)

    def interrupted(self) -> None:
        pass

    def done_waiting(self) -> None:
        pass

    def interactive(self) -> bool:
        return False

    def ask(self, prompt: str, secret: bool = False) -> str:
        raise ConfigError(
            f"The gateway cannot ask ({prompt.strip()})",
            hint="Set what it asks for in your settings (`alvis-fsm config set ...`).",
        )

    def connected(self, record: Any, models: list[str], first_token_s: float | None = None) -> None:
        self._say("", f"ready: job {record.job_id} on {record.node}")
