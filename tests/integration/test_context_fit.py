"""Context that fits, on the lab (issue 15): when vLLM refuses max_model_len
because the KV cache cannot hold it, and says what would fit, the tool
starts once more with that length, says so, and suggests the catalog line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pexpect
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt

CONNECTED = "✓ Connection successful! Server available at http://localhost:"


def test_kv_cache_refusal_is_retried_once_with_the_length_that_fits(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn("start", "-m", "lab-long", "--port", str(port), timeout=180)
    child.expect(r"Job submitted: (\d+)")
    first = child.match.group(1)
    child.expect_exact(f"Cleaned up job {first} successfully")
    child.expect_exact("vLLM refused max_model_len 32768 for lab-long")
    child.expect_exact("Starting once more with max_model_len 8192")
    child.expect_exact('set "max_model_len": 8192 for lab-long in your catalog')
    child.expect(r"Job submitted: (\d+)")
    second = child.match.group(1)
    assert second != first
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Streaming logs")
    interrupt(child)
    child.expect_exact(f"Cleaned up job {second} successfully", timeout=60)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    out = child.logfile_read.text
    assert exit_status(child) == 0, out[-3000:]
    assert "estimated maximum model length is 8192" in out  # vLLM's own words were shown
    # The second job was rendered with the length that fits (its run dir,
    # on the lab's shared storage, keeps the job script).
    record = json.loads((tool.state_dir / "sessions" / "lab-long.json").read_text())
    assert record["job_id"] == second
    script = (Path(record["run_dir"]) / "job.sh").read_text()
    assert re.search(r"^MAX_MODEL_LEN=8192$", script, re.M), script[:2000]
    assert_nothing_left(lab, tool)


def test_auto_fit_off_fails_with_the_cause(lab: Any, tool: Tool) -> None:
    status, out = tool.run(
        "start",
        "-m",
        "lab-long",
        "--port",
        str(free_port()),
        timeout=180,
        ALVIS_FSM_VLLM__AUTO_FIT="false",
    )
    assert status == 6, out[-3000:]
    assert "estimated maximum model length is 8192" in out
    assert "Starting once more" not in out
    assert_nothing_left(lab, tool)
