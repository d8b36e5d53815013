"""The Python API, for scripts and notebooks::

    import alvis_fsm
    with alvis_fsm.session("gpt-oss-20b", time="1:00:00") as s:
        client = s.openai()   # an openai.OpenAI bound to s.base_url and s.api_key
        ...
    # on exit the session is stopped if this block started it (keep=True leaves it)

A live, answering session of the model is reused; otherwise one is started
through the session service (engine/service.py) as ``alvis-fsm start
--detach`` would (so its tunnel is kept up in the
background). Progress goes to the ``alvis_fsm`` logger, never to stdout;
errors are the exceptions the CLI maps to exit codes (``alvis_fsm.errors``).
Nothing is ever asked: settings the CLI would prompt for (several SLURM
accounts) must be set (``alvis-fsm config set slurm.account ...``)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from alvis_fsm.engine.states import State
from alvis_fsm.engine.store import SessionRecord
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

    def connected(
        self, record: Any, models: list[str], first_token_s: float | None = None
    ) -> None:
        self.log.info(
            "connected: %s serves %s (first token %.0f ms)",
            record.url, inert(", ".join(models)), (first_token_s or 0) * 1000,
        )  # fmt: skip

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
        """Cancel the job (confirmed by the scheduler) and close the tunnel."""
        from alvis_fsm.fronts.cli.commands import stop

        stop.run(Verbosity.QUIET, name=self.name, ui=LogReporter())
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
) -> Session:
    """A session of ``model`` (the catalog's default when None): a live one of
    that model if it answers, else a new one, started and connected before
    this returns. As a context manager it stops what it started on exit,
    unless ``keep``."""
    if via == "gateway":
        raise UsageError(
            "via='gateway' needs `alvis-fsm gateway`, which this version does not have yet",
            hint="Use via='direct' (the default): a session of its own for the model.",
        )
    if via != "direct":
        raise UsageError(f"via must be 'direct' or 'gateway', not {via!r}")
    from alvis_fsm.engine.store import Store
    from alvis_fsm.fronts.cli.commands._common import settings

    cfg = settings()
    store = Store(cfg.state_dir)
    model_name = model or cfg.catalog.default_model
    reused = _live_session(store, model_name, name)
    if reused is not None:
        log.info("reusing session %s (job %s) at %s", reused.name, reused.job_id, reused.url)
        return _session(reused, started_here=False, keep=keep)
    if port is None and not _port_free(int(cfg.tunnel.local_port)):
        port = _free_port()  # the default port is taken: any free one will do here
    record = _start(model_name, time=time, gpus=gpus, name=name, port=port)
    if record.state != State.TUNNELED:
        raise SessionError(f"Session '{record.name}' did not connect ({record.state})")
    return _session(record, started_here=True, keep=keep)


def _start(model: str, *, time: str | None, gpus: str | None, name: str | None,
           port: int | None) -> SessionRecord:
    """Start a session as ``alvis-fsm start --detach`` does, through the
    service (no signal handlers: this may run in any thread), and leave a
    supervisor keeping its tunnel up."""
    from alvis_fsm.engine import service
    from alvis_fsm.engine.store import Store
    from alvis_fsm.errors import AlvisError, Interrupted
    from alvis_fsm.fronts import notify
    from alvis_fsm.fronts.cli.commands import supervise
    from alvis_fsm.fronts.cli.commands._common import flag_settings

    cfg = flag_settings({"tunnel": {"local_port": port} if port is not None else {},
                         "slurm": {"gpus": gpus} if gpus else {}})  # fmt: skip
    ui = LogReporter()
    ui.on_ready = lambda rec: notify.on_ready(cfg, rec)

    def failed(record: SessionRecord, exc: AlvisError) -> None:
        if not isinstance(exc, Interrupted):
            notify.on_failure(cfg, record.name, exc.message)

    options = service.StartOptions(model=model, time=time, gpus=gpus, name=name, detach=True)
    store = Store(cfg.state_dir)
    handover = supervise.Handover(store)
    started = service.start(cfg, options, ui, on_failure=failed, on_detached=handover.spawn)
    handover.wait(ui)
    return started.record


def _session(record: SessionRecord, *, started_here: bool, keep: bool) -> Session:
    return Session(
        name=record.name, model=record.model, served_name=record.served_name,
        base_url=f"{record.url}/v1", api_key=record.api_key, job_id=record.job_id,
        started_here=started_here, keep=keep,
    )  # fmt: skip


def _live_session(store: Any, model: str, name: str | None) -> SessionRecord | None:
    from alvis_fsm.cluster.tunnel import health

    records, _ = store.all()
    for record in records:
        if record.state != State.TUNNELED or record.model != model:
            continue
        if name and record.name != name:
            continue
        if health(record.local_port, api_key=record.api_key or None, local_socket=record.local_socket):
            return record  # type: ignore[no-any-return]
    return None


def _port_free(port: int) -> bool:
    from alvis_fsm.cluster.tunnel import local_port_free

    return local_port_free(port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
