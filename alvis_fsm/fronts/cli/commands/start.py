"""alvis-fsm start: preflight, then drive a new session through the machine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import sys
from typing import Any

from alvis_fsm.engine.store import SessionRecord, Store, check_name
from alvis_fsm.errors import (
    AlvisError,
    ConfigError,
    Interrupted,
    SchedulerError,
    ServerError,
    SessionError,
    UsageError,
)
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import flag_settings, name_for_model, reporter
from alvis_fsm.fronts.ui import Reporter, Verbosity


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
    ui: Reporter | None = None,
    fit_len: int | None = None,
) -> None:
    # ``ui``: the Python API passes a reporter that writes to a logger.
    if ui is None:
        ui = Reporter(verbosity, out=sys.stderr) if as_json else reporter(verbosity)
    if as_json and not detach and not list_models:
        raise UsageError(
            "--json goes with --detach: without it `start` streams logs until Ctrl+C",
            hint="alvis-fsm start --detach --json",
        )
    slurm_flags = {k: v for k, v in (("gpus", gpus), ("account", account)) if v}
    cfg = flag_settings(
        {
            "tunnel": {k: v for k, v in (("local_port", port), ("route", route)) if v is not None},
            "slurm": slurm_flags,
        }
    )
    if list_models:
        from alvis_fsm.fronts.cli.commands import models

        models.run(verbosity, as_json=as_json, discover=False, add=None)
        return
    from alvis_fsm.engine.catalog import load_catalog

    catalog = load_catalog(cfg)

    # -- local preflight: everything that needs no network, first -----------
    from alvis_fsm.cluster import jobscript
    from alvis_fsm.cluster.tunnel import local_port_free, port_busy_hint

    model_name = model or cfg.catalog.default_model
    entry = _catalog_entry(catalog, model_name, from_flag=bool(model))
    if fit_len is not None:
        # The retry of a context vLLM refused (see _retry_with_fitting_length).
        entry = entry.model_copy(update={"max_model_len": fit_len})
    time_text = walltime or cfg.slurm.time
    seconds = _walltime(time_text, cfg.slurm.max_time, from_flag=bool(walltime))
    gpu_spec = gpus or entry.gpus or cfg.slurm.gpus
    session_name = _session_name(name) if name else name_for_model(model_name)
    local_port = cfg.tunnel.local_port
    store = Store(cfg.state_dir)
    store.ensure()

    records, _ = store.all()
    if not force_new:
        same = [r for r in records if r.live and (r.model == model_name or r.name == session_name)]
        if same:
            _offer_resume(ui, same[0], verbosity, may_ask=not as_json)
            return
    for r in records:
        if r.live and r.name == session_name:
            raise SessionError(
                f"Session '{session_name}' is live (job {r.job_id}); choose another --name",
                hint=f"`alvis-fsm resume {r.name}` or `alvis-fsm stop {r.name}`.",
            )
        if r.live and r.local_port == local_port:
            raise SessionError(
                f"Local port {local_port} is claimed by session '{r.name}' (job {r.job_id})",
                hint=f"Pick another port with --port (e.g. --port {local_port + 1}), "
                f"or `alvis-fsm stop {r.name}`.",
            )
    if not local_port_free(local_port, cfg.tunnel.bind):
        raise SessionError(
            f"Local port {local_port} is already in use", hint=port_busy_hint(local_port)
        )

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    token = secrets.token_hex(3)
    job_name = f"alvis-fsm-{session_name}-{token}"
    record = SessionRecord(
        name=session_name,
        model=model_name,
        local_port=local_port,
        run_dir=f"{cfg.remote.run_root.rstrip('/')}/{session_name}-{stamp}-{token}",
        started=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        job_name=job_name,
        served_name=jobscript.served_model_name(entry.path),
        route=cfg.tunnel.route,
        bind=cfg.tunnel.bind,
        login_host=cfg.ssh.host,
        time_limit=time_text,
        time_limit_s=seconds,
    )
    if cfg.vllm.api_key:
        from alvis_fsm.engine.runner import new_api_key

        record.api_key = new_api_key()

    with store.lock(session_name):
        from alvis_fsm.engine.runner import Runner

        runner = Runner(cfg, record, store, ui, detach=detach, shield=signals.shielded)
        ui.info(f"Checking SSH connection to {cfg.ssh.host}...")
        runner.conn.open()
        ui.info("SSH connection successful")
        try:
            charged = _account(ui, runner, cfg.slurm.account)
        except BaseException:
            runner.conn.close()  # nothing submitted: leave no ssh behind
            raise
        ui.info(f"Charging {charged}")
        ui.info(f"Loading model configuration for: {model_name}")
        ui.info(f"Model path: {entry.path}")
        from alvis_fsm.engine.autofit import resolve_gpus

        gpu_spec = resolve_gpus(
            ui, runner.conn, runner.agent.gpus, cfg, entry.path, entry.max_model_len, gpu_spec,
            time_text,
        )  # fmt: skip
        _report_free_gpus(ui, runner, gpu_spec)
        record.gpus = gpu_spec
        spec = jobscript.JobSpec(
            job_name=job_name,
            account=charged,
            time=time_text,
            gpus=gpu_spec,
            run_dir=record.run_dir,
            model_path=entry.path,
            max_model_len=entry.max_model_len,
            served_name=record.served_name,
            image=cfg.remote.image,
            # The job's own watchdog is for when no client is watching (killed,
            # detached); it fires after the client's timeout, never before.
            ready_timeout=int(cfg.timeouts.server_ready) + 60,
            partition=cfg.slurm.partition,
            vllm_args=tuple(cfg.vllm.extra_args) + tuple(entry.vllm_args),
            route=record.route,
            cache_dir=cfg.remote.cache_dir,
            cache_max_kib=cfg.remote.cache_max_kib,
            cache_max_files=cfg.remote.cache_max_files,
        )
        # The record's run dir may start with "~/": the job script expands it
        # on the cluster, where the remote home is known.
        runner.render = lambda run_dir: jobscript.render(dataclasses.replace(spec, run_dir=run_dir))
        runner.sbatch_args = list(cfg.slurm.extra_args)
        from alvis_fsm.fronts import notify

        ui.on_ready = lambda rec: notify.on_ready(cfg, rec)
        fits: int | None = None
        refusal = ""
        try:
            signals.drive(runner)
        except AlvisError as exc:
            fits = _fitting_length(cfg, exc, entry.max_model_len, fit_len)
            refusal = exc.details or ""
            if fits is None:
                if not isinstance(exc, Interrupted):  # Ctrl+C is the user's own doing
                    notify.on_failure(cfg, record.name, exc.message)
                if isinstance(exc, SchedulerError) and exc.message == "sbatch refused the job":
                    # Say which values sbatch was given and where each came from.
                    exc.hint = _refusal_hint(charged, account, cfg.slurm.account, gpu_spec, gpus,
                                             entry.gpus, time_text, walltime)  # fmt: skip
                raise
    if fits is not None:
        # The job is cleaned up; one more start, with the length vLLM says fits.
        said = next((line for line in refusal.splitlines() if "estimated maximum" in line), "")
        if said:
            ui.warn(f"vLLM: {said.strip()}")
        ui.warn(
            f"vLLM refused max_model_len {entry.max_model_len} for {model_name}: the KV cache "
            f"on {gpu_spec} holds {fits} tokens. Starting once more with max_model_len {fits} "
            f'(vllm.auto_fit). To skip this next time, set "max_model_len": {fits} for '
            f"{model_name} in your catalog (`alvis-fsm models --add`)."
        )
        run(
            verbosity, model=model_name, walltime=walltime, port=port, gpus=gpus, route=route,
            name=name, detach=detach, force_new=force_new, list_models=False, account=account,
            as_json=as_json, ui=ui, fit_len=fits,
        )  # fmt: skip
        return
    if detach:
        from alvis_fsm.fronts.cli.commands import supervise

        supervise.spawn(store, record)
    if detach and as_json:
        from alvis_fsm.fronts.cli.commands.status import row
        from alvis_fsm.fronts.output import emit_json

        emit_json({"session": {**row(record), "api_key": record.api_key or None,
                               "account": charged}})  # fmt: skip
    elif detach:
        ui.result(
            f"Detached: job {record.job_id} keeps running at {record.url}.\n"
            f"  Reattach:  alvis-fsm resume {record.name}\n"
            f"  Stop:      alvis-fsm stop {record.name}"
        )


def _fitting_length(cfg: Any, exc: AlvisError, asked: int, retried: int | None) -> int | None:
    """The context length vLLM said would fit, when it refused ``asked`` for
    the KV cache (once per start, and only with ``vllm.auto_fit``)."""
    if not cfg.vllm.auto_fit or retried is not None or not isinstance(exc, ServerError):
        return None
    from alvis_fsm.engine.fit import parse_kv_refusal

    fits = parse_kv_refusal(f"{exc.message}\n{exc.details or ''}")
    return fits if fits is not None and 0 < fits < asked else None


def _offer_resume(ui: Reporter, record: SessionRecord, verbosity: Verbosity,
                  may_ask: bool = True) -> None:  # fmt: skip
    what = f"Session '{record.name}' ({record.model}, job {record.job_id or '?'}, {record.state}) is already live"
    if not may_ask or not ui.interactive():
        raise SessionError(
            what,
            hint=f"`alvis-fsm resume {record.name}` reattaches; `--new` starts another session "
            f"(with another --name and --port); `alvis-fsm stop {record.name}` cancels it.",
        )
    answer = ui.ask(f"{what}. Resume it? [Y/n] ").strip().lower()
    if answer not in ("", "y", "yes"):
        raise UsageError("Not starting a second session", hint="Use --new to start one anyway.")
    from alvis_fsm.fronts.cli.commands import resume

    resume.run(verbosity, name=record.name, detach=False)


def _report_free_gpus(ui: Reporter, runner: Any, gpu_spec: str) -> None:
    """Free GPUs of the requested type right now: tells the user whether to
    expect a wait in the queue. Informational: a failure here stops nothing."""
    from alvis_fsm.cluster import slurm
    from alvis_fsm.errors import AlvisError

    gpu_type = gpu_spec.split(":")[0] if ":" in gpu_spec else ""
    label = f"{gpu_type} GPUs" if gpu_type else "GPUs"
    try:
        free, total, nodes = slurm.free_gpus(runner.agent.gpus(), gpu_type)
    except AlvisError:
        return
    if total == 0:
        ui.warn(f"The cluster reports no {label}; sbatch will probably refuse --gpus-per-node={gpu_spec}")
    elif free == 0:
        ui.info(f"No {label} free right now ({total} in all): expect to wait in the queue")
    else:
        ui.info(f"{label} free right now: {free} of {total} (on {nodes} node{'s' if nodes != 1 else ''})")


def _catalog_entry(catalog: Any, name: str, from_flag: bool) -> Any:
    """The catalog entry; an unknown default model is the setting's fault,
    so the error names the setting and where it was set, not -m."""
    try:
        return catalog.get(name)
    except UsageError as exc:
        if from_flag:
            raise UsageError(f"-m/--model: {exc.message}", hint=exc.hint, details=exc.details) from None
        from alvis_fsm.engine.settings import origin_of

        raise ConfigError(
            f"catalog.default_model {origin_of('catalog.default_model')} names model"
            f" '{name}', which is not in the catalog. Available models:",
            hint="Pick one: alvis-fsm config set catalog.default_model NAME (or -m NAME).",
            details=exc.details,
        ) from None


def _session_name(name: str) -> str:
    try:
        return check_name(name)
    except UsageError as exc:
        raise UsageError(f"-n/--name: {exc.message}", hint=f"{exc.hint} For example: -n gpt-test-2.") from None


def _walltime(text: str, max_time: str, from_flag: bool) -> int:
    from alvis_fsm.cluster import syntax

    try:
        return syntax.parse_walltime(text, max_time)
    except UsageError as exc:
        if from_flag:
            hint = exc.hint or ""
            if "For example" not in hint:
                hint += " For example: -t 2:00:00 (two hours)."
            raise UsageError(f"-t/--time: {exc.message}", hint=hint.strip()) from None
        # Settings validate slurm.time, so this is reached only if they change.
        from alvis_fsm.engine.settings import origin_of

        raise ConfigError(
            f"slurm.time {origin_of('slurm.time')}: {exc.message}",
            hint="alvis-fsm config set slurm.time 2:00:00 (or -t for one run).",
        ) from None


def _account(ui: Reporter, runner: Any, configured: str) -> str:
    """The account to charge: slurm.account if set; else the user's only
    SLURM account; else, of several, the one the user picks (in a terminal)."""
    if configured:
        return configured
    from alvis_fsm.cluster.agent import accounts

    found = accounts(runner.agent)
    how = "alvis-fsm config set slurm.account NAME (or start --account NAME for one run)"
    if not found:
        raise ConfigError(
            "slurm.account is not set and the cluster lists no SLURM account for you",
            hint=f"Set the project to charge: {how.replace('NAME', 'NAISS2025-XX-YYYY')};"
            " `projinfo` on the login node lists your projects.",
        )
    if len(found) == 1:
        ui.info(
            f"slurm.account is not set: using your only SLURM account, {found[0]}"
            f" (to make it permanent: alvis-fsm config set slurm.account {found[0]})"
        )
        return found[0]
    listing = "\n".join(f"  {i}. {name}" for i, name in enumerate(found, 1))
    if not ui.interactive():
        raise UsageError(
            f"slurm.account is not set and you have {len(found)} SLURM accounts;"
            " choose the one to charge:",
            hint=how.replace("NAME", found[0]),
            details="\n".join(found),
        )
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
        raise UsageError(
            "No SLURM account chosen", hint=how.replace("NAME", found[0]), details="\n".join(found)
        )
    from alvis_fsm.fronts.cli.commands.config import write_setting

    target = _user_file()
    save = ui.ask(f"Save {chosen} as slurm.account in {target}? [Y/n] ").strip().lower()
    if save in ("", "y", "yes"):
        ui.info(write_setting("slurm.account", chosen))
    return chosen


def _user_file() -> str:
    from alvis_fsm.engine.settings import user_config_path

    return str(user_config_path())


def _refusal_hint(charged: str, account_flag: str | None, account_setting: str, gpu_spec: str,
                  gpus_flag: str | None, entry_gpus: str | None, time_text: str,
                  time_flag: str | None) -> str:  # fmt: skip
    from alvis_fsm.engine.settings import origin_of

    def setting(key: str) -> str:
        where = origin_of(key)
        return f"{key}, the default" if "packaged defaults" in where else f"{key} {where}"

    account_from = ("--account" if account_flag else setting("slurm.account") if account_setting
                    else "your SLURM accounts, by sacctmgr")  # fmt: skip
    gpus_from = "--gpus" if gpus_flag else "the catalog entry" if entry_gpus else setting("slurm.gpus")
    time_from = "-t" if time_flag else setting("slurm.time")
    return (
        f"sbatch was given: account {charged} (from {account_from}), GPUs {gpu_spec} (from"
        f" {gpus_from}), time {time_text} (from {time_from}). `projinfo` on the login node lists"
        " your projects; `alvis-fsm config set KEY VALUE` changes a setting."
    )
