"""alvis-fsm logs: the session's vLLM logs, from the shared run directory."""

from __future__ import annotations

from alvis_fsm.engine.store import NAME_RE, Store
from alvis_fsm.fronts.cli.commands._common import reporter, settings
from alvis_fsm.fronts.ui import Verbosity


def resolve(store: Store, name: str | None) -> str | None:
    """NAME as given, or the gateway's session of model NAME (``gw-NAME``,
    or ``gw-NAME-2`` after a rollover: the live one, else the newest) when
    there is no session called NAME but the gateway has served it:
    `alvis-fsm logs lab-ok` then shows what the gateway ran."""
    if not name or (NAME_RE.fullmatch(name) and store.exists(name)):
        return name
    from alvis_fsm.engine.states import State
    from alvis_fsm.fronts.gateway.sessions import session_name

    lanes = [store.load(n) for n in (session_name(name, lane) for lane in (0, 1))
             if store.exists(n)]  # fmt: skip
    if not lanes:
        return name
    # The one serving now (after a rollover, the successor), else the newest.
    lanes.sort(key=lambda r: (r.live and r.state == State.TUNNELED, r.live, r.started))
    return lanes[-1].name


def run(verbosity: Verbosity, *, name: str | None, follow: bool, lines: int) -> None:
    from alvis_fsm.engine import service

    cfg = settings()
    store = Store(cfg.state_dir)
    service.logs(cfg, store, resolve(store, name), reporter(verbosity), lines=lines, follow=follow)
