"""alvis-fsm gateway: one private OpenAI endpoint for every catalog model.

Prints the two exports on stdout (progress goes to stderr), serves on
127.0.0.1 until Ctrl+C, SIGTERM or SIGHUP, then cancels every job it started
(confirmed) and closes every tunnel. The signals are the front's: the
sessions run in threads and are stopped with ``request_stop``."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from alvis_fsm.errors import CancelUnconfirmed, SessionError, UsageError
from alvis_fsm.fronts.cli.commands._common import flag_settings
from alvis_fsm.fronts.ui import Verbosity

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.models import Handle, Models
    from alvis_fsm.fronts.gateway.server import Gateway

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


def run(verbosity: Verbosity, *, port: int | None, idle: str | None) -> None:
    from alvis_fsm.cluster import jobscript
    from alvis_fsm.cluster.tunnel import local_port_free, port_busy_hint
    from alvis_fsm.engine.catalog import load_catalog
    from alvis_fsm.engine.loadtimes import LoadTimes
    from alvis_fsm.engine.store import Store
    from alvis_fsm.fronts.cli.commands.env import exports
    from alvis_fsm.fronts.gateway import sessions
    from alvis_fsm.fronts.gateway.keys import gateway_key
    from alvis_fsm.fronts.gateway.models import Models
    from alvis_fsm.fronts.gateway.recorder import Recorder
    from alvis_fsm.fronts.gateway.server import Gateway, Options

    overrides: dict[str, object] = {}
    if port is not None:
        overrides["port"] = port
    if idle is not None:
        overrides["idle_timeout"] = parse_duration(idle)
    cfg = flag_settings({"gateway": overrides})
    catalog = load_catalog(cfg)
    g = cfg.gateway
    if not local_port_free(g.port, "127.0.0.1"):
        raise SessionError(f"Local port {g.port} is already in use", hint=port_busy_hint(g.port))
    store = Store(cfg.state_dir)
    store.ensure()
    key = gateway_key(cfg.state_dir)
    served = {name: jobscript.served_model_name(e.path) for name, e in catalog.entries.items()}
    lock = threading.Lock()

    def echo(line: str) -> None:
        if verbosity is not Verbosity.QUIET:
            with lock:
                click.echo(line, err=True)

    def factory(model: str, observer: Recorder, lane: int) -> Handle:
        return sessions.new_session(cfg, catalog, model, store, observer, lane)

    def load_time(model: str, gpus: str) -> float | None:
        expected = LoadTimes(store.dir).expected(model, gpus)
        return expected[0] if expected else None

    models = Models(served, factory, echo, load_time)
    if idle is None:  # --idle is for every model; else each its own, if the catalog says
        for name, entry in catalog.entries.items():
            models.slots[name].idle_timeout = entry.idle_timeout
    options = Options(hold_timeout=g.hold_timeout, idle_timeout=g.idle_timeout,
                      max_held=g.max_held, idle_check=max(0.5, min(5.0, g.idle_timeout / 4)),
                      rollover_lead=g.rollover_lead)  # fmt: skip
    gateway = Gateway(key, models, options)
    click.echo(exports(f"http://localhost:{g.port}/v1", key))
    sys.stdout.flush()
    left = asyncio.run(_serve(gateway, models, g.port, cfg.timeouts.cancel_confirm + 60, echo))
    if left:
        raise CancelUnconfirmed(
            f"Could not confirm that the jobs of {', '.join(left)} were cancelled",
            hint="`alvis-fsm status` lists them; `alvis-fsm stop NAME` tries again.",
        )


async def _serve(gateway: Gateway, models: Models, port: int, wait: float,
                 echo: Callable[[str], None]) -> list[str]:  # fmt: skip
    from alvis_fsm.fronts.gateway.server import serve

    serving = await serve(gateway, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Later signals while stopping are ignored: every scancel must run.
        loop.add_signal_handler(sig, stop.set)
    echo(f"Gateway on http://localhost:{serving.port}/v1 for {len(models.slots)} models"
         f" ({', '.join(models.names())}); each model's job starts with its first request"
         " and is cancelled when idle. Ctrl+C stops the gateway and cancels its jobs.")  # fmt: skip
    try:
        await stop.wait()
        live = [s.name for s in models.slots.values() if s.handle is not None]
        echo("Stopping the gateway" + (f"; cancelling the jobs of {', '.join(live)}..." if live else "..."))
        left = await models.shutdown(wait)
    finally:
        await serving.runner.cleanup()
    echo("Gateway stopped" + (f"; not confirmed: {', '.join(left)}" if left else "; nothing left running"))
    return left
