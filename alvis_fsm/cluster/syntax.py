"""The syntax of the values sbatch is given, defined once: account,
partition, GPUs per node, job name and time (SLURM's durations), and the
durations people write for the gateway (``15m``).

Settings (flags, environment, config files), catalog entries, ``start`` and
the job script all check these values with the definitions here, so a value
is refused with the same rule wherever it came from, before any login; the
job script checks them again before they reach an ``#SBATCH`` line. The
patterns are unanchored texts (for ``re.fullmatch``); ``anchored`` makes the
``^...$`` form pydantic's ``Field(pattern=...)`` wants."""

from __future__ import annotations

import re

from alvis_fsm.errors import ConfigError, UsageError

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
# What a user may ask for: GPUS, or "auto" (chosen by alvis_fsm.engine.fit).
GPUS_OR_AUTO = rf"auto|{GPUS}"

WALLTIME_FORMS = "MM, MM:SS, H:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
DEFAULT_MAX_TIME = "7-00:00:00"

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


# A duration as people write it on the command line or in a catalog entry
# (``gateway --idle``, ``idle_timeout``): seconds, or with one unit.
_SPOKEN = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smh]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def spoken_seconds(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``15m``, ``1h`` or ``1.5h``; ``ValueError``
    for anything else (nothing, zero, other units, several units)."""
    match = _SPOKEN.fullmatch(text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: seconds, or with a unit (90s, 15m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def duration(text: str) -> int | None:
    """Seconds of a SLURM duration, or None if ``text`` is not one of its forms."""
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


def parse_walltime(text: str, max_time: str = DEFAULT_MAX_TIME) -> int:
    """Seconds of a job duration in one of SLURM's forms, at most ``max_time``."""
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
            hint="For example -t 30 (minutes), -t 2:00:00 (two hours) or -t 1-12 (36 hours).",
        )
    if seconds > limit:
        raise UsageError(
            f"Job duration {text!r} is longer than the maximum {max_time}",
            hint=f"Use {WALLTIME_FORMS}, at most {max_time} (slurm.max_time).",
        )
    return seconds
