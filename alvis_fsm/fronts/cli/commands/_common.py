"""What several commands share: settings with flag overrides, choosing a
session when no name is given, the reporter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from alvis_fsm.engine.store import SessionRecord, Store, check_name
from alvis_fsm.errors import SessionError, UsageError
from alvis_fsm.fronts.ui import Reporter, Verbosity

if TYPE_CHECKING:
    from alvis_fsm.engine.settings import Settings


def settings(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    from alvis_fsm.engine.settings import load_settings

    return load_settings({k: dict(v) for k, v in (overrides or {}).items() if v})


# The settings a command-line flag sets, by the flag's name.
FLAGS = {
    "tunnel.local_port": "--port",
    "tunnel.route": "--route",
    "slurm.gpus": "--gpus",
    "slurm.account": "--account",
}


def flag_settings(overrides: Mapping[str, Mapping[str, Any]]) -> Settings:
    """Settings with command-line flags on top; a flag's bad value is a usage
    error (exit 2) naming the flag, not a configuration error."""
    from alvis_fsm.engine.settings import FLAG_LABEL, SettingError

    try:
        return settings(overrides)
    except SettingError as exc:
        flag = FLAGS.get(exc.key)
        if exc.origin != FLAG_LABEL or flag is None:
            raise
        raise UsageError(
            f"{flag}: {exc.reason}",
            hint=f"For example: alvis-fsm start {flag} {_EXAMPLES.get(flag, '...')}",
        ) from None


_EXAMPLES = {"--port": "58001", "--route": "login", "--gpus": "A40:2", "--account": "NAISS2025-22-1522"}


def reporter(verbosity: Verbosity | None) -> Reporter:
    return Reporter(verbosity if verbosity is not None else Verbosity.NORMAL)


def name_for_model(model: str) -> str:
    """The default session name: the model's name, made safe for a file name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-._")[:41] or "session"
    return check_name(name)


def pick_session(store: Store, name: str | None) -> SessionRecord:
    """The named session, or the only live one (or the only one at all)."""
    if name:
        return store.load(check_name(name))
    records, errors = store.all()
    live = [r for r in records if r.live]
    candidates = live or records
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        if errors:
            raise errors[0]
        raise SessionError(
            "There is no session", hint="`alvis-fsm start` starts one."
        )
    names = ", ".join(r.name for r in candidates)
    raise SessionError(
        f"There are several sessions ({names}); name one",
        hint="For example: alvis-fsm status " + candidates[0].name,
    )
