"""What the gateway's page and ``/metrics`` show, gathered as requests end:
per model the requests, errors, latencies and tokens (each session's queue
wait and load time go straight to ``/metrics``); the last requests and errors; requests per minute and GPU-hours
over the gateway's life. Each request also becomes a line of the request
log (requestlog.py). Runs on the gateway's event loop only.

``Meter`` is one request on its way: the server hooks fill it (the model,
the answer's bytes for its ``usage``, whether it was answered whole)."""

from __future__ import annotations

import re
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alvis_fsm.engine.session.states import State
from alvis_fsm.fronts.gateway.observe.requestlog import Entry, RequestLog, route_of
from alvis_fsm.text import inert_line

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.observe.metrics import Metrics
    from alvis_fsm.fronts.gateway.slot.models import Models

TAIL = 8192  # bytes of an answer kept to find its usage (vLLM puts it last)
WINDOW = 1000  # latencies per model for p50/p95
RECENT = 100  # requests kept for the page
ERRORS = 50  # errors kept for the page
MINUTES = 24 * 60  # per-minute points kept for the charts (the last day)

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_MESSAGE = re.compile(rb'"message"\s*:\s*"((?:[^"\\]|\\.){0,300})')


class Meter:
    """One request through the gateway (``Watch.begin`` makes it)."""

    __slots__ = ("model", "route", "served", "started", "stream", "tail", "wall")

    def __init__(self, route: str) -> None:
        self.wall = time.time()
        self.started = time.monotonic()
        self.route = route
        self.model = ""
        self.stream = False
        self.served = False
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        """A chunk of the answer as it passes (only its end is kept)."""
        tail = self.tail + chunk
        self.tail = tail[-TAIL:] if len(tail) > TAIL else tail

    def usage(self) -> tuple[int | None, int | None]:
        prompt = _PROMPT.findall(self.tail)
        completion = _COMPLETION.findall(self.tail)
        return (int(prompt[-1]) if prompt else None, int(completion[-1]) if completion else None)


@dataclass
class ModelFigures:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    per_minute: deque[int] = field(default_factory=lambda: deque(maxlen=MINUTES))
    gpu_hours: deque[float] = field(default_factory=lambda: deque(maxlen=MINUTES))

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        if len(self.latencies) == 1:
            return self.latencies[0]
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[round(q * 100) - 1]


class Watch:
    def __init__(
        self, models: Models, log: RequestLog | None = None, metrics: Metrics | None = None
    ) -> None:
        self.models = models
        self.log = log
        self.metrics = metrics
        self.started = time.time()
        self.figures = {name: ModelFigures() for name in models.slots}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS)
        self._minute = 0  # minutes since the start the per-minute points reach
        self._seen_starts: set[tuple[str, int]] = set()

    # -- requests -------------------------------------------------------------------
    def begin(self, path: str) -> Meter:
        """A request to ``path`` begins: metered under its fixed route (``route_of``)."""
        return Meter(route_of(path))

    def done(self, meter: Meter, status: int, message: str = "") -> None:
        """A request ended with ``status`` (``message``: its error, if the
        gateway or the server said one)."""
        latency = time.monotonic() - meter.started
        prompt, completion = meter.usage()
        ok = status < 400 and meter.served
        if not ok and not message:
            found = _MESSAGE.findall(meter.tail)
            message = found[-1].decode("utf-8", "replace") if found else ""
        entry = Entry(
            time=meter.wall,
            model=meter.model,
            route=meter.route,
            status=status,
            latency_s=round(latency, 6),
            ok=ok,
            prompt_tokens=prompt,
            completion_tokens=completion,
            stream=meter.stream,
        )
        if self.log is not None:
            self.log.write(entry)
        row = entry.to_json()
        self.recent.append(row)
        if not ok:
            self.errors.append({**row, "message": inert_line(message)[:300]})
        figures = self.figures.get(meter.model)
        if figures is not None:
            self.advance()
            figures.requests += 1
            figures.per_minute[-1] += 1
            figures.latencies.append(latency)
            figures.errors += not ok
            figures.prompt_tokens += prompt or 0
            figures.completion_tokens += completion or 0
        if self.metrics is not None:
            self.metrics.request(entry)

    # -- over time ------------------------------------------------------------------
    def advance(self) -> None:
        """Per-minute points up to now (a new point each minute, per model)."""
        minute = int((time.time() - self.started) // 60)
        while self._minute <= minute:
            for name, figures in self.figures.items():
                figures.per_minute.append(0)
                slot = self.models.slots.get(name)
                figures.gpu_hours.append(slot.gpu_hours_used if slot is not None else 0.0)
            self._minute += 1
        for name, figures in self.figures.items():  # the current minute's GPU-hours, up to now
            slot = self.models.slots.get(name)
            if slot is not None and figures.gpu_hours:
                figures.gpu_hours[-1] = slot.gpu_hours_used

    def sweep(self) -> None:
        """Called every few seconds: the charts' points, and the queue wait
        and load time of each session that turned ready since."""
        self.advance()
        for name, slot in self.models.slots.items():
            for run in slot.runs():
                key = (name, run.generation)
                at = run.handle.record.entered_at
                if key in self._seen_starts or State.TUNNELED not in at:
                    continue
                self._seen_starts.add(key)
                wait = _between(at, State.SUBMITTED, State.RUNNING)
                load = _between(at, State.RUNNING, State.TUNNELED)
                if self.metrics is not None:
                    self.metrics.started(name, wait, load)


def _between(at: dict[Any, float], first: State, then: State) -> float | None:
    if first in at and then in at:
        return max(0.0, at[then] - at[first])
    return None
