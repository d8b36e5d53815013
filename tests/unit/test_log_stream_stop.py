"""The log stream stops cleanly whenever the stop comes: a Ctrl+C or SIGTERM
raised while ``start`` sets the stream up (a signal handler raises in the
main thread between any two steps) must not leave ``stop`` joining a reader
thread that never started ("cannot join thread before it is started", seen
in a lab run of test_start.py::test_sigterm_while_tunneled), and must not
leave the stream's process behind."""

from __future__ import annotations

import subprocess
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from alvis_fsm.engine.session.log_stream import LogStream
from alvis_fsm.errors import StopRequested


def _link(procs: list[subprocess.Popen[bytes]]) -> Any:
    def stream(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        # Stands for the agent's ssh channel: it runs until its stdin closes.
        proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        return proc

    return SimpleNamespace(
        agent=SimpleNamespace(stream=stream),
        record=SimpleNamespace(run_dir="/r", job_id="1"),
        settings=SimpleNamespace(polling=SimpleNamespace(job_check_interval=5.0)),
        ui=SimpleNamespace(log_line=lambda *a: None),
    )


def test_a_stop_signal_while_the_reader_starts_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    stream = LogStream(_link(procs))

    def signalled(self: threading.Thread) -> None:
        raise StopRequested("SIGTERM")  # as the front's handler raises it

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", signalled)
        with pytest.raises(StopRequested):
            stream.start(0)
    stream.stop()  # the way out, as the runner takes it
    (proc,) = procs
    assert proc.poll() is not None, "the stream's process was left running"


def test_a_started_stream_stops() -> None:
    procs: list[subprocess.Popen[bytes]] = []
    stream = LogStream(_link(procs))
    stream.start(0)
    stream.stop()
    (proc,) = procs
    assert proc.poll() is not None
