"""alvis-fsm stop (alias cancel): scancel, close the tunnel, state cleaned.
Idempotent. Whoever drives the session is asked to let go first
(engine/session/ownership.py ``stop_session``)."""

from __future__ import annotations

from alvis_fsm.engine.session.store import Store
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import pick_session, reporter, settings
from alvis_fsm.fronts.ui import Reporter, Verbosity


def run(verbosity: Verbosity, *, name: str | None, ui: Reporter | None = None) -> None:
    ui = ui or reporter(verbosity)
    cfg = settings()
    store = Store(cfg.state_dir)
    from alvis_fsm.engine.session.service import NoLiveSession

    try:
        record = pick_session(store, name, "stop")
    except NoLiveSession as exc:
        # Nothing live: nothing to stop (finished sessions are history).
        ui.result(f"Nothing to stop: {exc.message[0].lower()}{exc.message[1:]}.")
        return
    from alvis_fsm.engine.session import ownership

    ownership.stop_session(cfg, store, record.name, ui, shield=signals.shielded)
