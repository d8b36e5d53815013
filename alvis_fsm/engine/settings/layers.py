"""Where settings come from, defined once and light to import (no pydantic):
the layers, highest first, are command-line flags > environment variables
``ALVIS_FSM_<SECTION>__<KEY>`` > the user's file (``~/.alvis-vllm.conf`` or
``$ALVIS_FSM_CONFIG``) > the packaged ``default.toml``.

``model`` validates the layers and records, per value, the layer that set
it (``Layer``; ``origin`` and ``where`` name it); ``raw_values`` is the quick, unvalidated merge that ``--help`` shows as
defaults (fast, and it works with a broken file)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Layer:
    """One source of values, and, for each key path it sets, the label that
    ``explain`` and error messages show."""

    label: str
    data: dict[str, Any]
    origins: dict[tuple[str, ...], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.origins:
            self.origins = {p: self.label for p in key_paths(self.data)}


def key_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path in nested tables; lists are leaves (they replace, not merge)."""
    for key, value in data.items():
        path = (*prefix, str(key))
        yield path
        if isinstance(value, Mapping):
            yield from key_paths(value, path)


def origin(loc: tuple[str, ...], layers: list[Layer]) -> str:
    """Label of the highest layer that set ``loc`` or its nearest parent."""
    for depth in range(len(loc), 0, -1):
        prefix = loc[:depth]
        for layer in reversed(layers):
            if prefix in layer.origins:
                return layer.origins[prefix]
    return DEFAULT_LABEL


def where(label: str) -> str:
    """A layer's label as words for a message: "in /home/u/.alvis-vllm.conf",
    "from a command-line flag", ..."""
    if label == FLAG_LABEL:
        return "from a command-line flag"
    if label.startswith(ENV_LABEL + " "):
        return f"from the environment variable {label[len(ENV_LABEL) + 1 :]}"
    if label == ENV_LABEL:
        return "from the environment"
    if label == DEFAULT_LABEL:
        return f"in the packaged defaults {paths.default_config()}"
    return f"in {label}"
