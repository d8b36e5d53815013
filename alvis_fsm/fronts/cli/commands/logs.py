"""alvis-fsm logs: the session's vLLM logs, from the shared run directory."""

from __future__ import annotations

from alvis_fsm.engine.store import Store
from alvis_fsm.fronts.cli.commands._common import pick_session, reporter, settings
from alvis_fsm.fronts.ui import Verbosity


def run(verbosity: Verbosity, *, name: str | None, follow: bool, lines: int) -> None:
    ui = reporter(verbosity)
    cfg = settings()
    store = Store(cfg.state_dir)
    record = pick_session(store, name)
    from alvis_fsm.engine.runner import Runner

    runner = Runner(cfg, record, store, ui, readonly=True)
    runner.show_logs(lines, follow)
