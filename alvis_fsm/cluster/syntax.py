"""The syntax of the values sbatch is given, defined once: account,
partition, GPUs per node, job name and time, and the one duration syntax
every duration takes (``-t``, ``slurm.time``, ``gateway --idle``, a catalog
entry's ``idle_timeout``): SLURM's forms (``MM``, ``MM:SS``, ``H:MM:SS``,
``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) and units (``90m``, ``2h``,
``1h30m``, ``2d``). Only a bare number depends on where it is written: a
job's time counts minutes (as sbatch does), the gateway's durations seconds.

Settings (flags, environment, config files), catalog entries, ``start`` and
the job script all check these values with the definitions here, so a value
is refused with the same rule wherever it came from, before any login; the
job script checks them again before they reach an ``#SBATCH`` line. The
patterns are unanchored texts (for ``re.fullmatch``); ``anchored`` makes the
``^...$`` form pydantic's ``Field(pattern=...)`` wants."""

from __future__ import annotations

import re

from alvis_fsm.errors import ConfigError, UsageError
from alvis_fsm.paths import packaged_default

# Identifiers sbatch reads verbatim from an #SBATCH line: no spaces, quotes, newlines.
ACCOUNT = r"[A-Za-z0-9_.-]+"
JOB_NAME = ACCOUNT
# Several partitions are a comma-separated list (sbatch tries each): names,
# never an empty item.
PARTITION = rf"{ACCOUNT}(?:,{ACCOUNT})*"
# A GPU type as SLURM names it: the TYPE of --gpus-per-node TYPE:N.
GPU_TYPE = r"[A-Za-z0-9_]+"
# --gpus-per-node: TYPE:N or N; the count is group 1.
GPUS = rf"(?:{GPU_TYPE}:)?([1-9][0-9]*)"
# What a user may ask for: GPUS, or "auto" (chosen by alvis_fsm.engine.fit.sizing).
GPUS_OR_AUTO = rf"auto|{GPUS}"

WALLTIME_FORMS = (
    "MM, MM:SS, H:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, or with units (90m, 2h, 1h30m, 2d)"
)

# sbatch --time. Non-leading fields are at most two digits; the leading one
# is any length (SLURM accepts "90" minutes or "36:00:00"). ASCII digits only.
_DURATIONS = [
    re.compile(r"(?P<m>[0-9]+)"),
    re.compile(r"(?P<m>[0-9]+):(?P<s>[0-9]{1,2})"),
    re.compile(r"(?P<h>[0-9]+):(?P<m>[0-9]{1,2}):(?P<s>[0-9]{1,2})"),
    re.compile(r"(?P<d>[0-9]+)-(?P<h>[0-9]{1,2})"),
    re.compile(r"(?P<d>[0-9]+)-(?P<h>[0-9]{1,2}):(?P<m>[0-9]{1,2})"),
    re.compile(r"(?P<d>[0-9]+)-(?P<h>[0-9]{1,2}):(?P<m>[0-9]{1,2}):(?P<s>[0-9]{1,2})"),
]

ACCOUNT_RE = re.compile(ACCOUNT)
JOB_NAME_RE = ACCOUNT_RE
PARTITION_RE = re.compile(PARTITION)
GPU_TYPE_RE = re.compile(GPU_TYPE)
GPUS_RE = re.compile(GPUS)
GPUS_OR_AUTO_RE = re.compile(GPUS_OR_AUTO)


def anchored(pattern: str, *, empty: bool = False) -> str:
    """``pattern`` as a whole-string pattern for pydantic; ``empty`` also
    accepts "" (a setting left empty: the cluster's default)."""
    return rf"^(?:{pattern})" + ("?$" if empty else "$")


# Units, largest first, each at most once: "2d", "1h30m", "90m", "1.5h", "45s".
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_WITH_UNITS = re.compile(
    r"(?:(?P<d>[0-9]+(?:\.[0-9]+)?)d)?\s*(?:(?P<h>[0-9]+(?:\.[0-9]+)?)h)?\s*"
    r"(?:(?P<m>[0-9]+(?:\.[0-9]+)?)m(?:in)?)?\s*(?:(?P<s>[0-9]+(?:\.[0-9]+)?)s)?"
)
_BARE = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _unit_seconds(text: str) -> float | None:
    """Seconds of a duration with units (``2h``, ``1h30m``), else None."""
    m = _WITH_UNITS.fullmatch(text.lower())
    if m is None or not any(m.groupdict().values()):
        return None
    return sum(float(v) * _UNIT_SECONDS[k] for k, v in m.groupdict().items() if v is not None)


def spoken_seconds(text: str) -> float:
    """Seconds of a duration the gateway is given (``--idle``, a catalog
    entry's ``idle_timeout``): ``90`` (seconds), ``90s``, ``15m``, ``1h30m``,
    ``1.5h``, ``2d`` or one of SLURM's forms (``15:00``, ``1:30:00``);
    ``ValueError`` for anything else (nothing, zero, other words)."""
    stripped = text.strip()
    if stripped.isascii() and _BARE.fullmatch(stripped):
        seconds: float | None = float(stripped)
    else:
        seconds = _unit_seconds(stripped) if stripped.isascii() else None
        if seconds is None:
            seconds = duration(stripped)  # SLURM's forms; a bare number was seconds above
    if not seconds or seconds <= 0:
        raise ValueError(
            f"{text!r} is not a duration: seconds, or with units (90s, 15m, 1h30m, 2d), or H:MM:SS"
        )
    return seconds


def duration(text: str) -> int | None:
    """Seconds of a job duration, or None if ``text`` is none of SLURM's forms
    (a bare number is minutes) nor a duration with units (``2h``, ``1h30m``;
    rounded to whole seconds)."""
    if text.isascii() and text == text.strip() and not _BARE.fullmatch(text):
        with_units = _unit_seconds(text)
        if with_units is not None:
            return round(with_units)
    for pattern in _DURATIONS:
        # fullmatch with ASCII digits only: "٣" or " 5" or "+5" never pass.
        m = pattern.fullmatch(text)
        if m is None:
            continue
        fields = {k: int(v) for k, v in m.groupdict().items() if v is not None}
        leading = next(iter(fields))
        limits = {"h": 24 if "d" in fields else None, "m": 60, "s": 60}
        for key, value in fields.items():
            limit = limits.get(key)
            if key != leading and limit is not None and value >= limit:
                return None
        return (
            fields.get("d", 0) * 86400
            + fields.get("h", 0) * 3600
            + fields.get("m", 0) * 60
            + fields.get("s", 0)
        )
    return None


def parse_walltime(text: str, max_time: str | None = None) -> int:
    """Seconds of a job duration in one of SLURM's forms, at most ``max_time``
    (by default slurm.max_time's packaged value)."""
    if max_time is None:
        max_time = str(packaged_default("slurm.max_time"))
    limit = duration(max_time)
    if limit is None or limit <= 0:
        raise ConfigError(
            f"Invalid maximum job duration {max_time!r}",
            hint=f"slurm.max_time must be one of {WALLTIME_FORMS}.",
        )
    seconds = duration(text)
    if seconds is None or seconds <= 0:
        raise UsageError(
            f"Invalid job duration {text!r}: use {WALLTIME_FORMS} (at most {max_time})",
            hint="For example -t 2h, -t 1h30m, -t 30 (minutes), -t 2:00:00 (two hours)"
            " or -t 1-12 (36 hours).",
        )
    if seconds > limit:
        raise UsageError(
            f"Job duration {text!r} is longer than the maximum {max_time}",
            hint=f"Use {WALLTIME_FORMS}, at most {max_time} (slurm.max_time).",
        )
    return seconds
