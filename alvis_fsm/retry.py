"""The one retry policy: exponential backoff with a cap.

Every place that tries again (the shared ssh connection, the tunnel, the
log stream, a supervisor waiting for the network) uses ``Backoff``, so they
all back off the same way and a remote that keeps failing can never make the
client spin. A small helper rather than a library: the loops it serves do
other work between tries (stream logs, check the job), which decorator-style
retry libraries do not fit."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Waits of ``first``, ×``factor`` each further failure, at most ``most``
    seconds. ``immediate``: the first retry comes at once (a one-off hiccup
    costs nothing). A success that lasted ``healthy`` seconds (see
    ``failed(lived=...)``) starts the count again."""

    first: float = 0.5
    most: float = 60.0
    factor: float = 2.0
    immediate: bool = False
    healthy: float = float("inf")
    failures: int = 0
    delay: float = 0.0
    _next: float = field(default=0.0, repr=False)

    def failed(self, lived: float = 0.0) -> int:
        """Count a failure (after ``lived`` seconds of success); set ``delay``
        and when the next try is due. Returns the failures in a row."""
        if lived >= self.healthy:
            self.failures = 0
        self.failures += 1
        n = self.failures - (2 if self.immediate else 1)
        self.delay = 0.0 if n < 0 else min(self.first * self.factor**n, self.most)
        self._next = time.monotonic() + self.delay
        return self.failures

    def reset(self) -> None:
        self.failures, self.delay, self._next = 0, 0.0, 0.0

    def due(self) -> bool:
        """For loops that keep working between tries: is the next one due?"""
        return time.monotonic() >= self._next

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Sleep until the next try (after ``failed``); False if ``stop`` was set meanwhile."""
        left = max(0.0, self._next - time.monotonic())
        if stop is None:
            time.sleep(left)
            return True
        return not stop.wait(left)
