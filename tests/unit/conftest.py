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


@pytest.fixture
def no_gateway_left() -> Iterator[list[Path]]:
    """State directories to check after the test: a gateway a failed test
    left running there is ended as `gateway stop` would (SIGTERM, then wait
    until it lets go of its claim)."""
    import signal
    import time

    from alvis_fsm.fronts.gateway import instance

    watched: list[Path] = []
    yield watched
    for state in watched:
        found = instance.running(state)
        if found is None:
            continue
        os.kill(found.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while instance.claimed(state) and time.monotonic() < deadline:
            time.sleep(0.1)
