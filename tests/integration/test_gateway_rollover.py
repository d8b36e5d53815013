"""The gateway's rollover on the lab cluster (issue 14): a job with a short
time limit (3 minutes) and a rollover lead of 150 s, so the successor starts
about 30 s after the first job runs. A stream of requests (one at a time,
every third a stream) runs across the rollover: none fails, the model's job
id changes, the old job is cancelled and only the successor is left; then
Ctrl+C leaves nothing."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pexpect
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt, tool_jobs

ASK = {"model": "lab-ok", "messages": [{"role": "user", "content": "Hello"}]}


class Stream:
    """Requests one after another in a thread until stopped; every failure kept."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.auth = {"Authorization": f"Bearer {key}"}
        self.done = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, http: httpx.Client, streaming: bool) -> None:
        if not streaming:
            resp = http.post("/chat/completions", headers=self.auth, json=ASK)
            ok = resp.status_code == 200
            content = resp.json()["choices"][0]["message"]["content"] if ok else ""
            if "Hello from the alvis-lab stand-in" not in content:
                self.failures.append(f"{resp.status_code}: {resp.text[:300]}")
            return
        with http.stream(
            "POST", "/chat/completions", headers=self.auth, json={**ASK, "stream": True}
        ) as resp:
            lines = [x for x in resp.iter_lines() if x.startswith("data: ")]
        text = "".join(
            json.loads(x[6:])["choices"][0]["delta"].get("content") or ""
            for x in lines[:-1]
            if '"choices"' in x
        )
        if resp.status_code != 200 or lines[-1:] != ["data: [DONE]"] or "Hello from" not in text:
            self.failures.append(f"stream {resp.status_code}: {lines[-3:]}")

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, trust_env=False, timeout=120) as http:
            while not self.stop.is_set():
                try:
                    self._one(http, streaming=self.done % 3 == 2)
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self.done += 1


def test_rollover_under_a_request_stream_fails_no_request(lab, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn(
        "gateway",
        "--port",
        str(port),
        timeout=90,
        ALVIS_FSM_SLURM__TIME="0:03:00",
        ALVIS_FSM_GATEWAY__ROLLOVER_LEAD="150",
    )
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact(f"Gateway on http://localhost:{port}/v1")
    base = f"http://localhost:{port}/v1"
    stream = Stream(base, key)
    stream.thread.start()
    jobs: list[str] = []  # the model's job ids, in the order seen
    time_left = None
    try:
        with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                rows = http.get("/models", headers=stream.auth).json()["data"]
                row = next(r for r in rows if r["id"] == "lab-ok")
                if row["job_id"] and row["job_id"] not in jobs:
                    jobs.append(row["job_id"])
                if row["state"] == "ready" and time_left is None:
                    time_left = row["time_left"]
                if len(jobs) >= 2 and jobs[0] not in lab.jobs():
                    break
                time.sleep(0.5)
            # Only the successor is left of the gateway's jobs.
            assert len(jobs) == 2, jobs
            assert tool_jobs(lab, tool) == [jobs[1]]
            assert row["job_id"] == jobs[1] and row["state"] == "ready"
            served_after = stream.done
            while stream.done < served_after + 3:  # the successor serves
                time.sleep(0.2)
    finally:
        stream.stop.set()
        stream.thread.join(120)
    assert stream.failures == []
    assert isinstance(time_left, int) and 0 < time_left <= 180
    child.expect_exact(f"[lab-ok] rolled over: job {jobs[0]} → job {jobs[1]}", timeout=5)
    child.expect(rf"\[lab-ok\] Cleaned up job {jobs[0]}", timeout=5)
    interrupt(child)
    child.expect_exact("Gateway stopped; nothing left running", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0
    assert_nothing_left(lab, tool)
