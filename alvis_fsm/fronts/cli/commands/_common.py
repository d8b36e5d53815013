"""What several commands share: settings with flag overrides, choosing a
session when no name is given, the reporter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from alvis_fsm.engine.store import SessionRecord, Store
from alvis_fsm.errors import UsageError
from alvis_fsm.fronts.ui import Reporter, Verbosity

if TYPE_CHECKING:
    from alvis_fsm.engine.settings import Settings


def settings(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    from alvis_fsm.engine.settings import load_settings

    return load_settings({k: dict(v) for k, v in (overrides or {}).items() if v})


def _flags() -> dict[str, str]:
    """The settings a command-line flag of ``start`` sets: setting -> flag
    (each setting's record, engine/setting_docs.py)."""
    from alvis_fsm.engine.setting_docs import SETTINGS

    return {key: doc.flag for key, doc in SETTINGS.items() if doc.flag}


def flag_settings(overrides: Mapping[str, Mapping[str, Any]]) -> Settings:
    """Settings with command-line flags on top; a flag's bad value is a usage
    error (exit 2) naming the flag, not a configuration error."""
    from alvis_fsm.engine.setting_docs import SETTINGS
    from alvis_fsm.engine.settings import FLAG_LABEL, SettingError

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


def reporter(verbosity: Verbosity | None) -> Reporter:
    return Reporter(verbosity if verbosity is not None else Verbosity.NORMAL)


def name_for_model(model: str) -> str:
    """The default session name (engine/session_spec.py)."""
    from alvis_fsm.engine.session_spec import name_for_model as default_name

    return default_name(model)


def pick_session(store: Store, name: str | None, command: str = "status") -> SessionRecord:
    """The named session, or the only live one (engine/service.py)."""
    from alvis_fsm.engine.service import pick_session as pick

    return pick(store, name, command)
