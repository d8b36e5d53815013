"""alvis-fsm logs: the session's vLLM logs, from the shared run directory."""

from __future__ import annotations

from alvis_fsm.engine.session.store import Store
from alvis_fsm.fronts.cli.commands._common import reporter, settings
from alvis_fsm.fronts.gateway.slot.sessions import session_of
from alvis_fsm.fronts.ui import Verbosity


def run(verbosity: Verbosity, *, name: str | None, follow: bool, lines: int) -> None:
    from alvis_fsm.engine.session import service

    cfg = settings()
    store = Store(cfg.state_dir)
    service.logs(
        cfg, store, session_of(store, name), reporter(verbosity), lines=lines, follow=follow
    )
