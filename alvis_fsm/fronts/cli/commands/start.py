"""alvis-fsm start: parse, call the service (engine/session/service.py), render.
The terminal's parts stay here: signals (``signals.drive``), the prompts
(resume an already live session? which SLURM account?), notifications,
the supervisor of a detached session, and the output."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from alvis_fsm.errors import AlvisError, Interrupted, UsageError
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import flag_settings, reporter
from alvis_fsm.fronts.ui import Reporter, Verbosity

if TYPE_CHECKING:
    from alvis_fsm.engine.session.service import AlreadyLive, Started, StartOptions
    from alvis_fsm.engine.session.store import SessionRecord
    from alvis_fsm.engine.settings.model import Settings


def run(
    verbosity: Verbosity,
    *,
    model: str | None,
    walltime: str | None,
    port: int | None,
    gpus: str | None,
    route: str | None,
    name: str | None,
    detach: bool,
    force_new: bool,
    list_models: bool,
    account: str | None = None,
    as_json: bool = False,
    yes: bool = False,
    ui: Reporter | None = None,
) -> None:
    if ui is None:
        ui = Reporter(verbosity, out=sys.stderr) if as_json else reporter(verbosity)
    if as_json and not detach and not list_models:
        raise UsageError(
            "--json goes with --detach: without it `start` streams logs until Ctrl+C",
            hint="alvis-fsm start --detach --json",
        )
    cfg = _settings(port=port, route=route, gpus=gpus, account=account)
    if list_models:
        from alvis_fsm.fronts.cli.commands import models

        models.run(verbosity, as_json=as_json, discover=False, add=None)
        return
    from alvis_fsm.engine.session import service

    options = service.StartOptions(
        model=model,
        time=walltime,
        gpus=gpus,
        account=account,
        name=name,
        detach=detach,
        force_new=force_new,
        short_ok=yes,
    )
    started = _start(cfg, options, ui, verbosity, may_ask=not as_json)
    if started is not None and detach:
        _say_detached(ui, started, as_json)


def _settings(
    *, port: int | None, route: str | None, gpus: str | None, account: str | None
) -> Settings:
    """The settings, with start's flags on top."""
    slurm_flags = {k: v for k, v in (("gpus", gpus), ("account", account)) if v}
    return flag_settings(
        {
            "tunnel": {k: v for k, v in (("local_port", port), ("route", route)) if v is not None},
            "slurm": slurm_flags,
        }
    )


def _start(
    cfg: Settings, options: StartOptions, ui: Reporter, verbosity: Verbosity, *, may_ask: bool
) -> Started | None:
    """Start the session through the service, in the terminal's way (signals,
    prompts, notifications; a detached one handed to its supervisor). None
    when a live session of the model was offered instead."""
    from alvis_fsm.engine.session import ownership, service
    from alvis_fsm.engine.session.store import Store
    from alvis_fsm.fronts import notify
    from alvis_fsm.fronts.common import supervisor_command

    ui.on_ready = lambda rec: notify.on_ready(cfg, rec)

    def failed(record: SessionRecord, exc: AlvisError) -> None:
        if not isinstance(exc, Interrupted):  # Ctrl+C is the user's own doing
            notify.on_failure(cfg, record.name, exc.message)

    # Spawned while start still holds the session's lock, so the supervisor
    # is the next to hold it; waited for once start has let go.
    handover = ownership.Handover(Store(cfg.state_dir), supervisor_command)
    try:
        started = service.start(
            cfg,
            options,
            ui,
            drive=signals.drive,
            shield=signals.shielded,
            choose=lambda found: _choose_account(ui, found),
            on_failure=failed,
            on_detached=handover.spawn,
        )
    except service.AlreadyLive as exc:
        _offer_resume(ui, exc, verbosity, may_ask=may_ask)
        return None
    handover.wait(ui)
    return started


def _say_detached(ui: Reporter, started: Started, as_json: bool) -> None:
    record = started.record
    if as_json:
        from alvis_fsm.fronts.cli.commands.status import row
        from alvis_fsm.fronts.output import emit_json

        emit_json(
            {
                "session": {
                    **row(record),
                    "api_key": record.api_key or None,
                    "account": started.account,
                }
            }
        )
    else:
        ui.result(
            f"Detached: job {record.job_id} keeps running at {record.url}.\n"
            f"  Reattach:  alvis-fsm resume {record.name}\n"
            f"  Stop:      alvis-fsm stop {record.name}"
        )


def _offer_resume(
    ui: Reporter, live: AlreadyLive, verbosity: Verbosity, may_ask: bool = True
) -> None:
    """A live session of the model exists: in a terminal, offer to resume it."""
    from alvis_fsm.fronts.gateway.slot.sessions import is_gateway_session

    record = live.record
    if is_gateway_session(record.name) and _use_the_gateway(ui, record):
        return
    if not may_ask or not ui.interactive():
        raise live
    answer = ui.ask(f"{live.message}. Resume it? [Y/n] ").strip().lower()
    if answer not in ("", "y", "yes"):
        raise UsageError(
            "Not starting a second session",
            hint=f"To start one anyway (a free name and port): {live.second}"
            if live.second
            else "Use --new with another --name and --port to start one anyway.",
        )
    from alvis_fsm.fronts.cli.commands import resume

    resume.run(verbosity, name=live.record.name, detach=False)


def _use_the_gateway(ui: Reporter, record: SessionRecord) -> bool:
    """The gateway serves the model: one live session per model, so `start`
    points at it rather than submitting a second job. False when no gateway
    runs (its session is an orphan: the usual offer applies)."""
    from alvis_fsm.engine.session.store import default_state_dir
    from alvis_fsm.fronts.gateway import instance

    found = instance.running(default_state_dir())
    if found is None:
        return False
    ui.result(
        f"{record.model} is already served by the gateway at {found.base_url} (session"
        f" '{record.name}', job"
        f' {record.job_id or "-"}): no second job started. Use it with model="{record.model}":'
        '\n  eval "$(alvis-fsm env --gateway)"'
    )
    return True


def _choose_account(ui: Reporter, found: list[str]) -> str:
    """Ask which of several SLURM accounts to charge, and whether to save it;
    "" when no answer picks one."""
    listing = "\n".join(f"  {i}. {name}" for i, name in enumerate(found, 1))
    prompt = (
        f"slurm.account is not set and you have {len(found)} SLURM accounts:\n{listing}\n"
        f"Charge which one? [1-{len(found)}] "
    )
    chosen = ""
    for _ in range(3):  # bounded: a closed stdin answers "" for ever
        answer = ui.ask(prompt).strip()
        if answer.isdigit() and 0 < int(answer) <= len(found):
            chosen = found[int(answer) - 1]
        elif answer in found:
            chosen = answer
        if chosen:
            break
        prompt = f"Type a number from 1 to {len(found)} (Ctrl+C to quit): "
    if not chosen:
        return ""
    from alvis_fsm.engine.settings.model import user_config_path
    from alvis_fsm.fronts.cli.commands.config import write_setting

    save = ui.ask(f"Save {chosen} as slurm.account in {user_config_path()}? [Y/n] ").strip().lower()
    if save in ("", "y", "yes"):
        ui.info(write_setting("slurm.account", chosen))
    return chosen
