"""What a new session is asked for, and what it becomes before any login:
the options a front passes (``StartOptions``), each checked and resolved
against the settings and the catalog (model entry, time, GPUs, session
name), and the job spec once the account and GPUs are known. No network,
no terminal: the service (engine/session/service.py) runs this first."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alvis_fsm.cluster import jobscript, syntax
from alvis_fsm.engine.session.store import SessionRecord, check_name
from alvis_fsm.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from alvis_fsm.engine.fit.catalog import ModelEntry
    from alvis_fsm.engine.settings.model import Settings


@dataclass(frozen=True)
class StartOptions:
    """A new session as a front asks for it. ``None`` means "the setting's
    value"; ``time``, ``gpus`` and ``account`` are kept as given, so that a
    refusal can say where each value came from. The flags that are settings
    (port, route, GPUs, account) are already in the Settings the service
    is given; these copies only name their origin."""

    model: str | None = None
    time: str | None = None
    gpus: str | None = None
    account: str | None = None
    name: str | None = None
    detach: bool = False
    force_new: bool = False
    # The retry of a context length vLLM refused: the length it said fits.
    fit_len: int | None = None
    # Start even when the job's time is shorter than the model's expected
    # load plus a margin (`start --yes`; the gateway plans its own rollover).
    short_ok: bool = False
    # The tunnel ends only in its unix socket in the private state directory
    # (every session has one), with no local port: for a front whose clients
    # never see the tunnel (the gateway), so no other process on the laptop
    # can reach the server.
    local_socket: bool = False


def name_for_model(model: str) -> str:
    """The default session name: the model's name, made safe for a file name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-._")[:41] or "session"
    return check_name(name)


def session_name(name: str) -> str:
    try:
        return check_name(name)
    except UsageError as exc:
        raise UsageError(
            f"-n/--name: {exc.message}", hint=f"{exc.hint} For example: -n gpt-test-2."
        ) from None


def catalog_entry(catalog: Any, name: str, from_flag: bool, settings: Settings) -> ModelEntry:
    """The catalog entry; an unknown default model is the setting's fault,
    so the error names the setting and where it was set, not -m."""
    try:
        return catalog.get(name)  # type: ignore[no-any-return]
    except UsageError as exc:
        if from_flag:
            raise UsageError(
                f"-m/--model: {exc.message}", hint=exc.hint, details=exc.details
            ) from None
        raise ConfigError(
            f"catalog.default_model {settings.origin_of('catalog.default_model')} names model"
            f" '{name}', which is not in the catalog. Available models:",
            hint="Pick one: alvis-fsm config set catalog.default_model NAME (or -m NAME).",
            details=exc.details,
        ) from None


def time_seconds(text: str, max_time: str, from_flag: bool, settings: Settings) -> int:
    """Seconds of the job's time limit; a bad value names -t or slurm.time."""
    try:
        return syntax.parse_walltime(text, max_time)
    except UsageError as exc:
        if from_flag:
            hint = exc.hint or ""
            if "For example" not in hint:
                hint += " For example: -t 2:00:00 (two hours)."
            raise UsageError(f"-t/--time: {exc.message}", hint=hint.strip()) from None
        # Settings validate slurm.time, so this is reached only if they change.
        raise ConfigError(
            f"slurm.time {settings.origin_of('slurm.time')}: {exc.message}",
            hint="alvis-fsm config set slurm.time 2:00:00 (or -t for one run).",
        ) from None


# Without an earlier start of the model: a guess at its load time. And the
# least time a session should have left to be of use once it serves.
LOAD_GUESS_S = 300.0
MARGIN_S = 300.0


def check_long_enough(
    seconds: int, text: str, model: str, expected: tuple[float, int] | None, from_flag: bool
) -> None:
    """Refuse a job time shorter than the model's expected load time plus a
    margin, with the numbers: `-t 1:30` is SLURM's MM:SS (90 s), rarely what
    was meant. ``expected``: (seconds, earlier starts) from loadtimes."""
    from alvis_fsm.cluster.durations import in_words
    from alvis_fsm.engine.fit.loadtimes import describe

    load = expected[0] if expected else LOAD_GUESS_S
    need = load + MARGIN_S
    if seconds >= need:
        return
    where = "-t/--time" if from_flag else "slurm.time"
    known = (
        describe(expected).replace("ready in", "it loads in")
        if expected
        else f"with no earlier start, allow ~{in_words(load)} to load"
    )
    mmss = re.fullmatch(r"([0-9]+):([0-9]{2})", text)
    meant = (
        f"Did you mean {text}:00 ({in_words(seconds * 60)})? SLURM reads {text} as"
        " minutes:seconds. "
        if mmss
        else ""
    )
    raise UsageError(
        f"{where}: {text} is {in_words(seconds)}, too short for {model}: {known}, and a"
        f" session needs {in_words(MARGIN_S)} more to be of use: at least {in_words(need)}",
        hint=f"{meant}Units say it plainly: -t 90m, -t 2h, -t 1h30m. To start it anyway, add --yes.",
    )


def job_spec(
    settings: Settings, record: SessionRecord, entry: ModelEntry, account: str, gpus: str, time: str
) -> jobscript.JobSpec:
    """The job to submit for ``record``, checked now (before anything is
    submitted) by rendering it once."""
    spec = jobscript.JobSpec(
        job_name=record.job_name,
        account=account,
        time=time,
        gpus=gpus,
        run_dir=record.run_dir,
        model_path=entry.path,
        max_model_len=entry.max_model_len,
        served_name=record.served_name,
        catalog_name=record.model,
        image=settings.remote.image,
        # The job's own watchdog is for when no client is watching (killed,
        # detached); it fires after the client's timeout, never before.
        ready_timeout=int(settings.timeouts.server_ready) + 60,
        partition=settings.slurm.partition,
        vllm_args=tuple(settings.vllm.extra_args) + tuple(entry.vllm_args),
        route=record.route,
        cache_dir=settings.remote.cache_dir,
        cache_max_kib=settings.remote.cache_max_kib,
        cache_max_files=settings.remote.cache_max_files,
    )
    jobscript.render(spec)
    return spec


def render_for(spec: jobscript.JobSpec, run_dir: str) -> str:
    """The job script for the run directory the agent made. The record's run
    dir may start with "~/": the job script expands it on the cluster, where
    the remote home is known."""
    return jobscript.render(dataclasses.replace(spec, run_dir=run_dir))


def refusal_hint(
    charged: str, options: StartOptions, settings: Settings, entry: ModelEntry, gpus: str, time: str
) -> str:
    """Which values sbatch was given and where each came from."""

    def setting(key: str) -> str:
        where = settings.origin_of(key)
        return f"{key}, the default" if "packaged defaults" in where else f"{key} {where}"

    account_from = (
        "--account"
        if options.account
        else setting("slurm.account")
        if settings.slurm.account
        else "your SLURM accounts, by sacctmgr"
    )
    gpus_from = (
        "--gpus" if options.gpus else "the catalog entry" if entry.gpus else setting("slurm.gpus")
    )
    time_from = "-t" if options.time else setting("slurm.time")
    return (
        f"sbatch was given: account {charged} (from {account_from}), GPUs {gpus} (from"
        f" {gpus_from}), time {time} (from {time_from}). `projinfo` on the login node lists"
        " your projects; `alvis-fsm config set KEY VALUE` changes a setting."
    )
