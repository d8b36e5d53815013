"""`alvis-fsm gateway` on the lab cluster (issue 14). One gateway serves the
whole first test, to keep the lab job starts few: the key and an unknown
model refused with nothing started, then three cold models at once (a
non-streaming request through the official openai client, a stream held
with keep-alive comments, a model that runs out of memory), then Ctrl+C:
no job and no ssh left."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from typing import Any

import httpx
import pexpect
import pytest
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt


def _gateway(tool: Tool, *args: str) -> tuple[pexpect.spawn, str, str]:
    port = free_port()
    child = tool.spawn("gateway", "--port", str(port), *args, timeout=90)
    child.expect(r"export OPENAI_BASE_URL=(\S+)")
    base = child.match.group(1)
    assert base == f"http://localhost:{port}/v1"
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact(f"Gateway on http://localhost:{port}/v1")
    return child, base, key


# three cold starts at once (auto's choices race: three A40s), more than the other stream leaves
@pytest.mark.exclusive
def test_gateway_starts_models_on_request_and_ctrl_c_leaves_nothing(lab, tool: Tool) -> None:
    from openai import OpenAI

    child, base, key = _gateway(tool)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        # Wrong key: 401 with an OpenAI-style body; unknown model: 404 listing the catalog.
        wrong = http.get("/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        unknown = http.post(
            "/chat/completions", headers=auth, json={"model": "nope", "messages": []}
        )
        assert unknown.status_code == 404 and "lab-ok" in unknown.json()["error"]["message"]
        listed = {m["id"]: m for m in http.get("/models", headers=auth).json()["data"]}
        assert listed["lab-ok"]["state"] == "cold" and listed["lab-ok"]["job_id"] is None
        assert listed["gpt-oss-20b"]["aliases"] == ["openai/gpt-oss-20b"]
        assert lab.jobs() == []  # listing started nothing

        results: dict[str, Any] = {}

        def plain() -> None:  # cold start by a non-streaming request, the official client
            client = OpenAI(base_url=base, api_key=key, timeout=120, max_retries=0)
            reply = client.chat.completions.create(
                model="lab-ok", messages=[{"role": "user", "content": "Hello"}]
            )
            results["plain"] = reply

        def stream() -> None:  # a stream to a cold model, named by its served alias
            lines = []
            with (
                httpx.Client(base_url=base, trust_env=False, timeout=120) as c,
                c.stream(
                    "POST",
                    "/chat/completions",
                    headers=auth,
                    json={
                        "model": "openai/gpt-oss-20b",
                        "stream": True,
                        "messages": [{"role": "user", "content": "Hello"}],
                    },
                ) as resp,
            ):
                results["stream_status"] = resp.status_code
                lines = [x for x in resp.iter_lines() if x]
            results["stream"] = lines

        def oom() -> None:
            with httpx.Client(base_url=base, trust_env=False, timeout=120) as c:
                results["oom"] = c.post(
                    "/chat/completions", headers=auth, json={"model": "lab-oom", "messages": []}
                )

        threads = [threading.Thread(target=f) for f in (plain, stream, oom)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert results["plain"].choices[0].message.content == "Hello from the alvis-lab stand-in"
        assert results["plain"].model == "alvislab/tiny-ok"  # served name, rewritten by the gateway
        assert results["stream_status"] == 200
        lines = results["stream"]
        comments = [x for x in lines if x.startswith(":")]
        assert comments and all(
            re.match(r": keep-alive (queued|loading|ready)", c) for c in comments
        )
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert "Hello from the alvis-lab stand-in" in "".join(
            json.loads(x[6:])["choices"][0]["delta"].get("content") or "" for x in data[:-1]
        )
        assert lines.index(data[0]) > lines.index(comments[-1])
        oomed = results["oom"]
        assert oomed.status_code == 503
        assert "out of memory" in oomed.json()["error"]["message"].lower()

        listed = {m["id"]: m for m in http.get("/models", headers=auth).json()["data"]}
        assert listed["lab-ok"]["state"] == "ready" and listed["gpt-oss-20b"]["state"] == "ready"
        assert listed["lab-oom"]["state"] == "failed"
        jobs = {listed["lab-ok"]["job_id"], listed["gpt-oss-20b"]["job_id"]}
        assert jobs <= set(lab.jobs()) and len(jobs) == 2

        # A long stream (vLLM's ignore_eos: one event per token, each its own
        # chunk) passes through whole and in order.
        with http.stream(
            "POST",
            "/chat/completions",
            headers=auth,
            timeout=60,
            json={
                "model": "lab-ok",
                "stream": True,
                "max_tokens": 500,
                "ignore_eos": True,
                "messages": [],
            },
        ) as resp:
            assert resp.status_code == 200
            events = [x[6:] for x in resp.iter_lines() if x.startswith("data: ")]
        assert (
            events[-1] == "[DONE]" and len(events) == 502
        )  # role, 500 tokens (the last one ends), DONE
        said = "".join(
            json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
        )
        assert said == "".join(f" t{i}" for i in range(500))

        # Each tunnel ends in a unix socket only this user can open, not on a
        # port any process on the laptop could use.
        record = json.loads((tool.state_dir / "sessions" / "gw-lab-ok.json").read_text())
        assert record["local_port"] == 0
        end = os.stat(record["local_socket"])
        assert stat.S_ISSOCK(end.st_mode) and end.st_mode & 0o077 == 0
        assert os.stat(os.path.dirname(record["local_socket"])).st_mode & 0o077 == 0

    interrupt(child)
    child.expect_exact("Gateway stopped; nothing left running", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0
    assert lab.jobs() == []  # root's squeue: nothing of the user's left
    assert not os.path.exists(record["local_socket"])  # ssh's socket file is removed too
    assert_nothing_left(lab, tool)


def test_idle_model_is_cancelled_and_started_again(lab, tool: Tool) -> None:
    from openai import OpenAI

    child, base, key = _gateway(tool, "--idle", "2s")
    client = OpenAI(base_url=base, api_key=key, timeout=120, max_retries=0)
    ask = {"model": "lab-ok", "messages": [{"role": "user", "content": "Hi"}]}
    assert client.chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]
    # Idle: the job is cancelled (confirmed), the session ends.
    child.expect(r"\[lab-ok\] Cleaned up job \d+ successfully", timeout=60)
    child.expect_exact("[lab-ok] stopped")
    assert lab.jobs() == []
    assert client.chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]
    interrupt(child)
    child.expect_exact("Gateway stopped; nothing left running", timeout=60)
    child.expect(pexpect.EOF)
    assert_nothing_left(lab, tool)
