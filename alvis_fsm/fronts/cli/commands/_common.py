"""What several commands share: settings with flag overrides (fronts/common.py,
shared with the Python API), choosing a session when no name is given, the
reporter."""

from __future__ import annotations

from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.fronts.common import flag_settings, settings
from alvis_fsm.fronts.ui import Reporter, Verbosity

__all__ = ("flag_settings", "name_for_model", "pick_session", "reporter", "settings")


def reporter(verbosity: Verbosity | None) -> Reporter:
    return Reporter(verbosity if verbosity is not None else Verbosity.NORMAL)


def name_for_model(model: str) -> str:
    """The default session name (engine/session/spec.py)."""
    from alvis_fsm.engine.session.spec import name_for_model as default_name

    return default_name(model)


def pick_session(store: Store, name: str | None, command: str = "status") -> SessionRecord:
    """The named session, or the only live one (engine/session/service.py)."""
    from alvis_fsm.engine.session.service import pick_session as pick

    return pick(store, name, command)
