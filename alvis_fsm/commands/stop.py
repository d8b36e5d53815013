"""alvis-fsm stop (alias cancel): scancel, close the tunnel, state cleaned.
Idempotent."""

from __future__ import annotations

import os
import signal
import time

from alvis_fsm.commands._common import pick_session, reporter, settings
from alvis_fsm.store import Store
from alvis_fsm.ui import Verbosity


def run(verbosity: Verbosity, *, name: str | None) -> None:
    ui = reporter(verbosity)
    cfg = settings()
    store = Store(cfg.state_dir)
    record = pick_session(store, name)
    if store.locked(record.name) and record.client_pid:
        # A foreground client drives it: ask it to clean up, as Ctrl+C would.
        ui.info(f"Asking the client (pid {record.client_pid}) to stop session '{record.name}'...")
        try:
            os.kill(record.client_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for _ in range(240):
            if not store.locked(record.name):
                break
            time.sleep(0.25)
    with store.lock(record.name):
        record = store.load(record.name)
        if record.state == "cleaned":
            ui.result(
                f"Session '{record.name}' is already stopped (job {record.job_id or '-'}"
                + (f": {record.end_reason}" if record.end_reason else "")
                + ")."
            )
            return
        from alvis_fsm.session import Runner

        runner = Runner(cfg, record, store, ui)
        runner.stop()
