"""The background keeper of a detached session (``start --detach``,
``resume --detach``), the hidden ``_supervise NAME``: it drives the session
from ``tunneled`` with the same loop as a foreground client, so a tunnel
that drops (Wi-Fi change, sleep) is reopened without anyone running `resume`.

It never ends a job. It lets go (exits, leaving job, tunnel and state) when
asked to (SIGTERM: `stop` and `resume` take over that way), when the job
ends (`status` then reports how), and when the job's time limit has passed.
While the network is gone it waits with backoff. Its output goes to
``sessions/NAME.supervisor.log`` in the state directory. All of that is the
engine's (engine/session/ownership.py); this is the terminal's part: its signals."""

from __future__ import annotations

from alvis_fsm.engine.session.store import Store
from alvis_fsm.fronts import signals
from alvis_fsm.fronts.cli.commands._common import reporter, settings
from alvis_fsm.fronts.ui import Verbosity


def run(name: str) -> None:
    from alvis_fsm.engine.session import ownership

    cfg = settings()
    ownership.run_supervisor(
        cfg,
        Store(cfg.state_dir),
        name,
        reporter(Verbosity.NORMAL),
        drive=signals.drive,
        shield=signals.shielded,
    )
