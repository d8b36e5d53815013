"""Where the packaged data files are, defined once.

In a wheel they sit in ``alvis_fsm/data/`` (see pyproject's force-include);
in a source checkout or an editable install they are the top-level files of
the repository."""

from __future__ import annotations

from pathlib import Path

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


def packaged_catalog() -> Path:
    return data_file("models.json")


def jobscript_template() -> Path:
    return data_file("jobscript.sh")
