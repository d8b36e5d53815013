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
