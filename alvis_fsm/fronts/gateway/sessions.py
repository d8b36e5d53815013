"""How the gateway makes a model's session: what `start` does inline
(catalog entry, record, job script), without a terminal and without
blocking the event loop (the account and an ``auto`` GPU choice, which ask
the cluster, are settled in the session's own thread, when the job script is
rendered). Until ``engine/service.py`` makes sessions for every front, this
one function is the gateway's only way to make one."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
import socket
from typing import TYPE_CHECKING

from alvis_fsm.engine.store import SessionRecord, Store
from alvis_fsm.errors import ConfigError

if TYPE_CHECKING:
    from alvis_fsm.engine.catalog import Catalog
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.runner import Runner
    from alvis_fsm.engine.settings import Settings


def session_name(model: str) -> str:
    """``gw-<model>``, safe for a file name: never the name `start` gives."""
    return "gw-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-._")[:38] or "model")


def free_port(bind: str = "127.0.0.1") -> int:
    """A local port for the session's tunnel, picked by the gateway (the
    gateway's clients never see it: they go through the gateway)."""
    with socket.socket() as s:
        s.bind((bind, 0))
        return int(s.getsockname()[1])


def new_session(
    cfg: Settings, catalog: Catalog, model: str, store: Store, ui: Observer
) -> Runner:
    from alvis_fsm.cluster import jobscript
    from alvis_fsm.engine.runner import Runner, new_api_key

    entry = catalog.get(model)
    name = session_name(model)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    token = secrets.token_hex(3)
    seconds = jobscript.parse_walltime(cfg.slurm.time, cfg.slurm.max_time)
    record = SessionRecord(
        name=name,
        model=model,
        local_port=free_port(cfg.tunnel.bind),
        run_dir=f"{cfg.remote.run_root.rstrip('/')}/{name}-{stamp}-{token}",
        started=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        job_name=f"alvis-fsm-{name}-{token}",
        served_name=jobscript.served_model_name(entry.path),
        route=cfg.tunnel.route,
        bind=cfg.tunnel.bind,
        login_host=cfg.ssh.host,
        time_limit=cfg.slurm.time,
        time_limit_s=seconds,
        gpus=entry.gpus or cfg.slurm.gpus,
    )
    if cfg.vllm.api_key:
        record.api_key = new_api_key()
    runner = Runner(cfg, record, store, ui, detach=False)

    def render(run_dir: str) -> str:
        # In the session's thread, with its connection open (drive opened it).
        account = cfg.slurm.account or _only_account(runner)
        gpus = record.gpus
        if gpus == "auto":
            from alvis_fsm.engine.autofit import resolve_gpus

            gpus = resolve_gpus(ui, runner.conn, runner.agent.gpus, cfg, entry.path,
                                entry.max_model_len, gpus, cfg.slurm.time)  # fmt: skip
            record.gpus = gpus
        spec = jobscript.JobSpec(
            job_name=record.job_name,
            account=account,
            time=cfg.slurm.time,
            gpus=gpus,
            run_dir=run_dir,
            model_path=entry.path,
            max_model_len=entry.max_model_len,
            served_name=record.served_name,
            image=cfg.remote.image,
            ready_timeout=int(cfg.timeouts.server_ready) + 60,
            partition=cfg.slurm.partition,
            vllm_args=tuple(cfg.vllm.extra_args) + tuple(entry.vllm_args),
            route=record.route,
            cache_dir=cfg.remote.cache_dir,
            cache_max_kib=cfg.remote.cache_max_kib,
            cache_max_files=cfg.remote.cache_max_files,
        )
        return jobscript.render(dataclasses.replace(spec, run_dir=run_dir))

    runner.render = render
    runner.sbatch_args = list(cfg.slurm.extra_args)
    return runner


def _only_account(runner: Runner) -> str:
    """slurm.account unset: the user's only SLURM account (the gateway cannot
    ask which of several to charge)."""
    from alvis_fsm.cluster.agent import accounts

    found = accounts(runner.agent)
    if len(found) == 1:
        return found[0]
    raise ConfigError(
        "slurm.account is not set and the cluster lists "
        + (f"{len(found)} SLURM accounts for you" if found else "no SLURM account for you"),
        hint="alvis-fsm config set slurm.account NAME (the gateway cannot ask which to charge).",
    )
