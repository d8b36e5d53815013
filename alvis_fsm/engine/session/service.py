"""The session service: what every front calls (the CLI's commands, the
Python API, the gateway). Create a session from a model and options, drive
it, stop it, ask its status, read its logs.

No terminal here: events go to the observer passed in (engine/observer.py),
prompts through a callback the front passes (``choose_account``) or the
observer's ``ask``; no signals (a terminal front passes its own ``drive``
and ``shield``, fronts/signals.py), no module-level state. Each call works
on its own objects, so threads may call it concurrently for different
sessions; one session is guarded by its lock in the store (a second
driver is refused)."""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alvis_fsm.engine.session import spec as session_spec
from alvis_fsm.engine.session.spec import StartOptions
from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord, Store, check_name
from alvis_fsm.errors import (
    AlvisError,
    ConfigError,
    JobRefused,
    LocalPortBusy,
    SchedulerError,
    ServerError,
    SessionError,
    UsageError,
)

if TYPE_CHECKING:
    from alvis_fsm.cluster import jobscript
    from alvis_fsm.engine.fit.catalog import ModelEntry
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.session.link import Shield
    from alvis_fsm.engine.session.runner import Runner
    from alvis_fsm.engine.settings.model import Settings

__all__ = (
    "AlreadyLive",
    "NewSession",
    "NoLiveSession",
    "StartOptions",
    "Started",
    "Status",
    "check",
    "choose_account",
    "create",
    "logs",
    "needs_check",
    "pick_session",
    "resume",
    "start",
    "stop",
)

# Picks one of several SLURM accounts (a front's prompt); "" for none.
Chooser = Callable[[list[str]], str]


class AlreadyLive(SessionError):
    """A live session of the model (or of the name) exists; ``record`` is it.
    A terminal front may offer to resume it; the message says what to do.
    ``second`` is the command that starts a second session anyway (a free
    name and port picked), when known."""

    def __init__(self, record: SessionRecord, second: str = "") -> None:
        another = (
            f"`{second}` starts a second one"
            if second
            else "`--new` starts another session (with another --name and --port)"
        )
        super().__init__(
            f"Session '{record.name}' ({record.model}, job {record.job_id or '?'}, "
            f"{record.state}) is already live",
            hint=f"`alvis-fsm resume {record.name}` reattaches; {another}; "
            f"`alvis-fsm stop {record.name}` cancels it.",
        )
        self.record = record
        self.second = second


def second_session(
    store: Store, records: list[SessionRecord], model: str, name: str, port: int, bind: str
) -> str:
    """The `start` command line for a second session of ``model`` that works:
    a name no session has (NAME-2, NAME-3, ...) and a local port that is free
    and no live session's (``port`` + 1, ...); ``port`` 0: a unix socket."""
    from alvis_fsm.cluster.tunnel import local_port_free

    taken = {r.name for r in records}
    base = name[:38].rstrip("-._")
    free_name = next(f"{base}-{n}" for n in range(2, 1000) if f"{base}-{n}" not in taken)
    flags = f" --new -n {free_name}"
    if port:
        claimed = {r.local_port for r in records if r.live}
        free_port = next(
            (
                p
                for p in range(port + 1, min(port + 200, 65536))
                if p not in claimed and local_port_free(p, bind)
            ),
            0,
        )
        if free_port:
            flags += f" --port {free_port}"
    return f"alvis-fsm start -m {model}{flags}"


@dataclass
class NewSession:
    """A session checked locally and not yet submitted: its record, the
    catalog entry, and (after ``prepare``) the job spec."""

    settings: Settings
    store: Store
    options: StartOptions
    record: SessionRecord
    entry: ModelEntry
    time: str
    gpus: str  # as asked: TYPE:N, N or auto until prepare resolves it
    account: str = ""
    spec: jobscript.JobSpec | None = field(default=None, repr=False)

    def lock(self) -> AbstractContextManager[None]:
        """The session's lock: hold it from ``prepare`` to the end of driving."""
        return self.store.lock(self.record.name)

    def job_script(self, run_dir: str) -> str:
        if self.spec is None:
            raise SessionError(f"Session '{self.record.name}' was not prepared: no job to submit")
        return session_spec.render_for(self.spec, run_dir)

    def prepare(
        self,
        ui: Observer,
        *,
        detach: bool = False,
        shield: Shield | None = None,
        choose: Chooser | None = None,
        **handles: Any,
    ) -> Runner:
        """Log in, choose the account, resolve the GPUs and build the job:
        a Runner ready to drive (call with the lock held). ``handles``
        (``conn``, ``agent``, ``tunnel_factory``, ``verifier``) replace
        the cluster side, as in unit tests."""
        from alvis_fsm.engine.session.runner import Runner

        cfg = self.settings
        runner = Runner(
            cfg,
            self.record,
            self.store,
            ui,
            detach=detach,
            shield=shield or contextlib.nullcontext,
            job_script=self.job_script,
            sbatch_args=list(cfg.slurm.extra_args),
            **handles,
        )
        ui.info(f"Checking SSH connection to {cfg.ssh.host}...")
        runner.conn.open()
        ui.info("SSH connection successful")
        try:
            self.account = choose_account(ui, runner.agent, cfg.slurm.account, choose)
            ui.info(f"Charging {self.account}")
            ui.info(f"Loading model configuration for: {self.record.model}")
            ui.info(f"Model path: {self.entry.path}")
            self._resolve_gpus(ui, runner)
            self.spec = session_spec.job_spec(
                cfg, self.record, self.entry, self.account, self.gpus, self.time
            )
        except BaseException:
            runner.conn.close()  # nothing submitted: leave no ssh behind
            raise
        return runner

    def _resolve_gpus(self, ui: Observer, runner: Runner) -> None:
        """``--gpus`` made concrete (``auto`` chosen from what is free)."""
        from alvis_fsm.engine.fit.autofit import resolve_gpus

        cfg = self.settings
        # One sinfo round trip serves the choice and the "free right now" line.
        sinfo_lines: list[list[str]] = []

        def sinfo() -> list[str]:
            if not sinfo_lines:
                sinfo_lines.append(runner.agent.gpus())
            return sinfo_lines[0]

        self.gpus = resolve_gpus(
            ui,
            runner.conn,
            sinfo,
            cfg,
            self.entry.path,
            self.entry.max_model_len,
            self.gpus,
            self.time,
            fallback=_auto_fallback(
                cfg, self.gpus, from_user=bool(self.options.gpus or self.entry.gpus)
            ),
        )
        _report_free_gpus(ui, sinfo, self.gpus)
        self.record.gpus = self.gpus

    def explain(self, exc: AlvisError) -> None:
        """Say in ``exc`` which values sbatch was given, when it refused the job."""
        if isinstance(exc, JobRefused):
            exc.hint = session_spec.refusal_hint(
                self.account, self.options, self.settings, self.entry, self.gpus, self.time
            )

    def fitting_length(self, exc: AlvisError) -> int | None:
        """The context length vLLM said would fit, when it refused this one
        for the KV cache (once per start, and only with ``vllm.auto_fit``)."""
        asked = self.entry.max_model_len
        if (
            not self.settings.vllm.auto_fit
            or self.options.fit_len is not None
            or not isinstance(exc, ServerError)
        ):
            return None
        from alvis_fsm.engine.fit.sizing import parse_kv_refusal

        fits = parse_kv_refusal(f"{exc.message}\n{exc.details or ''}")
        return fits if fits is not None and 0 < fits < asked else None


@dataclass(frozen=True)
class _Spec:
    """What ``create`` read from the settings and options, before any check."""

    model: str
    entry: ModelEntry
    time_text: str
    seconds: int
    gpus: str
    name: str
    local_port: int


def create(settings: Settings, options: StartOptions, *, store: Store | None = None) -> NewSession:
    """A new session, checked with no network: the model's catalog entry,
    time, GPUs, name, the local port (free, and no other live session's),
    the record and its API key. Raises ``AlreadyLive`` when a live session
    of the model (or name) exists and ``options.force_new`` is not set."""
    cfg = settings
    spec = _spec(cfg, options)
    store = store or Store(cfg.state_dir)
    if not options.short_ok:
        from alvis_fsm.engine.fit.loadtimes import LoadTimes

        session_spec.check_long_enough(
            spec.seconds,
            spec.time_text,
            spec.model,
            LoadTimes(store.dir).longest(spec.model),
            from_flag=bool(options.time),
        )
    store.ensure()
    store.prune(cfg.session.keep_days)
    _check_no_clash(cfg, options, store, spec)
    _check_run_root(cfg)
    record = _new_record(cfg, options, store, spec)
    return NewSession(cfg, store, options, record, spec.entry, spec.time_text, spec.gpus)


def _spec(cfg: Settings, options: StartOptions) -> _Spec:
    """The model's catalog entry, the time, GPUs, name and local port."""
    from alvis_fsm.engine.fit.catalog import load_catalog

    model_name = options.model or cfg.catalog.default_model
    entry = session_spec.catalog_entry(
        load_catalog(cfg), model_name, from_flag=bool(options.model), settings=cfg
    )
    if options.fit_len is not None:
        entry = entry.model_copy(update={"max_model_len": options.fit_len})
    time_text = options.time or cfg.slurm.time
    seconds = session_spec.time_seconds(
        time_text, cfg.slurm.max_time, from_flag=bool(options.time), settings=cfg
    )
    name = (
        session_spec.session_name(options.name)
        if options.name
        else session_spec.name_for_model(model_name)
    )
    return _Spec(
        model=model_name,
        entry=entry,
        time_text=time_text,
        seconds=seconds,
        gpus=options.gpus or entry.gpus or cfg.slurm.gpus,
        name=name,
        local_port=0 if options.local_socket else cfg.tunnel.local_port,
    )


def _check_no_clash(cfg: Settings, options: StartOptions, store: Store, spec: _Spec) -> None:
    """No live session of the model (unless ``force_new``) or of the name,
    and the local port is free and no other live session's."""
    from alvis_fsm.cluster.tunnel import local_port_free, port_busy_hint

    name, local_port = spec.name, spec.local_port
    records, _ = store.all()
    if not options.force_new:
        same = [r for r in records if r.live and (r.model == spec.model or r.name == name)]
        if same:
            raise AlreadyLive(
                same[0],
                second_session(store, records, spec.model, name, local_port, cfg.tunnel.bind),
            )
    for r in records:
        if r.live and r.name == name:
            raise SessionError(
                f"Session '{name}' is live (job {r.job_id}); choose another --name",
                hint=f"`alvis-fsm resume {r.name}` or `alvis-fsm stop {r.name}`.",
            )
        if local_port and r.live and r.local_port == local_port:
            raise SessionError(
                f"Local port {local_port} is claimed by session '{r.name}' (job {r.job_id})",
                hint=f"Pick another port with --port (e.g. --port {local_port + 1}), "
                f"or `alvis-fsm stop {r.name}`.",
            )
    if local_port and not local_port_free(local_port, cfg.tunnel.bind):
        raise LocalPortBusy(
            f"Local port {local_port} is already in use", hint=port_busy_hint(local_port)
        )


def _check_run_root(cfg: Settings) -> None:
    if ":" in cfg.remote.run_root or "," in cfg.remote.run_root:
        # vLLM loads the tool's guard from the run directory (jobscript.sh).
        raise ConfigError(
            f"remote.run_root {cfg.remote.run_root!r} holds ':' or ','",
            hint="vLLM loads the tool's guard from the run directory, and a path with ':' or ',' "
            "cannot be put on PYTHONPATH or bound into the container: choose one without them.",
        )


def _new_record(cfg: Settings, options: StartOptions, store: Store, spec: _Spec) -> SessionRecord:
    """The session's record: its run directory, job name, URL parts, key."""
    from alvis_fsm.cluster import jobscript

    name = spec.name
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    token = secrets.token_hex(3)
    record = SessionRecord(
        name=name,
        model=spec.model,
        local_port=spec.local_port,
        run_dir=f"{cfg.remote.run_root.rstrip('/')}/{name}-{stamp}-{token}",
        started=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        job_name=f"alvis-fsm-{name}-{token}",
        served_name=jobscript.served_model_name(spec.entry.path),
        route=cfg.tunnel.route,
        bind=cfg.tunnel.bind,
        login_host=cfg.ssh.host,
        time_limit=spec.time_text,
        time_limit_s=spec.seconds,
    )
    from alvis_fsm.cluster.ssh import control_path

    # Every session's private end, beside start's port (the gateway's have
    # no port): short (a socket path has ~100 bytes), private (0700, checked).
    record.local_socket = str(control_path(store.dir, f"{store.dir.resolve()}|{name}|{token}|http"))
    if cfg.vllm.api_key:
        from alvis_fsm.engine.session.runner import new_api_key

        record.api_key = new_api_key()
    return record


@dataclass(frozen=True)
class Started:
    """A session ``start`` has driven: detached (tunneled) or ended."""

    record: SessionRecord
    account: str


def start(
    settings: Settings,
    options: StartOptions,
    ui: Observer,
    *,
    drive: Callable[[Runner], None] | None = None,
    shield: Shield | None = None,
    choose: Chooser | None = None,
    on_failure: Callable[[SessionRecord, AlvisError], None] | None = None,
    on_detached: Callable[[SessionRecord], None] | None = None,
    **handles: Any,
) -> Started:
    """Create, prepare and drive a new session (``drive``: the front's way,
    by default ``Runner.drive``). When vLLM refuses the context length for
    the KV cache and ``vllm.auto_fit`` is on, the job is cleaned up and the
    session started once more with the length vLLM says fits.
    ``on_failure`` hears the error that ends the start (not the one retried).
    ``on_detached`` runs, still holding the session's lock, once a detached
    session is tunneled: the front spawns its supervisor there (an
    ``ownership.Handover``), so that the supervisor is the next to hold the
    lock and `resume`/`stop` find it."""
    new = create(settings, options)
    with new.lock():
        runner = new.prepare(ui, detach=options.detach, shield=shield, choose=choose, **handles)
        try:
            (drive or _drive)(runner)
            if options.detach and on_detached is not None:
                on_detached(new.record)
            return Started(new.record, new.account)
        except AlvisError as exc:
            fits = new.fitting_length(exc)
            if fits is None:
                new.explain(exc)
                if on_failure is not None:
                    on_failure(new.record, exc)
                raise
            refusal = exc.details or ""
    # The job is cleaned up; one more start, with the length vLLM says fits.
    said = next((line for line in refusal.splitlines() if "estimated maximum" in line), "")
    if said:
        ui.warn(f"vLLM: {said.strip()}")
    model = new.record.model
    ui.warn(
        f"vLLM refused max_model_len {new.entry.max_model_len} for {model}: the KV cache "
        f"on {new.gpus} holds {fits} tokens. Starting once more with max_model_len {fits} "
        f'(vllm.auto_fit). To skip this next time, set "max_model_len": {fits} for '
        f"{model} in your catalog (`alvis-fsm models --add`)."
    )
    again = StartOptions(**{**options.__dict__, "model": model, "fit_len": fits})
    return start(
        settings,
        again,
        ui,
        drive=drive,
        shield=shield,
        choose=choose,
        on_failure=on_failure,
        on_detached=on_detached,
        **handles,
    )


def _drive(runner: Runner) -> None:
    runner.drive()


def choose_account(ui: Observer, agent: Any, configured: str, choose: Chooser | None = None) -> str:
    """The account to charge: slurm.account if set; else the user's only
    SLURM account; else, of several, the one ``choose`` picks (a front's
    prompt, only when the observer is interactive)."""
    if configured:
        return configured
    from alvis_fsm.cluster.agent import accounts

    found = accounts(agent)
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
    if choose is None or not ui.interactive():
        raise UsageError(
            f"slurm.account is not set and you have {len(found)} SLURM accounts;"
            " choose the one to charge:",
            hint=how.replace("NAME", found[0]),
            details="\n".join(found),
        )
    chosen = choose(found)
    if chosen not in found:
        raise UsageError(
            "No SLURM account chosen", hint=how.replace("NAME", found[0]), details="\n".join(found)
        )
    return chosen


def _auto_fallback(cfg: Settings, gpu_spec: str, from_user: bool) -> str | None:
    """What to ask for when ``auto`` cannot size the model: one GPU of the
    first auto type, but only when ``auto`` is the packaged default (an
    ``auto`` the user asked for, by flag, catalog or setting, is refused)."""
    from alvis_fsm.engine.fit.autofit import AUTO
    from alvis_fsm.engine.settings.model import DEFAULT_LABEL

    if gpu_spec != AUTO or from_user or cfg.source("slurm.gpus") != DEFAULT_LABEL:
        return None
    return f"{cfg.fit.auto_types[0]}:1"


def _report_free_gpus(ui: Observer, sinfo: Callable[[], list[str]], gpu_spec: str) -> None:
    """Free GPUs of the requested type right now: tells the user whether to
    expect a wait in the queue. Informational: a failure here stops nothing."""
    from alvis_fsm.cluster import slurm

    gpu_type = gpu_spec.split(":")[0] if ":" in gpu_spec else ""
    label = f"{gpu_type} GPUs" if gpu_type else "GPUs"
    try:
        free, total, nodes = slurm.free_gpus(sinfo(), gpu_type)
    except AlvisError:
        return
    if total == 0:
        ui.warn(
            f"The cluster reports no {label}; sbatch will probably refuse --gpus-per-node={gpu_spec}"
        )
    elif free == 0:
        ui.info(f"No {label} free right now ({total} in all): expect to wait in the queue")
    else:
        ui.info(
            f"{label} free right now: {free} of {total} (on {nodes} node{'s' if nodes != 1 else ''})"
        )


# -- one session by name ---------------------------------------------------------
class NoLiveSession(SessionError):
    """No session is live (a bare command has nothing to act on)."""


def pick_session(
    store: Store, name: str | None, command: str = "status", *, latest: bool = False
) -> SessionRecord:
    """The named session, or the only live one. Finished sessions are
    history: a bare command never picks one (``latest``: the newest of them
    when none is live, for `logs`), they are named to act on them."""
    if name:
        return store.load(check_name(name))
    records, errors = store.all()
    live = [r for r in records if r.live]
    if len(live) == 1:
        return live[0]
    if len(live) > 1:
        names = ", ".join(r.name for r in live)
        raise SessionError(
            f"There are several live sessions ({names}); name one",
            hint=f"For example: alvis-fsm {command} {live[0].name}",
        )
    if latest and records:
        return max(records, key=lambda r: r.started)
    if errors and not records:
        raise errors[0]
    finished = f" ({len(records)} finished: `alvis-fsm status` lists them)" if records else ""
    raise NoLiveSession(
        f"There is no live session{finished}" if records else "There is no session",
        hint="`alvis-fsm start` starts one; a finished session is named to act on it"
        f" (alvis-fsm {command} NAME).",
    )


def stop(
    settings: Settings,
    store: Store,
    name: str,
    ui: Observer,
    *,
    shield: Shield | None = None,
    **handles: Any,
) -> SessionRecord | None:
    """Cancel the session's job (confirmed by the scheduler), close its
    tunnel, state cleaned. None when it was already stopped: its record
    is returned then, for the front to say how it ended. Whoever drives the
    session must have let go first (``ownership.stop_session`` sees to that)."""
    from alvis_fsm.engine.session.job_control import stop_job

    return stop_job(settings, store, name, ui, shield=shield, **handles)


def resume(
    settings: Settings,
    store: Store,
    name: str,
    ui: Observer,
    *,
    detach: bool = False,
    drive: Callable[[Runner], None] | None = None,
    shield: Shield | None = None,
    on_failure: Callable[[SessionRecord, AlvisError], None] | None = None,
    on_detached: Callable[[SessionRecord], None] | None = None,
    **handles: Any,
) -> SessionRecord:
    """Pick a session up where it is (after a killed client, a closed laptop
    or a detach) and drive it (``drive``: the front's way). A session with
    nothing left to drive is cleaned up and said so. Whoever drives it must
    have let go first (a background supervisor: ``ownership.take_over``)."""
    from alvis_fsm.engine.session.runner import Runner

    with store.lock(name):
        record = store.load(name)  # read under the lock
        if record.state == State.CLEANED:
            ui.result(
                f"Session '{record.name}' is finished ({record.outcome()}). "
                "Start a new one with `alvis-fsm start`."
            )
            return record
        runner = Runner(
            settings,
            record,
            store,
            ui,
            detach=detach,
            shield=shield or contextlib.nullcontext,
            **handles,
        )
        ui.info(f"Resuming session '{record.name}' (job {record.job_id or '-'}, {record.state})")
        if not _has_a_job_to_drive(runner, store, ui):
            return record
        try:
            (drive or _drive)(runner)
        except AlvisError as exc:
            if on_failure is not None:
                on_failure(record, exc)
            raise
        if detach and on_detached is not None and record.live:
            on_detached(record)  # under the lock, as in start
    return record


def _has_a_job_to_drive(runner: Runner, store: Store, ui: Observer) -> bool:
    """Whether a resumed session has a live job to drive; when not, it is
    cleaned up and said so."""
    record = runner.record
    if record.state == State.IDLE:
        # Stopped before anything was submitted: there is no job script to
        # submit from here (start renders it), so there is nothing to resume.
        runner.cleanup("never submitted")
        ui.result(
            f"Session '{record.name}' never submitted a job; "
            "start a new one with `alvis-fsm start`."
        )
        return False
    runner.conn.open()
    if record.state == State.FAILED:
        runner.cleanup(record.end_reason or State.FAILED.value)
        return False
    if not record.job_id:
        # Killed while sbatch ran: the job may exist; find it by its unique name.
        found = runner.agent.find(record.job_name) if record.job_name else None
        if not found:
            runner.cleanup("no job was submitted")
            ui.result(
                f"Session '{record.name}' has no job on the cluster; "
                "start a new one with `alvis-fsm start`."
            )
            return False
        record.job_id = found
        store.save(record)
        ui.info(f"Found the session's job: {found}")
    return runner.still_alive()


def logs(
    settings: Settings,
    store: Store,
    name: str | None,
    ui: Observer,
    *,
    lines: int = 50,
    follow: bool = False,
    **handles: Any,
) -> None:
    """vLLM's log lines (``ui.log_line``), from the shared run directory;
    ``follow`` streams until the job ends (or KeyboardInterrupt)."""
    from alvis_fsm.engine.session.looks import look, show_logs

    record = pick_session(store, name, "logs", latest=True)
    # Say which job the lines are from (NAME may have picked the gateway's).
    ui.info(
        f"Logs of session '{record.name}' (job {record.job_id or '-'}, {record.state},"
        f" model {record.model})"
    )
    show_logs(look(settings, record, store, ui, **handles), lines, follow)


@dataclass(frozen=True)
class Status:
    """What a live check found: the record (as saved after the check), the
    scheduler's state of the job, its time left, whether the tunnel answers
    (None: not checked), and the check's own failure, if any (the record is
    then the last saved state)."""

    record: SessionRecord
    job_state: str | None = None
    time_left: str | None = None
    reachable: bool | None = None
    problem: AlvisError | None = None


def needs_check(record: SessionRecord) -> bool:
    """Live, or failed with a cancel not confirmed (still a job to ask about)."""
    return record.live or (record.state == State.FAILED and bool(record.job_id))


def check(
    settings: Settings, store: Store, record: SessionRecord, ui: Observer, **handles: Any
) -> Status:
    """Ask the cluster about one session, read-only unless nobody drives it
    and its job has ended: then the end is recorded (under its lock)."""
    from alvis_fsm.cluster.tunnel import health
    from alvis_fsm.engine.session.looks import look

    driven = store.locked(record.name)
    link = look(settings, record, store, ui, **handles)
    opened = not link.conn.alive()
    try:
        link.conn.open()
        job = link.agent.jobinfo(record.job_id) if record.job_id else None
        if job is not None and job.unanswered:
            # No answer is not news: the session is left as it is.
            return Status(
                record,
                job_state="UNKNOWN",
                problem=SchedulerError(
                    f"{record.name}: could not check job {record.job_id}: {job.unanswered}",
                    hint="The scheduler may be busy or restarting; the session is kept. "
                    "Run `alvis-fsm status` again later.",
                ),
            )
        if job is not None and job.ended:
            return _ended(settings, store, record, ui, str(job.state), driven, **handles)
        reachable = (
            health(
                record.local_port, api_key=record.api_key or None, local_socket=record.local_socket
            )
            if record.state == State.TUNNELED
            else None
        )
        return Status(
            record,
            job_state=str(job.state) if job else None,
            time_left=_time_left(job.time_left) if job else None,
            reachable=reachable,
        )
    except AlvisError as exc:
        # The same class: its exit code is status's.
        return Status(record, problem=type(exc)(f"{record.name}: {exc.message}", hint=exc.hint))
    finally:
        if opened:
            link.conn.close()


def _ended(
    settings: Settings,
    store: Store,
    record: SessionRecord,
    ui: Observer,
    job_state: str,
    driven: bool,
    **handles: Any,
) -> Status:
    """A check that found the job ended: its driver records the end; when
    nobody drives it, the end is recorded here and what is left locally (a
    detached tunnel) closed, under the lock so that a `resume` starting now
    cannot race us."""
    from alvis_fsm.engine.session import ownership
    from alvis_fsm.engine.session.job_control import JobControl
    from alvis_fsm.engine.session.link import open_link

    if ownership.wait_for_driver(store, record.name, driven):
        return Status(record, job_state=job_state)
    try:
        with store.lock(record.name):
            owned = open_link(settings, store.load(record.name), store, ui, **handles)
            JobControl(owned).still_alive()  # closes the session's connection
            return Status(owned.record, job_state=job_state)
    except SessionError:
        return Status(record, job_state=job_state)  # a client took it meanwhile


def _time_left(squeue: str) -> str | None:
    """squeue's time left (``59:28``, ``1-02:00:00``) written one way, as every
    time left is (``0:59:28``: cluster/durations.py); as given if unreadable."""
    from alvis_fsm.cluster.durations import fmt_duration
    from alvis_fsm.cluster.syntax import duration

    seconds = duration(squeue) if squeue else None
    return fmt_duration(seconds) if seconds is not None else (squeue or None)
