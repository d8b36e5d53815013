"""alvis-fsm start: preflight, then drive a new session through the machine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from typing import Any

from alvis_fsm.commands._common import name_for_model, reporter, settings
from alvis_fsm.errors import SessionError, UsageError
from alvis_fsm.store import SessionRecord, Store, check_name
from alvis_fsm.ui import Reporter, Verbosity


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
) -> None:
    ui = reporter(verbosity)
    cfg = settings(
        {
            "tunnel": {k: v for k, v in (("local_port", port), ("route", route)) if v is not None},
            "slurm": {"gpus": gpus} if gpus else {},
        }
    )
    if list_models:
        from alvis_fsm.commands import models

        models.run(verbosity, as_json=False, discover=False, add=None)
        return
    from alvis_fsm.catalog import load_catalog

    catalog = load_catalog(cfg)

    # -- local preflight: everything that needs no network, first -----------
    from alvis_fsm import jobscript
    from alvis_fsm.tunnel import local_port_free, port_busy_hint

    model_name = model or cfg.catalog.default_model
    entry = catalog.get(model_name)
    time_text = walltime or cfg.slurm.time
    seconds = jobscript.parse_walltime(time_text, cfg.slurm.max_time)
    gpu_spec = gpus or entry.gpus or cfg.slurm.gpus
    session_name = check_name(name) if name else name_for_model(model_name)
    local_port = cfg.tunnel.local_port
    store = Store(cfg.state_dir)
    store.ensure()

    records, _ = store.all()
    if not force_new:
        same = [r for r in records if r.live and (r.model == model_name or r.name == session_name)]
        if same:
            _offer_resume(ui, same[0], verbosity)
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
        from alvis_fsm.session import new_api_key

        record.api_key = new_api_key()

    with store.lock(session_name):
        from alvis_fsm.session import Runner

        runner = Runner(cfg, record, store, ui, detach=detach)
        ui.info(f"Checking SSH connection to {cfg.ssh.host}...")
        runner.conn.open()
        ui.info("SSH connection successful")
        ui.info(f"Loading model configuration for: {model_name}")
        ui.info(f"Model path: {entry.path}")
        from alvis_fsm.autofit import resolve_gpus

        gpu_spec = resolve_gpus(
            ui, runner.conn, runner.agent.gpus, cfg, entry.path, entry.max_model_len, gpu_spec,
            time_text,
        )  # fmt: skip
        _report_free_gpus(ui, runner, gpu_spec)
        spec = jobscript.JobSpec(
            job_name=job_name,
            account=cfg.slurm.account,
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
        runner.drive()
    if detach:
        from alvis_fsm.commands import supervise

        supervise.spawn(store, record)
        ui.result(
            f"Detached: job {record.job_id} keeps running at {record.url}.\n"
            f"  Reattach:  alvis-fsm resume {record.name}\n"
            f"  Stop:      alvis-fsm stop {record.name}"
        )


def _offer_resume(ui: Reporter, record: SessionRecord, verbosity: Verbosity) -> None:
    what = f"Session '{record.name}' ({record.model}, job {record.job_id or '?'}, {record.state}) is already live"
    if not ui.interactive():
        raise SessionError(
            what,
            hint=f"`alvis-fsm resume {record.name}` reattaches; `--new` starts another session "
            f"(with another --name and --port); `alvis-fsm stop {record.name}` cancels it.",
        )
    answer = ui.ask(f"{what}. Resume it? [Y/n] ").strip().lower()
    if answer not in ("", "y", "yes"):
        raise UsageError("Not starting a second session", hint="Use --new to start one anyway.")
    from alvis_fsm.commands import resume

    resume.run(verbosity, name=record.name, detach=False)


def _report_free_gpus(ui: Reporter, runner: Any, gpu_spec: str) -> None:
    """Free GPUs of the requested type right now: tells the user whether to
    expect a wait in the queue. Informational: a failure here stops nothing."""
    from alvis_fsm import slurm
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
