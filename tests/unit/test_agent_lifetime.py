"""Nothing the agent starts outlives its channel (issue 22, finding 9): a
wait whose reader has gone ends within a second or so (its once-a-second
"." line cannot be written), not when its slice runs out. The agent runs
here under bash with its stdout a pipe that the test closes, as sshd's is
when the client goes away."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from alvis_fsm.cluster.agent import agent_argv


def test_a_wait_ends_when_its_reader_is_gone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sacct"):  # a scheduler that answers "pending", at once
        (bin_dir / tool).write_text("#!/bin/sh\necho 'PENDING|||(Priority)||'\n")
        (bin_dir / tool).chmod(0o755)
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        agent_argv("wait-start", {"run": run, "job": 42, "slice": 600, "interval": 0.1}),
        stdin=subprocess.DEVNULL,
        stdout=write_end,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as out:
        seen = b""
        while b"JOB|squeue|PENDING" not in seen:  # the agent is waiting now
            line = out.readline()
            assert line, seen
            seen += line
    # The reader is gone. A 600 s slice must not keep the agent on the login node.
    try:
        assert proc.wait(timeout=30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
