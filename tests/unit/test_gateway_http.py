"""The gateway's HTTP layer (issue 14) with fake sessions and a fake vLLM:
the key, /v1/models, routing, single flight, held requests, idle stop. One
test drives a real engine Runner against the fake cluster."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from gateway_client import client_of

from alvis_fsm.engine.session.store import SessionRecord
from alvis_fsm.errors import Interrupted, ServerError
from alvis_fsm.fronts.gateway.keys import gateway_key
from alvis_fsm.fronts.gateway.server import Gateway, Options
from alvis_fsm.fronts.gateway.slot.models import Models
from alvis_fsm.fronts.gateway.slot.recorder import Recorder

KEY = "gw-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class FakeSession:
    """Queues, loads, serves until stopped; or fails while loading."""

    def __init__(
        self, model: str, observer: Recorder, port: int, load_s: float, fail: bool
    ) -> None:
        self.record = SessionRecord(
            name=f"gw-{model}",
            model=model,
            local_port=port,
            served_name=f"org/{model}",
            api_key="session-key",
        )
        self.observer = observer
        self.load_s = load_s
        self.fail = fail
        self._stop = threading.Event()
        self.stopped_by = ""

    def request_stop(self, reason: str = "stopped") -> None:
        self.stopped_by = reason
        self._stop.set()

    def drive(self) -> None:
        r = self.record
        for state, pause in (("submitted", self.load_s / 2), ("running", self.load_s / 2)):
            r.state = state
            r.job_id = "100"
            self.observer.info(f"now {state}")
            if self._stop.wait(pause):
                r.state = "cleaned"
                raise Interrupted(f"Stopped by {self.stopped_by}")
        if self.fail:
            r.state = "cleaned"
            raise ServerError(
                "vLLM exited with status 1 before it was ready",
                details="torch.OutOfMemoryError: CUDA out of memory",
            )
        r.state = "tunneled"
        self.observer.connected(r, [r.served_name])
        self._stop.wait()
        r.state = "cleaned"
        raise Interrupted(f"Stopped by {self.stopped_by}")


async def _upstream() -> tuple[web.AppRunner, int, list[dict[str, Any]]]:
    """A fake vLLM: checks the session's key, echoes the model it was asked for."""
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        assert request.headers["Authorization"] == "Bearer session-key"
        body = await request.json()
        seen.append(body)
        if not body.get("stream"):
            return web.json_response(
                {
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello"},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("one", "two", "three"):
            chunk = {
                "object": "chat.completion.chunk",
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": word}}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return runner, port, seen


Scenario = Callable[[httpx.AsyncClient, "Harness"], Awaitable[None]]


class Harness:
    def __init__(self, options: Options, load_s: float, fail: bool) -> None:
        self.options = options
        self.load_s = load_s
        self.fail = fail
        self.sessions: list[FakeSession] = []
        self.seen: list[dict[str, Any]] = []
        self.gateway: Gateway | None = None

    def run(self, scenario: Scenario, factory: Any = None) -> None:
        async def main() -> None:
            up, port, self.seen = await _upstream()

            def fake(model: str, observer: Recorder, lane: int) -> FakeSession:
                session = FakeSession(model, observer, port, self.load_s, self.fail)
                self.sessions.append(session)
                return session

            made = factory(port) if factory else fake
            models = Models({"m1": "org/m1", "m2": "org/m2"}, made)
            self.gateway = Gateway(KEY, models, self.options)
            try:
                async with client_of(self.gateway) as client:
                    try:
                        await scenario(client, self)
                    finally:
                        left = await models.shutdown(10)
                        assert left == []
            finally:
                await up.cleanup()

        asyncio.run(main())


def harness(load_s: float = 0.2, fail: bool = False, **options: Any) -> Harness:
    opts = {
        "hold_timeout": 10.0,
        "idle_timeout": 60.0,
        "keepalive_interval": 0.1,
        "idle_check": 0.05,
        **options,
    }
    return Harness(Options(**opts), load_s, fail)


def test_every_request_needs_the_gateway_key() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                resp = await client.request(method, path, headers=headers, json={"model": "m1"})
                assert resp.status_code == 401, (headers, path)
                err = resp.json()["error"]
                assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
                assert "Bearer" in err["message"]
        assert h.sessions == []

    harness().run(scenario)


def test_no_web_page_can_use_the_gateway() -> None:
    """Issue 22, finding 1: a rebound DNS name (Host) or a page of another
    origin is refused even with the key; a preflight gets no CORS grant."""

    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        for extra in (
            {"Host": "rebind.attacker.test"},
            {"Host": "192.168.1.5:8000"},
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
        ):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                resp = await client.request(
                    method, path, headers={**AUTH, **extra}, json={"model": "m1", **CHAT}
                )
                assert resp.status_code == 403, (extra, path)
                assert resp.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed")
                assert not [k for k in resp.headers if k.lower().startswith("access-control")]
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "http://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 403
        assert not [k for k in preflight.headers if k.lower().startswith("access-control")]
        assert h.sessions == []
        for host in ("localhost", "127.0.0.1:1234", "[::1]:80"):
            ok = await client.get("/v1/models", headers={**AUTH, "Host": host})
            assert ok.status_code == 200, host

    harness().run(scenario)


def test_models_lists_the_catalog_with_states_and_starts_nothing() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        resp = await client.get("/v1/models", headers=AUTH)
        assert resp.status_code == 200
        data = resp.json()["data"]
        assert [(m["id"], m["aliases"], m["state"], m["job_id"]) for m in data] == [
            ("m1", ["org/m1"], "cold", None),
            ("m2", ["org/m2"], "cold", None),
        ]
        assert h.sessions == []
        # The served ORG/NAME is an alias: it starts m1, and m1 is listed ready.
        resp = await client.post(
            "/v1/chat/completions", headers=AUTH, json={"model": "org/m1", **CHAT}
        )
        assert resp.status_code == 200 and resp.json()["model"] == "org/m1"
        states = {
            m["id"]: (m["state"], m["job_id"])
            for m in (await client.get("/v1/models", headers=AUTH)).json()["data"]
        }
        assert states == {"m1": ("ready", "100"), "m2": ("cold", None)}

    harness().run(scenario)


def test_unknown_model_is_404_listing_the_catalog() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        resp = await client.post(
            "/v1/chat/completions", headers=AUTH, json={"model": "nope", **CHAT}
        )
        assert resp.status_code == 404
        err = resp.json()["error"]
        assert err["code"] == "model_not_found" and "'nope'" in err["message"]
        assert "m1, m2" in err["message"]
        resp = await client.post("/v1/chat/completions", headers=AUTH, content=b"not json")
        assert resp.status_code == 400 and "model" in resp.json()["error"]["message"]
        assert h.sessions == []

    harness().run(scenario)


def test_a_burst_of_50_requests_to_a_cold_model_makes_one_session() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        async def one(i: int) -> httpx.Response:
            return await client.post(
                "/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT, "user": str(i)}
            )

        answers = await asyncio.gather(*(one(i) for i in range(50)))
        assert [a.status_code for a in answers] == [200] * 50
        assert len(h.sessions) == 1
        # Each was proxied with the served name and the session's own key.
        assert len(h.seen) == 50 and {b["model"] for b in h.seen} == {"org/m1"}
        assert h.gateway is not None and h.gateway.held == 0

    harness(load_s=0.5).run(scenario)


def test_a_held_stream_gets_200_and_keep_alive_comments_then_the_chunks() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        started = time.monotonic()
        first: float | None = None
        lines: list[str] = []
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            headers=AUTH,
            json={"model": "m2", "stream": True, **CHAT},
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if first is None:
                    first = time.monotonic() - started
                if line:
                    lines.append(line)
        assert first is not None and first < 0.3  # the 200 and a comment at once, not after loading
        comments = [x for x in lines if x.startswith(":")]
        assert len(comments) >= 3 and all(c.startswith(": keep-alive ") for c in comments)
        assert {c.split()[2] for c in comments} <= {"queued", "loading", "ready"}
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        words = [json.loads(x[6:])["choices"][0]["delta"]["content"] for x in data[:-1]]
        assert words == ["one", "two", "three"]
        assert lines.index(data[0]) > lines.index(comments[-1])  # comments only before

    harness(load_s=0.6).run(scenario)


def test_a_stream_to_a_ready_model_passes_chunks_as_they_come() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        assert resp.status_code == 200
        arrivals = []
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            headers=AUTH,
            json={"model": "m1", "stream": True, **CHAT},
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 3
        # The upstream waits 50 ms between chunks: not buffered to the end.
        assert arrivals[-1] - arrivals[0] >= 0.08

    harness(load_s=0.05).run(scenario)


def test_a_non_streaming_request_held_too_long_gets_503_retry_after() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        assert resp.status_code == 503
        assert resp.headers["x-should-retry"] == "true"
        assert 0 < int(resp.headers["Retry-After"]) <= 60
        assert "still starting" in resp.json()["error"]["message"]
        # The session carries on starting: a retry gets the answer.
        assert len(h.sessions) == 1 and h.sessions[0].stopped_by == ""

    harness(load_s=5.0, hold_timeout=0.3).run(scenario)


def test_too_many_held_requests_get_503() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        first = asyncio.create_task(
            client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        )
        await asyncio.sleep(0.1)
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m2", **CHAT})
        assert resp.status_code == 503 and "gateway.max_held" in resp.json()["error"]["message"]
        assert (await first).status_code == 200

    harness(load_s=0.5, max_held=1).run(scenario)


def test_a_failed_session_answers_503_with_the_cause_and_the_next_request_retries() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        assert resp.status_code == 503
        message = resp.json()["error"]["message"]
        assert "CUDA out of memory" in message and "before it was ready" in message
        listed = (await client.get("/v1/models", headers=AUTH)).json()["data"][0]
        assert listed["state"] == "failed" and "CUDA out of memory" in listed["error"]
        # A stream held for a failing model gets the cause as an SSE error event.
        resp = await client.post(
            "/v1/chat/completions", headers=AUTH, json={"model": "m1", "stream": True, **CHAT}
        )
        assert resp.status_code == 200
        event = next(x for x in resp.text.splitlines() if x.startswith("data: "))
        assert "CUDA out of memory" in json.loads(event[6:])["error"]["message"]
        assert len(h.sessions) == 2  # the second request tried again

    harness(load_s=0.1, fail=True).run(scenario)


def test_an_idle_model_is_stopped_and_the_next_request_starts_it_again() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        assert resp.status_code == 200 and len(h.sessions) == 1
        deadline = time.monotonic() + 5
        while h.sessions[0].stopped_by != "idle timeout" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert h.sessions[0].stopped_by == "idle timeout"
        while time.monotonic() < deadline:
            states = [
                m["state"] for m in (await client.get("/v1/models", headers=AUTH)).json()["data"]
            ]
            if states[0] == "cold" and h.gateway and h.gateway.models.slots["m1"].handle is None:
                break
            await asyncio.sleep(0.05)
        assert states == ["cold", "cold"]
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        assert resp.status_code == 200 and len(h.sessions) == 2

    harness(load_s=0.1, idle_timeout=0.4).run(scenario)


def test_a_model_with_a_request_in_flight_is_not_idle() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        # Held longer than idle_timeout: still not stopped, since it is in flight.
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        assert resp.status_code == 200
        assert h.sessions[0].stopped_by == ""

    harness(load_s=0.8, idle_timeout=0.2).run(scenario)


def test_idle_stop_through_the_engine_cancels_the_job(tmp_path: Path) -> None:
    """A real Runner on the fake cluster: the idle stop is request_stop, and
    its cleanup cancels the job (confirmed) and leaves the session cleaned."""
    from alvis_fsm.cluster.agent import Event
    from tests.unit.fake_cluster import PENDING, make_runner

    made: list[Any] = []

    def factory(port: int) -> Any:
        def make(model: str, observer: Recorder, lane: int) -> Any:
            runner, agent, _, _, store = make_runner(
                tmp_path, "idle", detach=False, name=f"gw-{model}"
            )
            runner.record.local_port, runner.record.served_name = port, f"org/{model}"
            runner.record.api_key = "session-key"
            agent.stream_script = "import sys; sys.stdin.read()"  # ends when the stream is stopped
            agent.starts.extend(
                [Event("WAIT", job=PENDING, age=1), Event("STARTED", "alvis7-07 42")]
            )
            agent.readies.extend(
                [Event("ADDRESS", "alvis7-07:8000"), Event("READY", "alvis7-07:8000")]
            )
            made.append((runner, agent, store))
            return runner

        return make

    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "m1", **CHAT})
        assert resp.status_code == 200 and resp.json()["model"] == "org/m1"
        _runner, agent, store = made[0]
        deadline = time.monotonic() + 10
        while store.load("gw-m1").state != "cleaned" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert agent.cancels == [("42", "alvis-fsm-gw-m1-abc")]
        assert store.load("gw-m1").end_reason == "idle timeout"

    harness(idle_timeout=0.3).run(scenario, factory=factory)


def test_the_gateway_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    key = gateway_key(tmp_path / "state")
    assert key.startswith("afsm-gw-") and len(key) > 40
    path = tmp_path / "state" / "gateway.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert gateway_key(tmp_path / "state") == key
    path.chmod(0o644)
    assert gateway_key(tmp_path / "state") == key and path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "state,expected",
    [
        ("idle", "queued"),
        ("submitted", "queued"),
        ("running", "loading"),
        ("serving", "loading"),
        ("tunneled", "ready"),
        ("failed", "failed"),
    ],
)
def test_model_state_follows_the_session(state: str, expected: str) -> None:
    from alvis_fsm.fronts.gateway.slot.models import Run, Slot

    slot = Slot("m", "org/m", lambda model, obs, lane: None)  # type: ignore[arg-type,return-value]
    assert slot.state == "cold"
    slot.run = Run(FakeSession("m", Recorder("m"), 1, 0, False), 1, 0, Recorder("m"))
    slot.run.handle.record.state = state
    assert slot.state == expected


def test_a_failure_is_told_by_the_exception_vllm_raised_first() -> None:
    from alvis_fsm.fronts.gateway.slot.models import describe

    details = "\n".join(
        [
            "Traceback (most recent call last):",
            '  File "core.py", line 699, in run_engine_core',
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
            "Traceback (most recent call last):",
            '    raise RuntimeError("Engine core initialization failed. "',
            "RuntimeError: Engine core initialization failed. See root cause above.",
        ]
    )
    text = describe(ServerError("vLLM exited with status 1 before it was ready", details=details))
    assert text == (
        "vLLM exited with status 1 before it was ready: torch.OutOfMemoryError: CUDA out"
        " of memory. Tried to allocate 2.00 GiB. | RuntimeError: Engine core"
        " initialization failed. See root cause above."
    )


def test_a_gateway_session_is_made_by_the_service_and_stops_before_login(tmp_path: Path) -> None:
    """The gateway makes sessions through engine/session/service.py (as every front):
    checked with no network at once; a stop that comes before the session's
    thread has logged in ends it without logging in or submitting."""
    from alvis_fsm.engine.fit.catalog import load_catalog
    from alvis_fsm.engine.session.store import Store
    from alvis_fsm.engine.settings.model import load_settings
    from alvis_fsm.errors import Interrupted
    from alvis_fsm.fronts.gateway.slot import sessions

    cfg = load_settings({"session": {"state_dir": str(tmp_path / "state")}})
    store = Store(cfg.state_dir)
    catalog = load_catalog(cfg)
    model = next(iter(catalog.entries))
    handle = sessions.new_session(cfg, catalog, model, store, None)  # type: ignore[arg-type]
    assert handle.record.name == sessions.session_name(model)
    # No local port: the tunnel ends in a socket only this user can open.
    assert handle.record.local_port == 0 and handle.record.local_socket
    assert Path(handle.record.local_socket).parent.stat().st_mode & 0o077 == 0
    assert handle.record.api_key  # the session's own key, as `start` makes it
    handle.request_stop("shutdown")
    with pytest.raises(Interrupted, match="Stopped by shutdown before it was submitted"):
        handle.drive()
