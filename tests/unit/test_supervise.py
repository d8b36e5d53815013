"""The hand-over of a detached session to its background supervisor:
`start --detach` returns only once the supervisor holds the session's lock
and is named in its record, so a `stop` run at once takes over from it
instead of racing it for the lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from alvis_fsm.engine.session import ownership
from alvis_fsm.engine.session.store import Driver, SessionRecord, Store
from alvis_fsm.fronts.common import supervisor_command
from tests.unit.fake_cluster import Say

# A stand-in for `alvis-fsm _supervise NAME`: it waits for the lock the way
# the real one does (its starter still holds it), then records itself.
STAND_IN = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from alvis_fsm.engine.session.store import Driver, Store
    from alvis_fsm.errors import SessionError
    store = Store(Path(sys.argv[1]))
    while True:
        try:
            with store.lock("s"):
                record = store.load("s")
                record.drive_as(Driver.SUPERVISOR, os.getpid())
                store.save(record)
                time.sleep(60)
        except SessionError:
            time.sleep(0.2)
    """
)


def _handover(store: Store, argv: list[str]) -> ownership.Handover:
    handover = ownership.Handover(store, supervisor_command)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    handover._spawned = ("s", proc)
    return handover


def test_wait_returns_once_the_supervisor_holds_the_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.save(SessionRecord(name="s", model="m", state="tunneled", driver=Driver.HANDING_OVER))
    say = Say()
    with store.lock("s"):  # the detaching command, until the engine returns
        handover = _handover(store, [sys.executable, "-c", STAND_IN, str(store.dir)])
        assert handover._spawned is not None
        proc = handover._spawned[1]
    try:
        assert handover.wait(say, timeout=30) is True
        assert store.holder("s") == proc.pid
        assert store.load("s").driven_by(Driver.SUPERVISOR, proc.pid)
        assert say.lines == []
    finally:
        proc.kill()
        proc.wait()


def test_a_supervisor_that_exits_is_reported_not_waited_for(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.save(SessionRecord(name="s", model="m", state="tunneled", driver=Driver.HANDING_OVER))
    say = Say()
    handover = _handover(store, [sys.executable, "-c", "raise SystemExit(1)"])
    assert handover.wait(say, timeout=30) is False
    [(kind, message)] = say.lines
    assert kind == "warn"
    assert "did not take over" in message and "s.supervisor.log" in message
    assert "alvis-fsm resume s" in message


def test_nothing_spawned_nothing_to_wait_for(tmp_path: Path) -> None:
    say = Say()
    assert (
        ownership.Handover(Store(tmp_path / "state"), supervisor_command).wait(say, timeout=0.1)
        is True
    )
    assert say.lines == []
