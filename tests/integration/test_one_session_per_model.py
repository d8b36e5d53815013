"""One live session per model, whoever started it (issue 26, items 2 and 9),
on the lab: with `start -m lab-ok --detach` live, a gateway request for
lab-ok is served by that session (one job in squeue), the gateway says so,
and its shutdown leaves the session running; the direct endpoint answers
the catalog name as well as the served ORG/NAME."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pexpect
from tool import Tool, assert_nothing_left, free_port

ASK = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}


def test_the_gateway_adopts_a_live_start_session(lab: Any, tool: Tool) -> None:
    port = free_port()
    proc = tool.run_piped("start", "-m", "lab-ok", "--port", str(port), "--detach", timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"Job submitted: (\d+)", proc.stdout).group(1)  # type: ignore[union-attr]
    record = json.loads((tool.state_dir / "sessions" / "lab-ok.json").read_text())

    # Item 9: the catalog name and the served name, both on the direct endpoint.
    auth = {"Authorization": f"Bearer {record['api_key']}"}
    with httpx.Client(base_url=f"http://localhost:{port}/v1", trust_env=False, timeout=30) as http:
        for name in ("lab-ok", "alvislab/tiny-ok"):
            reply = http.post("/chat/completions", headers=auth, json={**ASK, "model": name})
            assert reply.status_code == 200, (name, reply.text)

    gw_port = free_port()
    child = tool.spawn("gateway", "--port", str(gw_port), timeout=90)
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact(f"Gateway on http://localhost:{gw_port}/v1")
    with httpx.Client(
        base_url=f"http://localhost:{gw_port}/v1", trust_env=False, timeout=120
    ) as http:
        reply = http.post(
            "/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={**ASK, "model": "lab-ok"},
        )
    assert reply.status_code == 200, reply.text
    child.expect_exact(
        f"serving through session 'lab-ok' (job {job_id}, started outside the gateway)"
    )
    assert lab.jobs() == [job_id]  # no second job for the model
    assert not (tool.state_dir / "sessions" / "gw-lab-ok.json").exists()

    child.sendintr()  # the gateway's shutdown lets go of it, never cancels it
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert lab.jobs() == [job_id]
    assert (
        json.loads((tool.state_dir / "sessions" / "lab-ok.json").read_text())["state"] == "tunneled"
    )

    done = tool.run_piped("stop", timeout=90)  # bare: the one live session
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Cleaned up job {job_id} successfully" in done.stdout + done.stderr
    assert_nothing_left(lab, tool)
