"""The gateway's cold start by a request, on the REAL vLLM 0.11.0 (issue 21):
one request through the official openai client starts the lab's tiny real
model, a stream follows on the warm server, Ctrl+C leaves nothing."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pexpect
import pytest
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt

pytestmark = pytest.mark.realvllm


def test_gateway_cold_starts_the_real_server_on_a_request(lab: Any, tool: Tool) -> None:
    from openai import OpenAI

    port = free_port()
    child = tool.spawn("gateway", "--port", str(port), timeout=90)
    child.expect(r"export OPENAI_BASE_URL=(\S+)")
    base = child.match.group(1)
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact(f"Gateway on http://localhost:{port}/v1")
    assert lab.jobs() == []

    results: dict[str, Any] = {}

    def requests() -> None:
        try:
            client = OpenAI(base_url=base, api_key=key, timeout=400, max_retries=0)
            results["chat"] = client.chat.completions.create(
                model="tiny-real",
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=6,
                extra_body={"ignore_eos": True},
            )
            with (
                httpx.Client(base_url=base, trust_env=False, timeout=60) as http,
                http.stream(
                    "POST",
                    "/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={
                        "model": "tiny-real",
                        "stream": True,
                        "max_tokens": 4,
                        "ignore_eos": True,
                        "messages": [{"role": "user", "content": "Hi"}],
                    },
                ) as resp,
            ):
                results["stream_status"] = resp.status_code
                results["stream"] = [x for x in resp.iter_lines() if x]
        except Exception as exc:  # shown by the assertions below
            results["error"] = exc

    worker = threading.Thread(target=requests)
    worker.start()
    while worker.is_alive():  # keep reading the gateway's terminal meanwhile
        child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=0.5)
    worker.join()
    out = child.logfile_read.text
    assert "error" not in results, f"{results.get('error')!r}\n{out[-3000:]}"
    reply = results["chat"]
    assert reply.model == "alvislab/tiny-real"  # the real server's name for it
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    assert results["stream_status"] == 200
    data = [x for x in results["stream"] if x.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert len(lab.jobs()) == 1  # one start for both requests

    interrupt(child)
    child.expect_exact("Gateway stopped; nothing left running", timeout=90)
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0
    assert_nothing_left(lab, tool)
