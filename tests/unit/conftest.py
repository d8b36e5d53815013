"""Every unit test runs in a fresh HOME with no ALVIS_FSM_* variables, so
neither the developer's real ~/.alvis-vllm.conf nor their shell leaks in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.upper().startswith("ALVIS_FSM_"):
            monkeypatch.delenv(name)
    yield home


@pytest.fixture
def user_conf(isolated_home: Path) -> Path:
    """Path of the default user settings file (not created)."""
    return isolated_home / ".alvis-vllm.conf"
