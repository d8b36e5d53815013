"""Desktop notifications (opt-in: ``notify.enabled``): when a session becomes
ready after waiting in the queue for longer than ``notify.after_wait``
seconds, and when a session fails. macOS' ``osascript``, Linux'
``notify-send``; silently skipped where neither exists. Never raises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

from alvis_fsm.engine.session.states import State


def send(title: str, message: str) -> bool:
    """Show a notification; False when this machine has no way to."""
    message = message[:300]
    if sys.platform == "darwin" and shutil.which("osascript"):
        quote = lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
        argv = [
            "osascript",
            "-e",
            f"display notification {quote(message)} with title {quote(title)}",
        ]
    elif shutil.which("notify-send"):
        argv = ["notify-send", "--app-name=alvis-fsm", title, message]
    else:
        return False
    try:
        subprocess.run(argv, capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return True


def queue_wait(record: Any) -> float:
    """Seconds the session's job waited in the queue (submitted -> running)."""
    entered = record.entered_at
    if State.SUBMITTED in entered and State.RUNNING in entered:
        return max(0.0, float(entered[State.RUNNING]) - float(entered[State.SUBMITTED]))
    return 0.0


def on_ready(settings: Any, record: Any) -> None:
    if settings.notify.enabled and queue_wait(record) > settings.notify.after_wait:
        send(f"alvis-fsm: {record.name} is ready", f"{record.model} at {record.url}")


def on_failure(settings: Any, name: str, message: str) -> None:
    if settings.notify.enabled:
        send(f"alvis-fsm: {name} failed", message)
