"""Where settings come from, defined once and light to import (no pydantic):
the layers, highest first, are command-line flags > environment variables
``ALVIS_FSM_<SECTION>__<KEY>`` > the user's file (``~/.alvis-vllm.conf`` or
``$ALVIS_FSM_CONFIG``) > the packaged ``default.toml``.

``settings`` validates the layers and records, per value, the layer that set
it; ``raw_values`` is the quick, unvalidated merge that ``--help`` shows as
defaults (fast, and it works with a broken file)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from alvis_fsm import paths

ENV_PREFIX = "ALVIS_FSM_"
ENV_DELIMITER = "__"
CONFIG_ENV = "ALVIS_FSM_CONFIG"
DEFAULT_USER_CONFIG = "~/.alvis-vllm.conf"

# The labels of the layers that are not a file (a user file's label is its path).
DEFAULT_LABEL = "default"
FLAG_LABEL = "flag"
ENV_LABEL = "env"


def user_config_path() -> Path:
    """The user's settings file: ``$ALVIS_FSM_CONFIG`` or ``~/.alvis-vllm.conf``."""
    configured = os.environ.get(CONFIG_ENV)
    return Path(configured or DEFAULT_USER_CONFIG).expanduser()


def env_name(*path: str) -> str:
    """The environment variable of a key path, e.g. ALVIS_FSM_TIMEOUTS__JOB_START."""
    return ENV_PREFIX + ENV_DELIMITER.join(path).upper()


def raw_values() -> dict[str, str]:
    """``section.key`` -> the scalar value in effect before flags (packaged
    defaults, the user's file, ALVIS_FSM_* variables), read as plain TOML
    without validating; a file that cannot be read is skipped."""
    merged: dict[str, str] = {}
    for path in (paths.default_config(), user_config_path()):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for section, table in data.items():
            if isinstance(table, dict):
                for key, value in table.items():
                    if isinstance(value, str | int | float) and not isinstance(value, bool):
                        merged[f"{section}.{key}"] = str(value)
    for name, value in os.environ.items():
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and ENV_DELIMITER in upper:
            section, _, key = upper[len(ENV_PREFIX) :].partition(ENV_DELIMITER)
            merged[f"{section.lower()}.{key.lower()}"] = value
    return merged
