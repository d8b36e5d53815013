"""Durations as SLURM writes them, for people to read.

Kept light (no imports): ``status --offline`` formats the time left with it
without pulling the runner in."""

from __future__ import annotations


def fmt_duration(seconds: float) -> str:
    """H:MM:SS (D-H:MM:SS past a day), as SLURM writes times; never negative."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def in_words(seconds: float) -> str:
    """ "1 h 30 min", "2 d 3 h", "1 min 30 s": a duration as a person says it
    (every start says the time it asked for this way)."""
    seconds = max(0, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}")
    return " ".join(parts) or "0 s"
