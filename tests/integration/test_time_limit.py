"""The time limit as a normal end, on the lab: `start -t 1` connects, says
how long is left, warns before the end (SLURM cannot extend a running job),
and when SLURM ends the job at its limit says so and exits 0, leaving no
job and no ssh behind; `status --json` gives the end reason."""

from __future__ import annotations

import json
from typing import Any

import pexpect
from tool import Tool, assert_nothing_left, exit_status, free_port

CONNECTED = "✓ Connection successful! Server available at http://localhost:"


def test_job_ends_at_its_time_limit(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn("start", "-m", "lab-ok", "-t", "1", "--yes", "--port", str(port), timeout=240)
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect(r"Time left: 0:00:[0-5]\d")
    # The 60 s warning comes at once (less than a minute is left).
    child.expect(rf"Job {job_id} reaches its time limit \(0:01:00\) in 0:00:\d\d")
    child.expect_exact(f"Job {job_id} reached its time limit (0:01:00)", timeout=180)
    child.expect_exact(f"Cleaned up job {job_id} successfully", timeout=60)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    out = child.logfile_read.text
    assert exit_status(child) == 0, out[-3000:]
    assert "vLLM exited" not in out and "The job stopped" not in out
    assert lab.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"]).stdout.strip() == "TIMEOUT"
    proc = tool.run_piped("status", "--offline", "--json")
    (row,) = json.loads(proc.stdout)["sessions"]
    assert row["state"] == "cleaned" and row["end_reason"] == "time limit (0:01:00)"
    assert_nothing_left(lab, tool)
