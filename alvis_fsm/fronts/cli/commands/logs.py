"""alvis-fsm logs: the session's vLLM logs, from the shared run directory."""

from __future__ import annotations

from alvis_fsm.engine.store import Store
from alvis_fsm.fronts.cli.commands._common import reporter, settings
from alvis_fsm.fronts.ui import Verbosity


def run(verbosity: Verbosity, *, name: str | None, follow: bool, lines: int) -> None:
    from alvis_fsm.engine import service

    cfg = settings()
    service.logs(cfg, Store(cfg.state_dir), name, reporter(verbosity), lines=lines, follow=follow)
