"""Read-only looks at a session: what `logs` and `status` read.

A look needs no state machine and saves nothing: another client may be
driving the session. It reuses the session's shared connection when that is
up and never opens or closes it; when it is down, the look opens a private
connection of its own and closes it (``link.open_link(look=True)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alvis_fsm.engine.observer import Observer
from alvis_fsm.engine.session.link import Link, open_link
from alvis_fsm.engine.session.log_stream import LogStream
from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.errors import SessionError
from alvis_fsm.text import inert_line

if TYPE_CHECKING:
    from alvis_fsm.engine.settings.model import Settings


def look(
    settings: Settings, record: SessionRecord, store: Store, ui: Observer, **handles: Any
) -> Link:
    """The session's read-only link (``handles``: a connection and an agent
    handed in, as unit tests do)."""
    return open_link(settings, record, store, ui, look=True, **handles)


def show_logs(link: Link, lines: int, follow: bool) -> None:
    """vLLM's last ``lines`` log lines; ``follow`` streams until the job ends
    (or KeyboardInterrupt), saying how it ended."""
    r = link.record
    if not r.run_dir or r.state == State.IDLE:
        raise SessionError(f"Session '{r.name}' has no job yet, so no logs")
    opened = not link.conn.alive()
    link.conn.open()
    stream = LogStream(link)
    try:
        if not follow:
            for name, text in link.agent.tail(r.run_dir, lines):
                link.ui.log_line(name, inert_line(text))
            return
        stream.start(lines)
        while True:
            news = stream.next_event(timeout=0.5)
            if news is None:
                if stream.ended():
                    break
                continue
            if not news.ends_job:
                # The scheduler did not answer: not news of the job, whose
                # logs go on. Say so, and follow on.
                link.ui.warn(f"{news.says(r.job_id)}; following on")
                continue
            link.ui.info(news.says(r.job_id))
            break
    except KeyboardInterrupt:
        pass
    finally:
        stream.stop()
        if opened:
            link.conn.close()
