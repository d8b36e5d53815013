"""Where the packaged data files are, defined once.

In a wheel they sit in ``alvis_fsm/data/`` (see pyproject's force-include);
in a source checkout or an editable install they are the top-level files of
the repository."""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_DIR = _PACKAGE_DIR.parent

_LOCATIONS = {
    "default.toml": ("data/default.toml", "config/default.toml"),
    "models.json": ("data/models.json", "models.json"),
    "jobscript.sh": ("data/jobscript.sh", "jobscript.sh"),
}


def data_file(name: str) -> Path:
    """Path of a packaged data file (``default.toml``, ``models.json``, ``jobscript.sh``)."""
    packaged, in_repo = _LOCATIONS[name]
    candidate = _PACKAGE_DIR / packaged
    if candidate.is_file():
        return candidate
    return _REPO_DIR / in_repo


def default_config() -> Path:
    return data_file("default.toml")


@functools.cache
def _defaults() -> dict[str, Any]:
    return tomllib.loads(default_config().read_text(encoding="utf-8"))


def packaged_default(key: str) -> Any:
    """The packaged default of the setting ``section.key``: ``default.toml``'s
    own value, for code that needs a default without loading the settings
    (so that no setting's default is written a second time)."""
    section, _, name = key.partition(".")
    return _defaults()[section][name]


def packaged_catalog() -> Path:
    return data_file("models.json")


def jobscript_template() -> Path:
    return data_file("jobscript.sh")
