"""Batches through the gateway on the lab (issue 23), with the official
openai client: files.create, batches.create, then the gateway stops (the
batch runs on), a restarted gateway retrieves it completed, and
files.content gives every answer once, in input order."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pexpect
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt


def _gateway(tool: Tool) -> tuple[pexpect.spawn, str, str]:
    port = free_port()
    child = tool.spawn("gateway", "--port", str(port), timeout=90)
    child.expect(r"export OPENAI_BASE_URL=(\S+)")
    base = child.match.group(1)
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact(f"Gateway on http://localhost:{port}/v1")
    return child, base, key


def _stop(child: pexpect.spawn) -> None:
    interrupt(child)
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert exit_status(child) in (0, 130)


def test_the_openai_client_runs_a_batch_through_the_gateway(lab: Any, tool: Tool) -> None:
    from openai import OpenAI

    ids = [f"q{i}" for i in range(30)]
    data = b"".join(
        json.dumps(
            {
                "custom_id": cid,
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "lab-ok", "prompt": cid, "max_tokens": 3},
            }
        ).encode()
        + b"\n"
        for cid in ids
    )
    child, base, key = _gateway(tool)
    client = OpenAI(base_url=base, api_key=key, max_retries=0)
    f = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"test": "lab"},
    )
    assert (
        b.id.startswith("batch_") and b.request_counts is not None and b.request_counts.total == 30
    )
    _stop(child)  # the batch runs on the cluster, not in the gateway
    assert [
        j
        for j in lab.run(["squeue", "-h", "-u", lab.user, "-o", "%j"]).stdout.split()
        if j == f"alvis-fsm-{b.id}"
    ]
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline
        and lab.run(
            ["squeue", "-h", "-u", lab.user, "-n", f"alvis-fsm-{b.id}", "-o", "%i"]
        ).stdout.strip()
    ):
        time.sleep(2)
    child, base, key = _gateway(tool)  # a restarted gateway sees it
    client = OpenAI(base_url=base, api_key=key, max_retries=0)
    done = client.batches.retrieve(b.id)
    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == 30
    assert done.output_file_id and done.error_file_id is None
    rows = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in rows] == ids
    assert rows[0]["response"]["body"]["object"] == "text_completion"
    assert [x.id for x in client.batches.list(limit=5).data] == [b.id]
    _stop(child)
    assert_nothing_left(lab, tool)
