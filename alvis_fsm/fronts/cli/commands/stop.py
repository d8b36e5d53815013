"""alvis-fsm stop (alias cancel): scancel, close the tunnel, state cleaned.
Idempotent."""

from __future__ import annotations

import os
import signal

from alvis_fsm.engine.store import Store
from alvis_fsm.errors import SessionError
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import pick_session, reporter, settings
from alvis_fsm.fronts.ui import Reporter, Verbosity

# How long a foreground client gets to cancel its job and exit after SIGTERM
# (its scancel goes through the cluster; give it the cancel timeout and more).
CLIENT_GRACE_S = 90.0


def run(verbosity: Verbosity, *, name: str | None, ui: Reporter | None = None) -> None:
    ui = ui or reporter(verbosity)
    cfg = settings()
    store = Store(cfg.state_dir)
    from alvis_fsm.engine.service import NoLiveSession

    try:
        record = pick_session(store, name, "stop")
    except NoLiveSession as exc:
        # Nothing live: nothing to stop (finished sessions are history).
        ui.result(f"Nothing to stop: {exc.message[0].lower()}{exc.message[1:]}.")
        return
    from alvis_fsm.fronts.cli.commands import supervise

    # A detached session's supervisor lets go; the cancel is ours to confirm.
    supervise.take_over(store, record)
    holder = store.holder(record.name)
    if holder:
        _stop_client(ui, store, record.name, holder if holder > 0 else record.client_pid)
    from alvis_fsm.engine import service

    ended = service.stop(cfg, store, record.name, ui, shield=signals.shielded)
    if ended is not None:
        ui.result(f"Session '{ended.name}' is already stopped ({ended.outcome()}).")


def _stop_client(ui: Reporter, store: Store, name: str, pid: int) -> None:
    """A foreground client drives the session: ask it to clean up, as Ctrl+C
    would (SIGTERM), and wait until it has let go of the session."""
    if pid <= 0 or pid == os.getpid():
        raise SessionError(
            f"Session '{name}' is being driven by another alvis-fsm, which did not say its pid",
            hint="Stop it in its terminal (Ctrl+C), then run `alvis-fsm stop` again.",
        )
    ui.info(f"Asking the client (pid {pid}) to stop session '{name}'...")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise SessionError(
            f"Session '{name}' is driven by pid {pid}, which this user cannot signal",
        ) from exc
    if not store.wait_unlocked(name, CLIENT_GRACE_S, poll=0.2):
        raise SessionError(
            f"The client (pid {pid}) of session '{name}' did not stop within "
            f"{CLIENT_GRACE_S:.0f} s",
            hint=f"Check that process (ps -p {pid}); `alvis-fsm stop {name}` again once it is gone.",
        )
