"""alvis-fsm resume: pick a session up where it is, after a killed client,
a closed laptop or a --detach."""

from __future__ import annotations

from alvis_fsm.engine.states import State
from alvis_fsm.engine.store import Store
from alvis_fsm.errors import AlvisError, Interrupted
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import pick_session, reporter, settings
from alvis_fsm.fronts.ui import Verbosity


def run(verbosity: Verbosity, *, name: str | None, detach: bool) -> None:
    ui = reporter(verbosity)
    cfg = settings()
    store = Store(cfg.state_dir)
    record = pick_session(store, name)
    from alvis_fsm.fronts.cli.commands import supervise

    if supervise.take_over(store, record):
        ui.info(f"Took session '{record.name}' over from its background supervisor")
    with store.lock(record.name):
        record = store.load(record.name)  # re-read under the lock
        if record.state == State.CLEANED:
            ui.result(
                f"Session '{record.name}' is finished ({record.outcome()}). "
                "Start a new one with `alvis-fsm start`."
            )
            return
        from alvis_fsm.engine.runner import Runner

        runner = Runner(cfg, record, store, ui, detach=detach, shield=signals.shielded)
        ui.info(f"Resuming session '{record.name}' (job {record.job_id or '-'}, {record.state})")
        if record.state == State.IDLE:
            # Stopped before anything was submitted: there is no job script to
            # submit from here (start renders it), so there is nothing to resume.
            runner.cleanup("never submitted")
            ui.result(
                f"Session '{record.name}' never submitted a job; "
                "start a new one with `alvis-fsm start`."
            )
            return
        runner.conn.open()
        if record.state == State.FAILED:
            runner.cleanup(record.end_reason or State.FAILED.value)
            return
        if not record.job_id:
            # Killed while sbatch ran: the job may exist; find it by its unique name.
            found = runner.agent.find(record.job_name) if record.job_name else None
            if not found:
                runner.cleanup("no job was submitted")
                ui.result(
                    f"Session '{record.name}' has no job on the cluster; "
                    "start a new one with `alvis-fsm start`."
                )
                return
            record.job_id = found
            store.save(record)
            ui.info(f"Found the session's job: {found}")
        if not runner.still_alive():
            return
        from alvis_fsm.fronts import notify

        ui.on_ready = lambda rec: notify.on_ready(cfg, rec)
        try:
            signals.drive(runner)
        except AlvisError as exc:
            if not isinstance(exc, Interrupted):
                notify.on_failure(cfg, record.name, exc.message)
            raise
    if detach and store.load(record.name).live:
        supervise.spawn(store, record)
        ui.result(f"Detached: {record.url} (alvis-fsm stop {record.name} to cancel)")
