"""How long a model took to load, per model and GPU type: from the job's
start (the cluster's clock, in ``job.started``) to vLLM's "Application
startup complete". Kept in ``loadtimes.json`` in the state directory, the
last few starts each, so the next start can say "ready in ~40 s, based on 3
earlier starts" (and the gateway can plan a rollover with it)."""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

FILE = "loadtimes.json"
KEEP = 5  # the most recent starts per model and GPU type


def _key(model: str, gpus: str) -> str:
    gpu_type = gpus.split(":")[0] if ":" in gpus else "any"
    return f"{model}|{gpu_type}"


class LoadTimes:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE

    def _read(self) -> dict[str, list[float]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # missing or damaged: an estimate is a nicety, never an error
        if not isinstance(data, dict):
            return {}
        return {
            str(k): [float(x) for x in v if isinstance(x, int | float) and x >= 0]
            for k, v in data.items()
            if isinstance(v, list)
        }

    def expected(self, model: str, gpus: str) -> tuple[float, int] | None:
        """(median seconds, how many earlier starts), or None without any."""
        times = self._read().get(_key(model, gpus), [])
        return (statistics.median(times), len(times)) if times else None

    def longest(self, model: str) -> tuple[float, int] | None:
        """The model's slowest GPU type's ``expected``: what a start on any
        GPUs (or ``auto``, not chosen yet) should plan for; None without any."""
        found = [
            (statistics.median(v), len(v))
            for k, v in self._read().items()
            if k.rpartition("|")[0] == model and v
        ]
        return max(found) if found else None

    def add(self, model: str, gpus: str, seconds: float) -> None:
        from alvis_fsm.files import atomic_write

        data = self._read()
        key = _key(model, gpus)
        data[key] = ([*data.get(key, []), round(max(0.0, seconds), 1)])[-KEEP:]
        # A read-only state dir costs the estimate, not the session.
        with contextlib.suppress(OSError):
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def describe(expected: tuple[float, int] | None) -> str:
    if expected is None:
        return ""
    seconds, n = expected
    return f"ready in ~{seconds:.0f} s, based on {n} earlier start{'s' if n != 1 else ''}"
