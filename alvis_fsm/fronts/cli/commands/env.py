"""alvis-fsm env: exports for OpenAI-compatible clients: eval "$(alvis-fsm env)".

Only the two ``export`` lines go to stdout, each value quoted for a POSIX
shell (bash, zsh, dash), so the output is safe to ``eval``; errors go to
stderr and leave stdout empty, so a failed ``eval "$(alvis-fsm env)"``
changes nothing."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import click

from alvis_fsm.engine.session.store import Store
from alvis_fsm.errors import SessionError, UsageError
from alvis_fsm.fronts.cli.commands._common import pick_session, reporter, settings
from alvis_fsm.fronts.ui import Verbosity

if TYPE_CHECKING:
    from alvis_fsm.engine.settings.model import Settings


def exports(base_url: str, api_key: str) -> str:
    """The export lines; an empty key becomes vLLM's conventional "EMPTY"
    (OpenAI clients refuse to run without one)."""
    lines = [f"export OPENAI_BASE_URL={shlex.quote(base_url)}"]
    lines.append(f"export OPENAI_API_KEY={shlex.quote(api_key or 'EMPTY')}")
    return "\n".join(lines)


def run(
    verbosity: Verbosity, *, name: str | None, as_json: bool = False, of_gateway: bool = False
) -> None:
    cfg = settings()
    if of_gateway:
        if name:
            raise UsageError(
                f"--gateway prints the gateway's exports, not session '{name}''s",
                hint=f"alvis-fsm env --gateway, or alvis-fsm env {name}",
            )
        _gateway(verbosity, cfg, as_json)
        return
    record = pick_session(Store(cfg.state_dir), name, "env")
    if not record.live:
        raise SessionError(
            f"Session '{record.name}' is {record.state}; there is no server to point at",
            hint="`alvis-fsm start` or `alvis-fsm resume`.",
        )
    if not record.url:
        raise SessionError(
            f"Session '{record.name}' has no local port yet",
            hint=f"Wait until `alvis-fsm status {record.name}` says tunneled.",
        )
    if as_json:
        from alvis_fsm.fronts.output import emit_json

        emit_json(
            {
                "name": record.name,
                "base_url": f"{record.url}/v1",
                "api_key": record.api_key or "EMPTY",
                "model": record.served_name or None,
            }
        )
        return
    click.echo(exports(f"{record.url}/v1", record.api_key))


def _gateway(verbosity: Verbosity, cfg: Settings, as_json: bool) -> None:
    """The running gateway's port, else the one it would take (said on
    stderr), and its key (made now if it has none yet: the gateway will
    use the same)."""
    from alvis_fsm.fronts.gateway import instance
    from alvis_fsm.fronts.gateway.keys import gateway_key

    found = instance.running(cfg.state_dir)
    port = found.port if found is not None else cfg.gateway.port
    if found is None and not as_json:  # --json: one object, nothing else
        reporter(verbosity).info(
            f"No gateway is running; these are for one on gateway.port ({port}):"
            " start it with `alvis-fsm gateway --detach`."
        )
    base_url = f"http://localhost:{port}/v1"
    key = gateway_key(cfg.state_dir)
    if as_json:
        from alvis_fsm.fronts.output import emit_json

        emit_json({"name": "gateway", "base_url": base_url, "api_key": key, "model": None})
        return
    click.echo(exports(base_url, key))
