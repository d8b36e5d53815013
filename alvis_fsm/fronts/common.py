"""What more than one front needs (the CLI, the Python API, the gateway):
settings with flag overrides, and how a detached session's supervisor is
started (the engine's ``ownership.Handover`` is told only that)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from alvis_fsm.errors import UsageError

if TYPE_CHECKING:
    from alvis_fsm.engine.settings.model import Settings


def settings(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    from alvis_fsm.engine.settings.model import load_settings

    return load_settings({k: dict(v) for k, v in (overrides or {}).items() if v})


def _flags() -> dict[str, str]:
    """The settings a command-line flag of ``start`` sets: setting -> flag
    (each setting's record, engine/settings/docs.py)."""
    from alvis_fsm.engine.settings.docs import SETTINGS

    return {key: doc.flag for key, doc in SETTINGS.items() if doc.flag}


def flag_settings(overrides: Mapping[str, Mapping[str, Any]]) -> Settings:
    """Settings with command-line flags on top; a flag's bad value is a usage
    error (exit 2) naming the flag, not a configuration error."""
    from alvis_fsm.engine.settings.docs import SETTINGS
    from alvis_fsm.engine.settings.explain import SettingError
    from alvis_fsm.engine.settings.model import FLAG_LABEL

    try:
        return settings(overrides)
    except SettingError as exc:
        flag = _flags().get(exc.key)
        if exc.origin != FLAG_LABEL or flag is None:
            raise
        raise UsageError(
            f"{flag}: {exc.reason}",
            hint=f"For example: alvis-fsm start {flag} {SETTINGS[exc.key].example}",
        ) from None


def supervisor_command(name: str) -> list[str]:
    """The argv of a detached session's background supervisor (the CLI's
    hidden ``_supervise NAME``: fronts/cli/commands/supervise.py)."""
    return [sys.executable, "-m", "alvis_fsm", "_supervise", name]
