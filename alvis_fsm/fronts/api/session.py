"""The Python API, for scripts and notebooks::

    import alvis_fsm
    with alvis_fsm.session("gpt-oss-20b", time="1:00:00") as s:
        client = s.openai()   # an openai.OpenAI bound to s.base_url and s.api_key
        ...
    # on exit the session is stopped if this block started it (keep=True leaves it)

A live, answering session of the model is reused; otherwise one is started
through the session service (engine/session/service.py) as ``alvis-fsm start
--detach`` would (so its tunnel is kept up in the
background). ``via="gateway"`` returns a client of the running gateway
instead (one is started in the background if none runs): one endpoint for
every model, whose jobs start on the first request and stop when idle.
Progress goes to the ``alvis_fsm`` logger, never to stdout;
errors are the exceptions the CLI maps to exit codes (``alvis_fsm.errors``).
Nothing is ever asked: settings the CLI would prompt for (several SLURM
accounts) must be set (``alvis-fsm config set slurm.account ...``)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord
from alvis_fsm.errors import SessionError, UsageError
from alvis_fsm.fronts.ui import Reporter, Verbosity
from alvis_fsm.text import inert

if TYPE_CHECKING:
    import openai

log = logging.getLogger("alvis_fsm")


class LogReporter(Reporter):
    """The CLI's reporter, turned into log records: INFO for progress,
    WARNING for warnings, DEBUG for commands and vLLM's log lines. Every
    text is made inert first (``alvis_fsm.text``): a log handler may print
    it to a terminal."""

    def __init__(self, logger: logging.Logger = log) -> None:
        super().__init__(Verbosity.QUIET)
        self.log = logger
        self._last_wait: str | None = None

    def info(self, message: str) -> None:
        self.log.info(inert(message))

    def warn(self, message: str) -> None:
        self.log.warning(inert(message))

    def result(self, message: str) -> None:
        self.log.info(inert(message))

    def command(self, text: str) -> None:
        self.log.debug("command: %s", inert(text))

    def log_line(self, stream: str, line: str) -> None:
        self.log.debug("vllm %s: %s", stream, inert(line))

    def waiting(self, text: str, since: float | None = None) -> None:
        if text != self._last_wait:
            self._last_wait = text
            self.log.info(inert(text))

    def interrupted(self) -> None:
        self.log.info("interrupted")

    def done_waiting(self) -> None:
        self._last_wait = None

    def connected(self, record: Any, models: list[str], first_token_s: float | None = None) -> None:
        self.log.info(
            "connected: %s serves %s (first token %.0f ms)",
            record.url,
            inert(", ".join(models)),
            (first_token_s or 0) * 1000,
        )

    def interactive(self) -> bool:
        return False

    def ask(self, prompt: str, secret: bool = False) -> str:
        raise UsageError(
            f"alvis-fsm needs an answer it cannot ask from Python: {prompt.strip()}",
            hint="Answer it once in a terminal (`alvis-fsm start`), or set the setting it "
            "asks for with `alvis-fsm config set`.",
        )


@dataclass
class Session:
    """A running session: where its OpenAI-compatible server is, and its key."""

    name: str
    model: str
    served_name: str
    base_url: str
    api_key: str
    job_id: str
    started_here: bool = False
    keep: bool = False
    via_gateway: bool = False  # a client of the gateway, which runs the model's jobs
    _stopped: bool = field(default=False, repr=False)

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for this session. Its HTTP client ignores
        proxy settings: the tunnel is on this machine, and the key must not
        go anywhere else. Needs the ``openai`` package."""
        import httpx
        import openai as _openai

        kwargs.setdefault("http_client", httpx.Client(trust_env=False, timeout=600))
        return _openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", **kwargs)

    def stop(self) -> None:
        """Cancel the job (confirmed by the scheduler) and close the tunnel;
        through the gateway: stop the gateway, which cancels every job it
        started (confirmed)."""
        from alvis_fsm.fronts.common import settings

        cfg, ui = settings(), LogReporter()
        if self.via_gateway:
            from alvis_fsm.fronts.gateway import instance

            instance.stop(cfg, ui)
        else:
            from alvis_fsm.engine.session import ownership
            from alvis_fsm.engine.session.store import Store
            from alvis_fsm.fronts import signals

            ownership.stop_session(
                cfg, Store(cfg.state_dir), self.name, ui, shield=signals.shielded
            )
        self._stopped = True

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.started_here and not self.keep and not self._stopped:
            self.stop()


def session(
    model: str | None = None,
    *,
    time: str | None = None,
    gpus: str | None = None,
    name: str | None = None,
    port: int | None = None,
    keep: bool = False,
    via: Literal["direct", "gateway"] = "direct",
    yes: bool = False,
) -> Session:
    """A session of ``model`` (the catalog's default when None): a live one of
    that model if it answers, else a new one, started and connected before
    this returns. As a context manager it stops what it started on exit,
    unless ``keep``. ``yes``: start even if ``time`` is shorter than the
    model's expected load time plus a margin (``start --yes``)."""
    if via not in ("direct", "gateway"):
        raise UsageError(f"via must be 'direct' or 'gateway', not {via!r}")
    from alvis_fsm.engine.session.store import Store
    from alvis_fsm.fronts.common import settings

    cfg = settings()
    store = Store(cfg.state_dir)
    model_name = model or cfg.catalog.default_model
    if via == "gateway":
        return _via_gateway(cfg, model_name, keep)
    reused = _live_session(store, model_name, name)
    if reused is not None:
        log.info("reusing session %s (job %s) at %s", reused.name, reused.job_id, reused.url)
        return _session(reused, started_here=False, keep=keep)
    through = None if name else _gateway_session(store, model_name, keep)
    if through is not None:
        log.info(
            "reusing the gateway's session %s (job %s) at %s",
            through.name,
            through.job_id,
            through.base_url,
        )
        return through
    if port is None and not _port_free(int(cfg.tunnel.local_port)):
        port = _free_port()  # the default port is taken: any free one will do here
    record = _start(model_name, time=time, gpus=gpus, name=name, port=port, yes=yes)
    if record.state != State.TUNNELED:
        raise SessionError(f"Session '{record.name}' did not connect ({record.state})")
    return _session(record, started_here=True, keep=keep)


def _via_gateway(cfg: Any, model: str, keep: bool) -> Session:
    """A client of the running gateway for ``model`` (its URL and key), after
    starting one in the background (``alvis-fsm gateway --detach``) if none
    runs. The gateway starts the model's job on the first request and stops
    it when idle; on exit, a gateway started here is stopped (unless ``keep``)."""
    import subprocess
    import sys

    from alvis_fsm.engine.fit.catalog import load_catalog
    from alvis_fsm.fronts.gateway import instance
    from alvis_fsm.fronts.gateway.keys import gateway_key

    catalog = load_catalog(cfg)
    if catalog.get(model) is None:
        raise UsageError(f"Unknown model '{model}'", hint="`alvis-fsm models` lists the catalog.")
    found = instance.running(cfg.state_dir)
    started = found is None
    if found is None:
        done = subprocess.run(
            [sys.executable, "-m", "alvis_fsm", "-q", "gateway", "--detach"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        found = instance.running(cfg.state_dir)
        if done.returncode != 0 or found is None:
            said = done.stderr.strip().splitlines()
            raise SessionError(
                "The gateway did not start" + (f": {said[0]}" if said else ""),
                hint="Run `alvis-fsm gateway` in a terminal to see why.",
            )
        log.info("started the gateway (pid %s) on %s", found.pid, found.base_url)
    else:
        log.info("using the running gateway (pid %s) on %s", found.pid, found.base_url)
    return Session(
        name="gateway",
        model=model,
        served_name=model,
        base_url=found.base_url,
        api_key=gateway_key(cfg.state_dir),
        job_id="",
        started_here=started,
        keep=keep,
        via_gateway=True,
    )


def _start(
    model: str,
    *,
    time: str | None,
    gpus: str | None,
    name: str | None,
    port: int | None,
    yes: bool = False,
) -> SessionRecord:
    """Start a session as ``alvis-fsm start --detach`` does, through the
    service (no signal handlers: this may run in any thread), and leave a
    supervisor keeping its tunnel up."""
    from alvis_fsm.engine.session import ownership, service
    from alvis_fsm.engine.session.store import Store
    from alvis_fsm.errors import AlvisError, Interrupted
    from alvis_fsm.fronts import notify
    from alvis_fsm.fronts.common import flag_settings, supervisor_command

    cfg = flag_settings(
        {
            "tunnel": {"local_port": port} if port is not None else {},
            "slurm": {"gpus": gpus} if gpus else {},
        }
    )
    ui = LogReporter()
    ui.on_ready = lambda rec: notify.on_ready(cfg, rec)

    def failed(record: SessionRecord, exc: AlvisError) -> None:
        if not isinstance(exc, Interrupted):
            notify.on_failure(cfg, record.name, exc.message)

    options = service.StartOptions(
        model=model, time=time, gpus=gpus, name=name, detach=True, short_ok=yes
    )
    store = Store(cfg.state_dir)
    handover = ownership.Handover(store, supervisor_command)
    started = service.start(cfg, options, ui, on_failure=failed, on_detached=handover.spawn)
    handover.wait(ui)
    return started.record


def _session(record: SessionRecord, *, started_here: bool, keep: bool) -> Session:
    return Session(
        name=record.name,
        model=record.model,
        served_name=record.served_name,
        base_url=f"{record.url}/v1",
        api_key=record.api_key,
        job_id=record.job_id,
        started_here=started_here,
        keep=keep,
    )


def _live_session(store: Any, model: str, name: str | None) -> SessionRecord | None:
    from alvis_fsm.cluster.tunnel import health
    from alvis_fsm.fronts.gateway.slot.sessions import is_gateway_session

    records, _ = store.all()
    for record in records:
        if record.state != State.TUNNELED or record.model != model:
            continue
        if name and record.name != name:
            continue
        if is_gateway_session(record.name):
            continue  # reached through the gateway (_gateway_session), not its socket
        if health(
            record.local_port, api_key=record.api_key or None, local_socket=record.local_socket
        ):
            return record  # type: ignore[no-any-return]
    return None


def _gateway_session(store: Any, model: str, keep: bool) -> Session | None:
    """The running gateway's session of ``model``, as a Session through the
    gateway (its URL and key; the model by its catalog name): one live
    session per model, whoever started it. Never stopped from here."""
    from alvis_fsm.cluster.tunnel import health
    from alvis_fsm.fronts.gateway import instance
    from alvis_fsm.fronts.gateway.keys import gateway_key
    from alvis_fsm.fronts.gateway.slot.sessions import is_gateway_session

    found = instance.running(store.dir)
    if found is None:
        return None
    records, _ = store.all()
    for record in records:
        if not is_gateway_session(record.name) or record.model != model:
            continue
        if record.state == State.TUNNELED and health(
            0, api_key=record.api_key or None, local_socket=record.local_socket
        ):
            return Session(
                name=record.name,
                model=model,
                served_name=model,
                base_url=found.base_url,
                api_key=gateway_key(store.dir),
                job_id=record.job_id,
                started_here=False,
                keep=keep,
            )
    return None


def _port_free(port: int) -> bool:
    from alvis_fsm.cluster.tunnel import local_port_free

    return local_port_free(port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
