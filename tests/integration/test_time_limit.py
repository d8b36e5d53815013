"""The time limit as a normal end, on the lab: `start -t 1` connects, says
how long is left, warns before the end (SLURM cannot extend a running job),
and when SLURM ends the job at its limit says so and exits 0, leaving no
job and no ssh behind; `status --json` gives the end reason."""

from __future__ import annotations

import json
from typing import Any

import pexpect
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt

CONNECTED = "✓ Connection successful! Server available at http://localhost:"


def test_job_ends_at_its_time_limit(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn(
        "start", "-m", "lab-ok", "-t", "1", "--yes", "--port", str(port), timeout=240
    )
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect(r"Time left: 0:00:([0-5]\d)")
    left = int(child.match.group(1))
    # A minute is what was asked: no warning at connect (issue 31, item 5),
    # but once, when a quarter of the job is left (0:00:15).
    assert left > 20, f"the lab took {60 - left} s to connect a one-minute job"
    warning = rf"Job {job_id} reaches its time limit \(0:01:00\) in 0:00:\d\d"
    assert child.expect([warning, pexpect.TIMEOUT], timeout=min(5, left - 16)) == 1, child.before
    child.expect(rf"Job {job_id} reaches its time limit \(0:01:00\) in 0:00:(1[0-5]|0\d)")
    child.expect_exact(f"Job {job_id} reached its time limit (0:01:00)", timeout=180)
    child.expect_exact(f"Cleaned up job {job_id} successfully", timeout=60)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    out = child.logfile_read.text
    assert exit_status(child) == 0, out[-3000:]
    assert "vLLM exited" not in out and "The job stopped" not in out
    assert out.count("reaches its time limit") == 1, out[-3000:]
    assert (
        lab.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"]).stdout.strip()
        == "TIMEOUT"
    )
    proc = tool.run_piped("status", "--offline", "--json")
    (row,) = json.loads(proc.stdout)["sessions"]
    assert row["state"] == "cleaned" and row["end_reason"] == "time limit (0:01:00)"
    assert_nothing_left(lab, tool)


def test_no_warning_at_connect_for_the_time_asked(lab: Any, tool: Tool) -> None:
    """`start -t 0:10:00` (issue 31, item 5): ten minutes is what was asked
    for, so no time-limit warning comes with the ready block; the 10-minute
    lead is longer than a quarter of the job and is not applied to it."""
    port = free_port()
    child = tool.spawn(
        "start", "-m", "lab-ok", "-t", "0:10:00", "--yes", "--port", str(port), timeout=120
    )
    child.expect(r"Job submitted: (\d+)")
    child.expect_exact(CONNECTED + str(port))
    child.expect(r"Time left: 0:09:\d\d")
    child.expect_exact("[INFO] Streaming logs (Ctrl+C to stop and cleanup)...")
    # The serve loop looks at the time left about twice a second.
    assert child.expect(["reaches its time limit", pexpect.TIMEOUT], timeout=5) == 1, child.before
    interrupt(child)
    child.expect_exact("Cleaned up job")
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0
    assert "reaches its time limit" not in child.logfile_read.text
    assert_nothing_left(lab, tool)
