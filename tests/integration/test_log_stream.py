"""The log stream after the ready block, on the lab (issue 31, item 4): a
request sent the moment a session connects leaves its access-log line in the
terminal that streams the logs, after `start` and after `resume` alike.

The request must be one the stream could not have seen before the fix: it is
sent while the tool is held (SIGSTOP) between vLLM found ready and the ready
block printed ("Testing connection..."), so its line is written before any
stream begins. The model is lab-slow, whose completions take 0.25 s: the
tool's own connection test is still waiting for its 1-token completion when
it is held."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import pexpect
import pytest
from tool import Tool, ctrl_c_leaves_nothing, free_port

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
OUR_LINE = r'\[VLLM OUT\] .*"POST /v1/chat/completions HTTP/1\.1" 200'


def ask(port: int, key: str) -> None:
    """One chat request through the tunnel (connection errors retried for 10 s)."""
    import httpx

    body = {"model": "lab-slow", "messages": [{"role": "user", "content": "at connect"}]}
    end = time.monotonic() + 10
    while True:
        try:
            reply = httpx.post(
                f"http://localhost:{port}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=5,
            )
            reply.raise_for_status()
            return
        except httpx.TransportError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def ask_while_held(child: pexpect.spawn, tool: Tool, port: int) -> None:
    """Hold the tool at "Testing connection..." and send a request meanwhile."""
    child.expect_exact("[INFO] Testing connection...")
    os.kill(child.pid, signal.SIGSTOP)
    try:
        # Held before the ready block: what it printed so far has no banner.
        with pytest.raises(pexpect.TIMEOUT):
            child.expect_exact(CONNECTED, timeout=0.5)
        data = json.loads((tool.state_dir / "sessions" / "lab-slow.json").read_text())
        ask(port, data["api_key"])
    finally:
        os.kill(child.pid, signal.SIGCONT)
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("[INFO] Streaming logs (Ctrl+C to stop and cleanup)...")


def test_a_request_at_connect_is_streamed_after_start(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn("start", "-m", "lab-slow", "--port", str(port), timeout=120)
    ask_while_held(child, tool, port)
    child.expect(OUR_LINE, timeout=15)
    # The load log is still not replayed after the ready block.
    assert "Application startup complete" not in child.before
    ctrl_c_leaves_nothing(child, lab, tool)


def test_a_request_at_connect_is_streamed_after_resume(lab: Any, tool: Tool) -> None:
    port = free_port()
    proc = tool.run_piped("start", "-m", "lab-slow", "--port", str(port), "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"Job submitted: \d+", proc.stdout), proc.stdout
    child = tool.spawn("resume", "lab-slow", timeout=120)
    ask_while_held(child, tool, port)
    child.expect(OUR_LINE, timeout=15)
    assert "Application startup complete" not in child.before
    ctrl_c_leaves_nothing(child, lab, tool)
