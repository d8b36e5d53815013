"""alvis-fsm status: the sessions (or one), with a live check unless --offline.

Without a name it lists live sessions and those that ended in the last
``RECENT_S`` (a day); older finished ones are history, listed with ``--all``
(and pruned after ``session.keep_days``), and a line says how many are left out.

``--offline`` reads only the local state files: no settings validation beyond
the state directory, no ssh, and none of the heavy imports.

JSON (``--json``), stable: ``{"sessions": [SESSION...], "errors": [TEXT...],
"gateway": GATEWAY}``. GATEWAY is the running gateway (``{"pid", "port",
"base_url", "started", "log"}``) or null; SESSION = ``{"name", "state",
"model", "served_name", "job_id", "node", "port", "local_port", "url",
"run_dir", "started", "time_limit", "time_left", "job_state", "reachable",
"end_reason", "gateway"}``: ``job_state`` and ``reachable`` are null when
not checked (offline, or nothing to check), ``gateway`` is true for the
gateway's sessions (``gw-MODEL``)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from alvis_fsm.cluster.durations import fmt_duration
from alvis_fsm.engine.session.states import ENDED_STATES
from alvis_fsm.engine.session.store import SessionRecord, Store, check_name, default_state_dir
from alvis_fsm.errors import AlvisError
from alvis_fsm.fronts.gateway import instance
from alvis_fsm.fronts.gateway.slot.sessions import is_gateway_session
from alvis_fsm.fronts.ui import Verbosity

if TYPE_CHECKING:
    from alvis_fsm.engine.session.service import Status


# Finished sessions older than this are history: `status --all` lists them.
RECENT_S = 86400.0


def is_history(record: SessionRecord, now: float | None = None) -> bool:
    """A session that ended more than ``RECENT_S`` ago (by when it entered
    its final state, else by its file's last write)."""
    if record.state not in ENDED_STATES:
        return False
    ended = record.entered_at.get(record.state, 0.0)
    return bool(ended) and (time.time() if now is None else now) - ended > RECENT_S


def offline_time_left(record: SessionRecord) -> str:
    if not record.live or not record.running_since or not record.time_limit_s:
        return ""
    return fmt_duration(record.time_limit_s - (time.time() - record.running_since))


def row(
    record: SessionRecord,
    job_state: str | None = None,
    time_left: str | None = None,
    reachable: bool | None = None,
) -> dict[str, Any]:
    return {
        "name": record.name,
        "state": record.state,
        "model": record.model,
        "served_name": record.served_name,
        "job_id": record.job_id or None,
        "node": record.node or None,
        "port": record.port or None,
        "local_port": record.local_port or None,
        "url": record.url if record.live else None,
        "run_dir": record.run_dir or None,
        "started": record.started or None,
        "time_limit": record.time_limit or None,
        "time_left": (time_left if time_left is not None else offline_time_left(record)) or None,
        "job_state": job_state if job_state is not None else (record.final_job_state or None),
        "reachable": reachable,
        "end_reason": record.end_reason or None,
        "gateway": is_gateway_session(record.name),
    }


def run(
    verbosity: Verbosity, *, name: str | None, as_json: bool, offline: bool, show_all: bool = False
) -> int:
    """Prints the sessions; returns the exit code: non-zero when a session
    could not be checked (its line is then what was last saved, and says so)."""
    cfg: Any = None
    if offline:
        store = Store(default_state_dir())
    else:
        from alvis_fsm.fronts.cli.commands._common import settings

        cfg = settings()
        store = Store(cfg.state_dir)
    gateway = None if name else instance.running(store.dir)
    records, problems, hidden = _records(store, name, show_all)
    rows, failed_checks = _rows(cfg, store, records, offline, verbosity)
    problems.extend(failed_checks)
    # A live check that failed makes the exit code (its own); a damaged file
    # among many is reported but does not stop the listing from being valid.
    code = int(failed_checks[0].exit_code) if failed_checks else 0
    if as_json:
        click.echo(
            json.dumps(
                {
                    "sessions": [r for r, _ in rows],
                    "errors": [e.message for e in problems],
                    "gateway": _gateway_json(gateway),
                },
                indent=2,
            )
        )
        return code
    _print(rows, problems, gateway, hidden)
    return code


def _records(
    store: Store, name: str | None, show_all: bool
) -> tuple[list[SessionRecord], list[AlvisError], int]:
    """The sessions to show, the damaged files among them, and how many
    finished ones are left out as history."""
    problems: list[AlvisError] = []
    if name:
        from alvis_fsm.fronts.gateway.slot.sessions import session_of

        records = [store.load(check_name(session_of(store, name) or name))]
    else:
        records, errs = store.all()
        problems.extend(errs)
    hidden = 0
    if not name and not show_all:
        kept = [r for r in records if not is_history(r)]
        hidden, records = len(records) - len(kept), kept
    return records, problems, hidden


def _rows(
    cfg: Any, store: Store, records: list[SessionRecord], offline: bool, verbosity: Verbosity
) -> tuple[list[tuple[dict[str, Any], bool]], list[AlvisError]]:
    """Each session's row (checked live unless offline) and whether its
    check failed; the failed checks' errors, in order."""
    rows: list[tuple[dict[str, Any], bool]] = []
    failed_checks: list[AlvisError] = []
    for record in records:
        if offline or not _needs_check(record):
            rows.append((row(record), False))
            continue
        checked = _check(cfg, store, record, verbosity)
        rows.append(
            (
                row(
                    checked.record,
                    job_state=checked.job_state,
                    time_left=checked.time_left,
                    reachable=checked.reachable,
                ),
                checked.problem is not None,
            )
        )
        if checked.problem is not None:
            failed_checks.append(checked.problem)
    return rows, failed_checks


def _print(
    rows: list[tuple[dict[str, Any], bool]],
    problems: list[AlvisError],
    gateway: instance.Instance | None,
    hidden: int,
) -> None:
    from alvis_fsm.text import inert_line as clean

    if gateway is not None:
        click.echo(clean(_describe_gateway(gateway)))
    elif not rows and not problems and not hidden:
        click.echo("No sessions. Start one with `alvis-fsm start`.")

    for r, unverified in rows:
        line = _describe(r)
        if unverified:
            line += " · UNVERIFIED (the check failed; this is the last saved state)"
        click.echo(clean(line))
    if hidden:
        click.echo(
            f"({hidden} finished session{'s' if hidden != 1 else ''} older than a day:"
            " `alvis-fsm status --all`)"
        )
    for e in problems:
        click.echo(f"[ERROR] {e.message}", err=True)
        if e.hint:
            click.echo(f"[HINT] {e.hint}", err=True)


def _needs_check(record: SessionRecord) -> bool:
    from alvis_fsm.engine.session.service import needs_check

    return needs_check(record)


def _check(cfg: Any, store: Store, record: SessionRecord, verbosity: Verbosity) -> Status:
    from alvis_fsm.engine.session import service
    from alvis_fsm.fronts.cli.commands._common import reporter

    ui = reporter(Verbosity.QUIET if verbosity < Verbosity.VERBOSE else verbosity)
    return service.check(cfg, store, record, ui)


def _gateway_json(found: instance.Instance | None) -> dict[str, Any] | None:
    if found is None:
        return None
    data = found.to_json()
    data["log"] = found.log or None
    return data


def _describe_gateway(found: instance.Instance) -> str:
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(found.started))
    parts = [f"gateway: running · pid {found.pid} · {found.base_url} · since {since}"]
    parts.append(f"log {found.log}" if found.log else "in the foreground")
    parts.append("its sessions are marked (gateway); `alvis-fsm gateway stop` ends them all")
    return " · ".join(parts)


def _describe(r: dict[str, Any]) -> str:
    parts = [f"{r['name']}{' (gateway)' if r['gateway'] else ''}: {r['state']}"]
    if r["job_id"]:
        parts.append(f"job {r['job_id']}" + (f" ({r['job_state']})" if r["job_state"] else ""))
    if r["node"]:
        parts.append(f"node {r['node']}" + (f":{r['port']}" if r["port"] else ""))
    parts.append(f"model {r['model']}")
    if r["url"]:
        parts.append(
            r["url"]
            + (
                ""
                if r["reachable"] is None
                else " (answering)"
                if r["reachable"]
                else " (not answering)"
            )
        )
    if r["time_left"]:
        parts.append(f"{r['time_left']} left")
    if r["end_reason"] and r["state"] in ENDED_STATES:
        parts.append(r["end_reason"])
    return " · ".join(parts)
