"""Desktop notifications, with stand-in notify-send / osascript programs on
PATH that record their arguments (real processes, run by the code)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.fronts import notify


def _stand_in(tmp: Path, name: str) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp / f"{name}.log"
    (bin_dir / name).write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >>"{log}"\n')
    (bin_dir / name).chmod(0o755)
    return log


def _record(wait: float) -> SimpleNamespace:
    return SimpleNamespace(
        name="gpt",
        model="gpt-oss-20b",
        url="http://localhost:58000",
        entered_at={"submitted": 1000.0, "running": 1000.0 + wait},
    )


@pytest.fixture
def linux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = _stand_in(tmp_path, "notify-send")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "platform", "linux")
    return log


def test_ready_after_a_long_queue_wait_notifies(linux: Path) -> None:
    cfg = load_settings({"notify": {"enabled": True}})
    notify.on_ready(cfg, _record(wait=75))
    assert linux.read_text().splitlines() == [
        "--app-name=alvis-fsm",
        "alvis-fsm: gpt is ready",
        "gpt-oss-20b at http://localhost:58000",
    ]


def test_short_wait_or_disabled_does_not_notify(linux: Path) -> None:
    notify.on_ready(load_settings({"notify": {"enabled": True}}), _record(wait=20))
    notify.on_ready(load_settings(), _record(wait=600))  # off by default
    notify.on_failure(load_settings(), "gpt", "vLLM exited")
    assert not linux.exists()


def test_failure_notifies(linux: Path) -> None:
    notify.on_failure(load_settings({"notify": {"enabled": True}}), "gpt", "CUDA out of memory")
    assert "alvis-fsm: gpt failed" in linux.read_text()


def test_macos_uses_osascript_with_quotes_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _stand_in(tmp_path, "osascript")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert notify.send('say "hi"', "a\\b")
    assert log.read_text().splitlines() == [
        "-e",
        'display notification "a\\\\b" with title "say \\"hi\\""',
    ]


def test_nothing_to_notify_with_is_silently_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither program
    assert notify.send("t", "m") is False
    assert os.environ["PATH"] == str(tmp_path)
