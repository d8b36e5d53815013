"""The gateway's command-line surface on the lab cluster (issue 14):
`gateway --detach` returns with the exports and keeps serving; `env
--gateway`, `status` and `logs MODEL` see it; `gateway stop` cancels its
jobs (confirmed) and leaves nothing. And a burst of 50 requests to a cold
model through it makes exactly one job."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from tool import Tool, assert_nothing_left, free_port

ASK = {"model": "lab-ok", "messages": [{"role": "user", "content": "Hello"}]}
REPLY = "Hello from the alvis-lab stand-in"


@pytest.fixture
def gateway_tool(tool: Tool) -> Iterator[Tool]:
    """The tool, and afterwards no background gateway of it left (a test
    that failed half-way): SIGTERM, as `gateway stop` sends, so its jobs are
    cancelled before Tool.close kills what ssh is left."""
    yield tool
    path = tool.state_dir / "gateway.json"
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
    except ProcessLookupError:
        pass


def detach(tool: Tool) -> tuple[str, str, str]:
    """`gateway --detach`: (base URL, key, stdout); it listens on return."""
    port = free_port()
    done = tool.run_piped("gateway", "--detach", "--port", str(port), timeout=90)
    assert done.returncode == 0, done.stderr
    m = re.fullmatch(r"export OPENAI_BASE_URL=(\S+)\nexport OPENAI_API_KEY=(\S+)\n", done.stdout)
    assert m, done.stdout
    assert m.group(1) == f"http://localhost:{port}/v1"
    assert str(tool.state_dir / "gateway.log") in done.stderr
    assert "alvis-fsm gateway stop" in done.stderr
    return m.group(1), m.group(2), done.stdout


def stop_gateway(tool: Tool) -> None:
    done = tool.run_piped("gateway", "stop", timeout=150)
    assert done.returncode == 0, done.stderr
    assert "Gateway stopped; nothing left running" in done.stdout
    assert not (tool.state_dir / "gateway.json").exists()


def test_detached_gateway_env_status_logs_and_stop(lab: Any, gateway_tool: Tool) -> None:
    from openai import OpenAI

    tool = gateway_tool
    base, key, exports = detach(tool)
    again = tool.run_piped("env", "--gateway")
    assert again.returncode == 0 and again.stdout == exports and again.stderr == ""

    client = OpenAI(base_url=base, api_key=key, timeout=120, max_retries=0)
    reply = client.chat.completions.create(**ASK)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == REPLY
    (job_id,) = lab.jobs()

    status = tool.run_piped("status", timeout=60)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert re.match(rf"gateway: running · pid \d+ · {re.escape(base)} · ", lines[0]), status.stdout
    gw = [x for x in lines if x.startswith("gw-lab-ok (gateway): tunneled")]
    assert gw and f"job {job_id} (RUNNING)" in gw[0], status.stdout
    as_json = json.loads(tool.run_piped("status", "--json", timeout=60).stdout)
    assert as_json["gateway"]["base_url"] == base
    (row,) = [s for s in as_json["sessions"] if s["name"] == "gw-lab-ok"]
    assert row["gateway"] is True and row["job_id"] == job_id and row["reachable"] is True

    logs = tool.run_piped("logs", "lab-ok", "-n", "20", timeout=60)
    assert logs.returncode == 0, logs.stderr
    assert re.search(
        r"\[VLLM ERR\] \(APIServer pid=\d+\) INFO:     Application startup complete\.", logs.stdout
    )
    assert any("POST /v1/chat/completions" in x for x in logs.stdout.splitlines()), logs.stdout

    stop_gateway(tool)
    assert lab.jobs() == []
    assert_nothing_left(lab, tool)
    status = tool.run_piped("status", "--offline")
    assert "gateway: running" not in status.stdout
    assert "gw-lab-ok (gateway): cleaned" in status.stdout


def test_a_burst_of_50_requests_to_a_cold_model_makes_one_job(lab: Any, gateway_tool: Tool) -> None:
    tool = gateway_tool
    base, key, _ = detach(tool)
    auth = {"Authorization": f"Bearer {key}"}
    seen: set[str] = set()  # every job of the user squeue lists during the burst
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(lab.jobs())
            time.sleep(0.2)

    def ask(_: int) -> tuple[int, str]:
        with httpx.Client(base_url=base, trust_env=False, timeout=150) as http:
            resp = http.post("/chat/completions", headers=auth, json=ASK)
            body = resp.json()
            return resp.status_code, body["choices"][0]["message"][
                "content"
            ] if resp.is_success else str(body)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(ask, range(50)))
    finally:
        done.set()
        watcher.join()
    seen.update(lab.jobs())
    assert answers == [(200, REPLY)] * 50
    with httpx.Client(trust_env=False, timeout=30) as http:
        gw = http.get(base.removesuffix("/v1") + "/gateway/status", headers=auth).json()
    (model,) = [m for m in gw["models"] if m["id"] == "lab-ok"]
    assert model["sessions_started"] == 1 and model["requests_served"] == 50
    assert seen == {model["job_id"]}  # one job, the model's, and never another
    assert [m["id"] for m in gw["models"] if m["sessions_started"]] == ["lab-ok"]

    stop_gateway(tool)
    assert lab.jobs() == []
    assert_nothing_left(lab, tool)


def test_jobs_of_a_killed_gateway_are_cancelled_by_the_next(lab: Any, gateway_tool: Tool) -> None:
    """A gateway killed with no shutdown (SIGKILL, a crash) leaves a job
    burning and its session live; the next gateway cancels it (confirmed)
    and serves the model again with a new job."""
    from openai import OpenAI

    tool = gateway_tool
    base, key, _ = detach(tool)
    client = OpenAI(base_url=base, api_key=key, timeout=120, max_retries=0)
    assert client.chat.completions.create(**ASK).choices[0].message.content == REPLY  # type: ignore[call-overload]
    (orphan,) = lab.jobs()
    pid = int(json.loads((tool.state_dir / "gateway.json").read_text())["pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (tool.state_dir / "gateway.json").exists():
        time.sleep(0.1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
    assert lab.jobs() == [orphan]  # nobody cancelled it

    base, key, _ = detach(tool)
    # Gone from squeue comes before the scheduler's confirmation is logged:
    # wait for both.
    cleaned = f"Cleaned up job {orphan} successfully"
    log_file = tool.state_dir / "gateway.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        orphan in lab.jobs() or cleaned not in log_file.read_text()
    ):
        time.sleep(0.5)
    assert orphan not in lab.jobs()
    log = log_file.read_text()
    assert "[gw-lab-ok] left live by a gateway that did not shut down" in log
    assert cleaned in log
    client = OpenAI(base_url=base, api_key=key, timeout=120, max_retries=0)
    assert client.chat.completions.create(**ASK).choices[0].message.content == REPLY  # type: ignore[call-overload]
    (fresh,) = lab.jobs()
    assert fresh != orphan
    stop_gateway(tool)
    assert lab.jobs() == []
    assert_nothing_left(lab, tool)
