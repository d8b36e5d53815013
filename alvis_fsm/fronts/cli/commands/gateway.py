"""alvis-fsm gateway: one private OpenAI endpoint for every catalog model.

Prints the two exports on stdout (progress goes to stderr), serves on
127.0.0.1 until Ctrl+C, SIGTERM or SIGHUP, then cancels every job it started
(confirmed) and closes every tunnel. The signals are the front's: the
sessions run in threads and are stopped with ``request_stop``.

``--detach`` runs the same gateway in the background (``_gateway``, in a
session of its own, its output in ``gateway.log`` in the state dir) and
returns once it listens; ``gateway stop`` sends it SIGTERM and waits for
its shutdown. Either way the gateway records itself in the state dir
(fronts/gateway/instance.py): one gateway per state dir."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from alvis_fsm.errors import (
    AlvisError,
    CancelUnconfirmed,
    ExitCode,
    LocalPortBusy,
    SessionError,
    UsageError,
)
from alvis_fsm.fronts.cli.commands._common import flag_settings, reporter, settings
from alvis_fsm.fronts.gateway import instance
from alvis_fsm.fronts.ui import Reporter, Verbosity

if TYPE_CHECKING:
    from alvis_fsm.engine.fit.catalog import Catalog
    from alvis_fsm.engine.session.store import Store
    from alvis_fsm.engine.settings.model import Settings
    from alvis_fsm.fronts.gateway.server import Gateway
    from alvis_fsm.fronts.gateway.slot.models import Handle, Models
    from alvis_fsm.fronts.gateway.slot.recorder import Recorder

# How long `gateway --detach` waits for the background gateway to listen
# (it reads the settings and the catalog, imports aiohttp: seconds).
START_S = 60.0


def parse_duration(text: str) -> float:
    """--idle: seconds, or with a unit: 90s, 15m, 1h (also 1.5h)."""
    from alvis_fsm.cluster.syntax import spoken_seconds

    try:
        return spoken_seconds(text)
    except ValueError:
        raise UsageError(
            f"--idle: {text!r} is not a duration",
            hint="Seconds, or with a unit: --idle 90s, --idle 15m, --idle 1h.",
        ) from None


def run(
    verbosity: Verbosity,
    *,
    port: int | None,
    idle: str | None,
    detach: bool = False,
    open_page: bool = False,
) -> None:
    if detach:
        _detach(verbosity, port=port, idle=idle, open_page=open_page)
    else:
        _serve_here(verbosity, port=port, idle=idle, log="", open_page=open_page)


def serve_background(verbosity: Verbosity, *, port: int, idle: str | None, log: str) -> None:
    """The background gateway that ``--detach`` starts (hidden ``_gateway``):
    the same gateway, its output going to ``log``."""
    _serve_here(verbosity, port=port, idle=idle, log=log)


def _settings(port: int | None, idle: str | None) -> Settings:
    overrides: dict[str, object] = {}
    if port is not None:
        overrides["port"] = port
    if idle is not None:
        overrides["idle_timeout"] = parse_duration(idle)
    return flag_settings({"gateway": overrides})


def _serve_here(
    verbosity: Verbosity, *, port: int | None, idle: str | None, log: str, open_page: bool = False
) -> None:
    from alvis_fsm.cluster.tunnel import local_port_free, port_busy_hint
    from alvis_fsm.engine.fit.catalog import load_catalog
    from alvis_fsm.engine.session.store import Store
    from alvis_fsm.fronts.cli.commands.env import exports
    from alvis_fsm.fronts.gateway.keys import gateway_key
    from alvis_fsm.fronts.gateway.server import LibraryLog
    from alvis_fsm.fronts.gateway.slot import sessions

    cfg = _settings(port, idle)
    catalog = load_catalog(cfg)
    g = cfg.gateway
    with instance.claim(cfg.state_dir) as registration:
        if not local_port_free(g.port, "127.0.0.1"):
            raise LocalPortBusy(
                f"Local port {g.port} is already in use", hint=port_busy_hint(g.port)
            )
        store = Store(cfg.state_dir)
        store.ensure()
        key = gateway_key(cfg.state_dir)
        echo = _echo(verbosity, log)
        LibraryLog.install(echo)  # aiohttp's and asyncio's records: one line each, a few a minute
        models = _models(cfg, catalog, store, echo, every_idle=idle is not None)
        gateway = _gateway(cfg, key, models)
        if not log:  # the background gateway's parent prints them; the log keeps no key
            click.echo(exports(f"http://localhost:{g.port}/v1", key))
            sys.stdout.flush()

        def listening(bound: int) -> None:
            registration.publish(bound, log)
            if not log and gateway.page is not None:
                # The background gateway's log keeps no login link: its parent asks for one.
                show_link(
                    f"http://localhost:{bound}/?token={gateway.page.new_login_token()}",
                    open_page,
                    cfg.state_dir,
                )

        def clean_up() -> list[str]:
            return sessions.clean_up_orphans(cfg, store, echo)

        left = asyncio.run(
            _serve(gateway, models, g.port, instance.shutdown_wait(cfg), echo, listening, clean_up)
        )
    if left:
        raise CancelUnconfirmed(
            f"Could not confirm that the jobs of {', '.join(left)} were cancelled",
            hint="`alvis-fsm status` lists them; `alvis-fsm stop NAME` tries again.",
        )


def _echo(verbosity: Verbosity, log: str) -> Callable[[str], None]:
    """Where the gateway's lines go: stderr, or the background gateway's log
    (rotated, each line dated); nothing when quiet."""
    from alvis_fsm.text import inert

    lock = threading.Lock()
    logfile = instance.LogFile(Path(log)) if log else None  # rotated

    def echo(line: str) -> None:
        if verbosity is not Verbosity.QUIET:
            line = inert(line)  # vLLM's and the cluster's text: never control sequences
            with lock:
                if logfile is not None:  # in the background log, each line says when
                    logfile.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line)
                else:
                    click.echo(line, err=True)

    return echo


def _models(
    cfg: Settings, catalog: Catalog, store: Store, echo: Callable[[str], None], every_idle: bool
) -> Models:
    """A slot per catalog model, each starting its sessions in the store;
    with ``every_idle`` (--idle) every model idles out alike, else each as
    its catalog entry says."""
    from alvis_fsm.cluster import jobscript
    from alvis_fsm.engine.fit.loadtimes import LoadTimes
    from alvis_fsm.fronts.gateway.slot import sessions
    from alvis_fsm.fronts.gateway.slot.models import Models

    served = {name: jobscript.served_model_name(e.path) for name, e in catalog.entries.items()}

    def factory(model: str, observer: Recorder, lane: int) -> Handle:
        return sessions.new_session(cfg, catalog, model, store, observer, lane)

    def load_time(model: str, gpus: str) -> float | None:
        expected = LoadTimes(store.dir).expected(model, gpus)
        return expected[0] if expected else None

    models = Models(served, factory, echo, load_time)
    if not every_idle:
        for name, entry in catalog.entries.items():
            models.slots[name].idle_timeout = entry.idle_timeout
    return models


def _gateway(cfg: Settings, key: str, models: Models) -> Gateway:
    """The gateway of the settings, with its batches and its page."""
    from alvis_fsm.fronts.gateway.observe.batchview import Board
    from alvis_fsm.fronts.gateway.observe.requestlog import RequestLog
    from alvis_fsm.fronts.gateway.openai.batches import Batches, cluster_ops
    from alvis_fsm.fronts.gateway.page.routes import Page
    from alvis_fsm.fronts.gateway.server import Gateway, Options

    g = cfg.gateway
    options = Options(
        hold_timeout=g.hold_timeout,
        idle_timeout=g.idle_timeout,
        max_held=g.max_held,
        idle_check=max(0.5, min(5.0, g.idle_timeout / 4)),
        rollover_lead=g.rollover_lead,
        body_timeout=g.body_timeout,
    )
    batches = Batches(cfg.state_dir, cluster_ops(cfg))
    gateway = Gateway(key, models, options, batches)
    gateway.page = Page(
        gateway,
        RequestLog(cfg.state_dir),
        batches=Board(batches),
        stop_timeout=instance.shutdown_wait(cfg),
        login_life=g.login_link_life,
    )
    return gateway


async def _serve(
    gateway: Gateway,
    models: Models,
    port: int,
    wait: float,
    echo: Callable[[str], None],
    listening: Callable[[int], None],
    clean_up: Callable[[], list[str]] = list,
) -> list[str]:
    from alvis_fsm.fronts.gateway.server import serve

    serving = await serve(gateway, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Later signals while stopping are ignored: every scancel must run.
        loop.add_signal_handler(sig, stop.set)
    try:
        listening(serving.port)
        echo(
            f"Gateway on http://localhost:{serving.port}/v1 for {len(models.slots)} models"
            f" ({', '.join(models.names())}); each model's job starts with its first request"
            " and is cancelled when idle. Ctrl+C stops the gateway and cancels its jobs."
        )
        # Jobs a killed gateway left: cancelled while this one already serves
        # (each waits for its confirmation; the other models need not).
        orphans = asyncio.create_task(asyncio.to_thread(clean_up))
        await stop.wait()
        live = [s.name for s in models.slots.values() if s.handle is not None]
        echo(
            "Stopping the gateway"
            + (f"; cancelling the jobs of {', '.join(live)}..." if live else "...")
        )
        left = await models.shutdown(wait)
        left += await orphans  # its cancels run to their confirmation, as the models' do
    finally:
        await serving.runner.cleanup()
    echo(
        "Gateway stopped"
        + (f"; not confirmed: {', '.join(left)}" if left else "; nothing left running")
    )
    return left


# -- --detach ---------------------------------------------------------------------------


def _detach(
    verbosity: Verbosity, *, port: int | None, idle: str | None, open_page: bool = False
) -> None:
    """Start the gateway in the background and return once it listens,
    printing its exports; if it does not come up, its error, and nothing
    left running."""
    from alvis_fsm.cluster.tunnel import local_port_free, port_busy_hint
    from alvis_fsm.engine.fit.catalog import load_catalog
    from alvis_fsm.fronts.cli.commands.env import exports
    from alvis_fsm.fronts.gateway.keys import gateway_key

    # What can be checked here is, so that its error comes with its own
    # exit code: settings, catalog, a gateway already running, the port.
    cfg = _settings(port, idle)
    load_catalog(cfg)
    state_dir = cfg.state_dir
    if instance.claimed(state_dir):
        raise instance.already_running(state_dir)
    g = cfg.gateway
    if not local_port_free(g.port, "127.0.0.1"):
        raise LocalPortBusy(f"Local port {g.port} is already in use", hint=port_busy_hint(g.port))
    key = gateway_key(state_dir)
    log = instance.log_path(state_dir)
    argv = [sys.executable, "-m", "alvis_fsm", "_gateway", "--port", str(g.port), "--log", str(log)]
    if idle is not None:
        argv += ["--idle", idle]
    if verbosity is Verbosity.VERBOSE:
        argv.append("-v")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a log from before may have been made wider
        # In a session of its own: a closed terminal does not end it.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    try:
        found = _wait_listening(state_dir, proc, log)
    except BaseException:
        _end(proc, instance.shutdown_wait(cfg))
        raise
    click.echo(exports(found.base_url, key))
    sys.stdout.flush()
    if verbosity is not Verbosity.QUIET:
        click.echo(
            f"Gateway running in the background (pid {found.pid}) on {found.base_url}; log: {log}\n"
            "Stop it with `alvis-fsm gateway stop` (it cancels every job it started);"
            " `alvis-fsm env --gateway` prints the exports again.",
            err=True,
        )
    show_link(login_link(found, key), open_page, state_dir)


def _wait_listening(state_dir: Path, proc: subprocess.Popen[bytes], log: Path) -> instance.Instance:
    deadline = time.monotonic() + START_S
    while True:
        found = instance.running(state_dir)
        if found is not None and found.pid == proc.pid:
            return found
        code = proc.poll()
        if code is not None:
            raise failure(code, _read(log), log)
        if time.monotonic() >= deadline:
            raise SessionError(
                f"The background gateway did not start listening within {START_S:.0f} s",
                hint=f"Its log: {log}",
            )
        time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def failure(code: int, log_text: str, log: Path) -> AlvisError:
    """The background gateway's own error (from its log: ``[ERROR]``,
    indented details, ``[HINT]``) with its exit code."""
    message = ""
    details: list[str] = []
    hints: list[str] = []
    for line in log_text.splitlines():
        if line.startswith("[ERROR] "):
            message, details, hints = line[len("[ERROR] ") :], [], []
        elif line.startswith("[HINT] ") and message:
            hints.append(line[len("[HINT] ") :])
        elif line.startswith("    ") and message and not hints:
            details.append(line[4:])
    hints.append(f"The background gateway's log: {log}")
    exc = SessionError(
        message or f"The background gateway exited with status {code}",
        hint="\n".join(hints),
        details="\n".join(details) or None,
    )
    with contextlib.suppress(ValueError):
        exc.exit_code = ExitCode(code)
    return exc


def _end(proc: subprocess.Popen[bytes], wait: float) -> None:
    """Make sure a background gateway that did not come up is gone."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()  # its shutdown cancels whatever it started
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- gateway stop ----------------------------------------------------------------------


def stop(verbosity: Verbosity, ui: Reporter | None = None) -> None:
    """SIGTERM to the recorded gateway, then wait until it has shut down
    (fronts/gateway/instance.py ``stop``)."""
    instance.stop(settings(), ui or reporter(verbosity))


# -- the page ----------------------------------------------------------------------------


def show_link(url: str, open_page: bool, state_dir: Path) -> None:
    """The page's one-time login link, on stderr (stdout is for the exports
    a shell evals); opened in the browser with --open, through a private
    file that leads to it (``instance.open_file``): no token on a command line."""
    click.echo(f"Page: {url}  (a one-time link: it signs this browser in)", err=True)
    if open_page:
        import webbrowser

        if not webbrowser.open(instance.open_file(state_dir, url).as_uri()):
            click.echo(
                "[WARN] No browser could be opened here: open the link above by hand.", err=True
            )


def login_link(found: instance.Instance, key: str) -> str:
    """A new one-time login link from the running gateway (asked with its key)."""
    import httpx

    try:
        resp = httpx.post(
            f"http://127.0.0.1:{found.port}/gateway/login-link",
            trust_env=False,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        resp.raise_for_status()
        return str(resp.json()["url"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise SessionError(
            f"The gateway on port {found.port} did not give a login link ({exc})",
            hint="Is it a gateway of this version? `alvis-fsm gateway stop`, then start it again.",
        ) from exc


def open_page(verbosity: Verbosity, *, no_browser: bool = False) -> None:
    """`gateway open`: a new one-time link to the running gateway's page, opened."""
    from alvis_fsm.fronts.gateway.keys import gateway_key

    cfg = settings()
    found = instance.running(cfg.state_dir)
    if found is None:
        raise SessionError(
            "No gateway is running",
            hint="Start one: `alvis-fsm gateway --open` (or --detach --open).",
        )
    show_link(login_link(found, gateway_key(cfg.state_dir)), not no_browser, cfg.state_dir)


def show_log(verbosity: Verbosity, *, follow: bool, last: int, as_json: bool) -> None:
    """`gateway log`: the request log's last lines; with -f, new ones as they come."""
    import json

    from alvis_fsm.fronts.gateway.observe import requestlog
    from alvis_fsm.fronts.output import lost

    state_dir = settings().state_dir

    def say(entry: requestlog.Entry) -> None:
        click.echo(json.dumps(entry.to_json()) if as_json else requestlog.format_entry(entry))

    entries = requestlog.read(state_dir, last)
    if not entries and not follow and not as_json and verbosity is not Verbosity.QUIET:
        click.echo(f"No requests logged yet ({requestlog.path_of(state_dir)}).", err=True)
    for entry in entries:
        say(entry)
    if follow:
        sys.stdout.flush()
        try:
            for entry in requestlog.follow(state_dir):
                say(entry)
                sys.stdout.flush()
                if lost() is not None:  # the reader went away (`| head`): main says so
                    return
        except KeyboardInterrupt:
            return
