"""The gateway's page, /metrics and request log (issue 25) over HTTP, with
fake sessions (test_gateway_http's) and a fake vLLM that reports usage: who
may see and press what, what the counters say, what the log keeps."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from gateway_client import client_of
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_http import FakeSession

from alvis_fsm.fronts.gateway.observe import requestlog
from alvis_fsm.fronts.gateway.observe.requestlog import Entry, RequestLog
from alvis_fsm.fronts.gateway.page.routes import Page
from alvis_fsm.fronts.gateway.server import Gateway, Options
from alvis_fsm.fronts.gateway.slot.models import Models
from alvis_fsm.fronts.gateway.slot.recorder import Recorder

KEY = "gw-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "a prompt nobody else may read"


async def _upstream() -> tuple[web.AppRunner, int]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):  # one event per word, the usage last (include_usage)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for word in ("one", "two"):
                await resp.write(
                    b"data: "
                    + json.dumps({"choices": [{"delta": {"content": word}}]}).encode()
                    + b"\n\n"
                )
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            await resp.write(
                b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
            )
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response(
            {
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, next(a[1] for a in runner.addresses if isinstance(a, tuple))


Scenario = Callable[[httpx.AsyncClient, Page, str], Awaitable[None]]


def run(scenario: Scenario, state_dir: Path) -> None:
    async def main() -> None:
        up, port = await _upstream()

        def fake(model: str, observer: Recorder, lane: int) -> FakeSession:
            return FakeSession(model, observer, port, 0.1, False)

        models = Models({"m1": "org/m1", "m2": "org/m2"}, fake)
        gateway = Gateway(
            KEY,
            models,
            Options(hold_timeout=10, idle_timeout=60, keepalive_interval=0.1, idle_check=0.05),
        )
        page = gateway.page = Page(gateway, RequestLog(state_dir), stop_timeout=10)
        try:
            async with client_of(gateway) as client:
                base = str(client.base_url)
                host = f"localhost:{base.rsplit(':', 1)[1]}"
                client.headers["Host"] = host
                try:
                    await scenario(client, page, host)
                finally:
                    assert await models.shutdown(10) == []
        finally:
            await up.cleanup()

    asyncio.run(main())


async def _sign_in(client: httpx.AsyncClient, page: Page) -> str:
    """Follow a login link; the page's CSRF token."""
    resp = await client.get(f"/?token={page.new_login_token()}")
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    page_html = (await client.get("/")).text
    found = re.search(r'name="csrf-token" content="([^"]+)"', page_html)
    assert found
    return found.group(1)


def test_without_the_cookie_nothing_is_shown_and_a_link_works_once(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, page: Page, host: str) -> None:
        for path in ("/", "/gateway/page/state", "/gateway/static/app.js", "/metrics"):
            resp = await client.get(path)
            assert resp.status_code == 401, path
            assert "m1" not in resp.text
        resp = await client.post("/gateway/page/models/m1/stop")
        assert resp.status_code == 401
        token = page.new_login_token()
        resp = await client.get(f"/?token={token}")
        assert resp.status_code == 303
        cookie = resp.headers["Set-Cookie"]
        port = host.rsplit(":", 1)[1]
        assert cookie.startswith(f"alvis_fsm_gateway_{port}=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        # The same link again (another browser): refused.
        async with httpx.AsyncClient(
            base_url=client.base_url, headers={"Host": host}, trust_env=False
        ) as other:
            again = await other.get(f"/?token={token}")
            assert again.status_code == 401 and "used already" in again.text
            assert (await other.get("/gateway/page/state")).status_code == 401
        # Signed in: the page, its script (nothing from elsewhere), its data.
        resp = await client.get("/")
        assert resp.status_code == 200 and "csrf-token" in resp.text
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert not re.search(r'(src|href)="(https?:)?//', resp.text)
        assert (await client.get("/gateway/static/app.js")).status_code == 200
        state = (await client.get("/gateway/page/state")).json()
        assert [m["state"] for m in state["models"]] == ["cold", "cold"]
        assert state["batches"] == []
        # Another Host (DNS rebinding): refused even with the cookie.
        assert (
            await client.get("/gateway/page/state", headers={"Host": "evil.example:80"})
        ).status_code == 403
        # The login link needs the gateway key.
        assert (await client.post("/gateway/login-link")).status_code == 401
        made = (await client.post("/gateway/login-link", headers=AUTH)).json()["url"]
        assert made.startswith(f"http://localhost:{port}/?token=")

    run(scenario, tmp_path)


def test_buttons_need_the_csrf_token_and_the_same_origin(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, page: Page, host: str) -> None:
        csrf = await _sign_in(client, page)
        resp = await client.post(
            "/v1/chat/completions", headers=AUTH, json={"model": "m1", "messages": []}
        )
        assert resp.status_code == 200
        slot = page.gateway.models.slots["m1"]
        assert slot.state == "ready"
        stop = "/gateway/page/models/m1/stop"
        assert (await client.post(stop)).status_code == 403
        assert (await client.post(stop, headers={"X-CSRF-Token": "nope"})).status_code == 403
        other = await client.post(
            stop, headers={"X-CSRF-Token": csrf, "Origin": "http://localhost:1"}
        )
        assert other.status_code == 403 and "another origin" in other.json()["error"]["message"]
        assert slot.state == "ready"
        # The page's own button: answered once the session has ended.
        done = await client.post(stop, headers={"X-CSRF-Token": csrf, "Origin": f"http://{host}"})
        assert done.status_code == 200, done.text
        assert done.json()["stopped"] == ["100"] and "confirmed" in done.json()["message"]
        assert slot.state == "cold" and slot.runs() == []
        # No batches yet: cancelling one says so.
        resp = await client.post("/gateway/page/batches/b1/cancel", headers={"X-CSRF-Token": csrf})
        assert resp.status_code == 409 and "No batch" in resp.json()["error"]["message"]

    run(scenario, tmp_path)


def test_metrics_parse_and_count_the_requests_and_the_log_keeps_no_body(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, page: Page, host: str) -> None:
        ask = {"model": "m1", "messages": [{"role": "user", "content": SECRET}]}
        for _ in range(3):
            assert (
                await client.post("/v1/chat/completions", headers=AUTH, json=ask)
            ).status_code == 200
        streamed = await client.post(
            "/v1/chat/completions", headers=AUTH, json={**ask, "stream": True}
        )
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        missing = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "zz"})
        assert missing.status_code == 404
        resp = await client.get("/metrics", headers=AUTH)
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(resp.text)
            for s in f.samples
        }
        route = ("route", "/v1/chat/completions")
        assert (
            samples[("alvis_fsm_requests_total", (("model", "m1"), route, ("status", "200")))] == 4
        )
        assert (
            samples[("alvis_fsm_requests_total", (("model", "-"), route, ("status", "404")))] == 1
        )
        assert samples[("alvis_fsm_request_errors_total", (("model", "-"), route))] == 1
        assert samples[("alvis_fsm_request_duration_seconds_count", (("model", "m1"),))] == 4
        assert samples[("alvis_fsm_prompt_tokens_total", (("model", "m1"),))] == 21 + 5
        assert samples[("alvis_fsm_completion_tokens_total", (("model", "m1"),))] == 9 + 2
        assert samples[("alvis_fsm_model_state", (("model", "m1"), ("state", "ready")))] == 1
        assert samples[("alvis_fsm_model_state", (("model", "m2"), ("state", "cold")))] == 1
        assert ("alvis_fsm_gpu_hours_used_total", (("model", "m1"),)) in samples
        state = (await client.get("/gateway/page/state", headers=AUTH)).status_code
        assert state == 401  # the key opens /metrics, not the page
        await _sign_in(client, page)
        data = (await client.get("/gateway/page/state")).json()
        m1 = data["models"][0]
        assert (m1["requests"], m1["prompt_tokens"], m1["completion_tokens"]) == (4, 26, 11)
        assert m1["p50_s"] is not None and sum(m1["per_minute"]) == 4
        assert data["errors"][0]["status"] == 404 and "'zz'" in data["errors"][0]["message"]

    run(scenario, tmp_path)
    text = requestlog.path_of(tmp_path).read_text()
    assert SECRET not in text and KEY not in text and "session-key" not in text
    entries = requestlog.read(tmp_path)
    assert [(e.model, e.status, e.ok, e.prompt_tokens, e.stream) for e in entries] == [
        ("m1", 200, True, 7, False)
    ] * 3 + [("m1", 200, True, 5, True), ("", 404, False, None, False)]
    assert requestlog.path_of(tmp_path).stat().st_mode & 0o077 == 0


def _entry(i: int) -> Entry:
    return Entry(time=1e9 + i, model="m", route="/v1/x", status=200, latency_s=0.01, ok=True)


def test_the_request_log_rotates_and_follows(tmp_path: Path) -> None:
    tmp_path = tmp_path / "state"
    log = RequestLog(tmp_path, max_bytes=400, keep=2)
    for i in range(20):
        log.write(_entry(i))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "gateway-requests.jsonl",
        "gateway-requests.jsonl.1",
        "gateway-requests.jsonl.2",
    ]
    assert all(p.stat().st_size <= 400 + 200 for p in tmp_path.iterdir())
    kept = requestlog.read(tmp_path)
    assert [e.time for e in kept] == sorted(e.time for e in kept) and kept[-1].time == 1e9 + 19
    assert requestlog.read(tmp_path, 2) == kept[-2:]
    # A damaged line is skipped, not fatal.
    with requestlog.path_of(tmp_path).open("a") as f:
        f.write("{not json\n")
    assert requestlog.read(tmp_path)[-1].time == 1e9 + 19
    # follow: only new lines, across a rotation.
    follower = requestlog.follow(tmp_path, poll=0.01)
    log = RequestLog(tmp_path, max_bytes=400, keep=2)
    got: list[Any] = []
    log.write(_entry(100))
    got.append(next(follower))
    for i in range(101, 110):  # a rotation every few lines
        log.write(_entry(i))
        got.append(next(follower))
    follower.close()
    assert [e.time for e in got] == [1e9 + i for i in range(100, 110)]
    assert requestlog.format_entry(got[0]).split()[2:5] == ["m", "/v1/x", "200"]


def test_routes_are_a_fixed_set_and_printed_lines_are_inert() -> None:
    """Issue 31, items 10 and 11: a client's path is never a route's text;
    a line from the file (another version, edited) prints inert."""
    assert requestlog.route_of("/v1/chat/completions") == "/v1/chat/completions"
    for path in ("/v1/\x1b]52;c;cHduZWQ=\x07", "/v1/made-up-1", "/v1/chat/completions/x", ""):
        assert requestlog.route_of(path) == requestlog.OTHER
    hostile = Entry(
        time=1e9, model="m\x1b[2J", route="/v1/\x1b]52;c;x\x07", status=404, latency_s=0.0, ok=False
    )
    line = requestlog.format_entry(hostile)
    assert "\x1b" not in line and "\x07" not in line and "/v1/" in line


def test_detach_prints_a_sign_in_link_and_gateway_open_makes_another(tmp_path: Path) -> None:
    from test_gateway_commands import cli, free_port

    state = tmp_path / "state"
    port = free_port()
    done = cli(state, "gateway", "--detach", "--port", str(port))
    try:
        assert done.returncode == 0, done.stderr
        found = re.search(rf"Page: (http://localhost:{port}/\?token=\S+)", done.stderr)
        assert found and "token" not in done.stdout  # stdout: only the exports
        assert found.group(1) not in (state / "gateway.log").read_text()
        again = cli(state, "gateway", "open", "--no-browser")
        assert again.returncode == 0, again.stderr
        other = re.search(rf"Page: (http://localhost:{port}/\?token=\S+)", again.stderr)
        assert other and other.group(1) != found.group(1)
        with httpx.Client(trust_env=False, timeout=10) as http:
            first = http.get(other.group(1))
            assert first.status_code == 303 and "HttpOnly" in first.headers["Set-Cookie"]
            assert http.get(other.group(1)).status_code == 401  # one time
        log = cli(state, "gateway", "log")
        assert log.returncode == 0 and "No requests logged yet" in log.stderr
    finally:
        stopped = cli(state, "gateway", "stop")
        assert stopped.returncode == 0, stopped.stderr
    missing = cli(state, "gateway", "open", "--no-browser")
    assert missing.returncode != 0 and "No gateway is running" in missing.stderr


def test_a_login_link_expires_and_a_cross_site_sign_in_moves_on_by_itself(tmp_path: Path) -> None:
    """Issue 31, item 12: a link past its life is refused in words; one
    reached from another site (the browser's file:// page) signs in with a
    page that moves on to / itself (a redirect would drop the Strict cookie)."""

    async def scenario(client: httpx.AsyncClient, page: Page, host: str) -> None:
        page.login_life = 60
        old = page.new_login_token()
        page._logins[old] -= 61  # made 61 s ago
        resp = await client.get(f"/?token={old}")
        assert resp.status_code == 401 and "expired" in resp.text and "gateway open" in resp.text
        assert "Set-Cookie" not in resp.headers
        fresh = page.new_login_token()
        resp = await client.get(f"/?token={fresh}", headers={"Sec-Fetch-Site": "cross-site"})
        assert resp.status_code == 200 and 'http-equiv="refresh" content="0;url=/"' in resp.text
        assert "SameSite=Strict" in resp.headers["Set-Cookie"]
        assert (await client.get("/gateway/page/state")).status_code == 200

    run(scenario, tmp_path)
