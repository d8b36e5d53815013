"""alvis-fsm resume: pick a session up where it is, after a killed client,
a closed laptop or a --detach (engine/session/service.py ``resume``)."""

from __future__ import annotations

from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.errors import AlvisError, Interrupted
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import pick_session, reporter, settings
from alvis_fsm.fronts.ui import Verbosity


def run(verbosity: Verbosity, *, name: str | None, detach: bool) -> None:
    ui = reporter(verbosity)
    cfg = settings()
    store = Store(cfg.state_dir)
    record = pick_session(store, name, "resume")
    from alvis_fsm.engine.session import ownership, service
    from alvis_fsm.fronts import notify
    from alvis_fsm.fronts.common import supervisor_command

    if ownership.take_over(store, record):
        ui.info(f"Took session '{record.name}' over from its background supervisor")
    ui.on_ready = lambda rec: notify.on_ready(cfg, rec)

    def failed(rec: SessionRecord, exc: AlvisError) -> None:
        if not isinstance(exc, Interrupted):
            notify.on_failure(cfg, rec.name, exc.message)

    handover = ownership.Handover(store, supervisor_command)
    record = service.resume(
        cfg,
        store,
        record.name,
        ui,
        detach=detach,
        drive=signals.drive,
        shield=signals.shielded,
        on_failure=failed,
        on_detached=handover.spawn,
    )
    handover.wait(ui)
    if detach and store.load(record.name).live:
        ui.result(f"Detached: {record.url} (alvis-fsm stop {record.name} to cancel)")
