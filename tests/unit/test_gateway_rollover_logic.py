"""The gateway's rollover before a job's time limit (issue 14), with fake
sessions and a fake vLLM: a successor only for a used model within its lead,
one at a time; requests in flight finish on the old session, new ones go to
the successor once it serves, then the old one is stopped; a failed
successor leaves the old one serving; an old job that ends first leaves the
requests held on the successor; idle stop and shutdown stop every session."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from aiohttp import web
from gateway_client import client_of

from alvis_fsm.engine.session.store import SessionRecord
from alvis_fsm.errors import Interrupted, ServerError
from alvis_fsm.fronts.gateway.server import Gateway, Options
from alvis_fsm.fronts.gateway.slot.models import Models, rollover_lead
from alvis_fsm.fronts.gateway.slot.recorder import Recorder
from alvis_fsm.fronts.gateway.slot.sessions import session_name

KEY = "gw-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
HOUR = 3600


def _until(event: threading.Event, *others: threading.Event) -> None:
    while not (event.is_set() or any(e.is_set() for e in others)):
        time.sleep(0.01)


class FakeSession:
    """Queues until ``release``d (at once unless held), then serves until
    stopped or its job reaches its time limit (``end``); or fails instead of
    serving. Each has its own job id and its own vLLM key."""

    def __init__(
        self,
        model: str,
        observer: Recorder,
        lane: int,
        port: int,
        job_id: str,
        hold: bool,
        fail: bool,
    ) -> None:
        self.record = SessionRecord(
            name=session_name(model, lane),
            model=model,
            local_port=port,
            served_name=f"org/{model}",
            api_key=f"key-{job_id}",
            time_limit_s=HOUR,
        )
        self.observer = observer
        self.lane = lane
        self.job_id = job_id
        self.fail = fail
        self.released = threading.Event()
        if not hold:
            self.released.set()
        self.limit = threading.Event()
        self.stop = threading.Event()
        self.stopped_by = ""
        self.ended = threading.Event()

    def release(self) -> None:
        self.released.set()

    def end(self) -> None:
        """The job reaches its time limit."""
        self.limit.set()

    def request_stop(self, reason: str = "stopped") -> None:
        self.stopped_by = reason
        self.stop.set()

    def drive(self) -> None:
        r = self.record
        try:
            r.state, r.job_id = "submitted", self.job_id
            self.observer.info("queued")
            _until(self.released, self.stop)
            if self.stop.is_set():
                raise Interrupted(f"Stopped by {self.stopped_by}")
            r.state, r.running_since = "running", time.time()
            self.observer.info("loading")
            if self.fail:
                raise ServerError(
                    "vLLM exited with status 1 before it was ready",
                    details="torch.OutOfMemoryError: CUDA out of memory",
                )
            r.state = "tunneled"
            self.observer.connected(r, [r.served_name])
            _until(self.stop, self.limit)
            if self.stop.is_set():
                raise Interrupted(f"Stopped by {self.stopped_by}")
            # The time limit: a normal end, as the engine's.
        finally:
            r.state = "cleaned"
            self.ended.set()


class Upstream:
    """A fake vLLM for every session: notes which session's key each request
    came with; a stream with ``"user": "slow"`` waits for ``gate`` before
    its last chunk."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.gate = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        self.keys.append(key)
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(
                {"object": "chat.completion", "model": body["model"], "key": key, "choices": []}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(("one", "two", "three")):
            if i == 2 and body.get("user") == "slow":
                await self.gate.wait()
            chunk = {"key": key, "choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = next(a[1] for a in self.runner.addresses if isinstance(a, tuple))


Scenario = Callable[[httpx.AsyncClient, "Harness"], Awaitable[None]]


class Harness:
    """A gateway of models m1 and m2 with fake sessions. ``plan`` says how
    each new session behaves, in order of creation (``hold``, ``fail``); the
    idle loop's rollover check is off unless ``idle_check`` is given, so the
    tests call ``models.roll_over`` themselves."""

    def __init__(self, plan: list[dict[str, bool]] | None = None, **options: Any) -> None:
        opts = {
            "hold_timeout": 10.0,
            "idle_timeout": 60.0,
            "keepalive_interval": 0.1,
            "idle_check": 3600.0,
            "rollover_lead": 60.0,
            **options,
        }
        self.options = Options(**opts)
        self.plan = list(plan or [])
        self.sessions: list[FakeSession] = []
        self.upstream = Upstream()
        self.lines: list[str] = []
        self.load: dict[str, float] = {}
        self.gateway: Gateway | None = None
        self.models: Models | None = None

    def factory(self, model: str, observer: Recorder, lane: int) -> FakeSession:
        how = self.plan.pop(0) if self.plan else {}
        job_id = str(100 + len(self.sessions))
        session = FakeSession(
            model,
            observer,
            lane,
            self.upstream.port,
            job_id,
            how.get("hold", False),
            how.get("fail", False),
        )
        self.sessions.append(session)
        return session

    def run(self, scenario: Scenario) -> None:
        async def main() -> None:
            await self.upstream.start()
            self.models = Models(
                {"m1": "org/m1", "m2": "org/m2"},
                self.factory,
                self.lines.append,
                lambda m, g: self.load.get(m),
            )
            self.gateway = Gateway(KEY, self.models, self.options)
            try:
                async with client_of(self.gateway) as client:
                    try:
                        await scenario(client, self)
                    finally:
                        self.upstream.gate.set()
                        left = await self.models.shutdown(10)
                        assert left == []
            finally:
                assert self.upstream.runner is not None
                await self.upstream.runner.cleanup()

        asyncio.run(main())

    def roll_over(self) -> list[str]:
        assert self.models is not None
        return self.models.roll_over(self.options.rollover_lead)

    def near_limit(self, session: FakeSession, left: float = 30.0) -> None:
        """Its job is ``left`` seconds from its time limit (within the lead)."""
        session.record.running_since = time.time() - (HOUR - left)


async def ask(client: httpx.AsyncClient, model: str = "m1") -> httpx.Response:
    return await client.post("/v1/chat/completions", headers=AUTH, json={"model": model, **CHAT})


async def listed(client: httpx.AsyncClient, model: str = "m1") -> dict[str, Any]:
    rows = (await client.get("/v1/models", headers=AUTH)).json()["data"]
    return next(row for row in rows if row["id"] == model)


async def eventually(check: Callable[[], object], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


def test_a_successor_starts_only_for_a_used_model_within_its_lead_and_only_one() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert h.models is not None
        slot = h.models.slots["m1"]
        # Started but not used (no request served): never rolled over.
        slot.start()
        await eventually(lambda: slot.state == "ready")
        h.near_limit(h.sessions[0])
        assert h.roll_over() == [] and len(h.sessions) == 1
        # Used, but an hour from its limit: not yet.
        h.sessions[0].record.running_since = time.time()
        assert (await ask(client)).status_code == 200
        assert h.roll_over() == [] and len(h.sessions) == 1
        # Used and within its lead: one successor, however many checks.
        h.near_limit(h.sessions[0])
        assert h.roll_over() == ["m1"]
        for _ in range(5):
            assert h.roll_over() == []
        assert len(h.sessions) == 2 and slot.successor is not None
        # In another lane: a session name distinct from the live one's.
        assert h.sessions[1].record.name == "gw-m1-2" != h.sessions[0].record.name == "gw-m1"
        assert any("reaches its time limit in" in line for line in h.lines)
        # The unused model m2 was never started.
        assert (await listed(client, "m2"))["state"] == "cold"

    Harness(plan=[{}, {"hold": True}]).run(scenario)


def test_in_flight_requests_finish_on_the_old_session_and_new_ones_go_to_the_successor() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert h.models is not None
        slot = h.models.slots["m1"]
        assert (await ask(client)).json()["key"] == "key-100"
        old = h.sessions[0]
        row = await listed(client)
        assert row["job_id"] == "100" and 0 < row["time_left"] <= HOUR

        lines: list[str] = []

        async def slow() -> None:  # in flight on the old session across the rollover
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                headers=AUTH,
                json={"model": "m1", "stream": True, "user": "slow", **CHAT},
            ) as resp:
                assert resp.status_code == 200
                lines.extend([x async for x in resp.aiter_lines() if x])

        stream = asyncio.create_task(slow())
        await eventually(lambda: len(h.upstream.keys) == 2)
        h.near_limit(old)
        assert h.roll_over() == ["m1"]
        new = h.sessions[1]
        # The successor queues: requests still go to the old session.
        assert (await ask(client)).json()["key"] == "key-100"
        assert (await listed(client))["job_id"] == "100"
        new.release()
        await eventually(lambda: slot.job_id == "101")
        assert any("rolled over: job 100 → job 101" in line for line in h.lines)
        row = await listed(client)
        assert row["state"] == "ready" and row["job_id"] == "101"
        assert (await ask(client)).json()["key"] == "key-101"
        # The old one still has the stream in flight: not stopped yet.
        status = (await client.get("/gateway/status", headers=AUTH)).json()["models"][0]
        assert status["retiring_job_ids"] == ["100"] and status["rollovers"] == 1
        assert old.stopped_by == "" and not stream.done()
        h.upstream.gate.set()
        await stream
        words = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert [w["choices"][0]["delta"]["content"] for w in words] == ["one", "two", "three"]
        assert {w["key"] for w in words} == {"key-100"}
        # Its last request done, the old session is stopped, and ends.
        await eventually(lambda: old.ended.is_set() and slot.retiring == [])
        assert old.stopped_by == "rolled over to job 101" and new.stopped_by == ""
        assert slot.in_flight == 0 and slot.served_requests == 4

    Harness(plan=[{}, {"hold": True}]).run(scenario)


def test_a_replaced_session_with_nothing_in_flight_is_stopped_at_once() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert (await ask(client)).status_code == 200
        h.near_limit(h.sessions[0])
        h.roll_over()
        await eventually(lambda: h.sessions[0].ended.is_set())
        assert h.sessions[0].stopped_by == "rolled over to job 101"
        assert (await ask(client)).json()["key"] == "key-101"

    Harness().run(scenario)


def test_a_failed_successor_leaves_the_old_session_serving_and_is_not_retried() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert h.models is not None
        slot = h.models.slots["m1"]
        assert (await ask(client)).status_code == 200
        h.near_limit(h.sessions[0])
        assert h.roll_over() == ["m1"]
        await eventually(lambda: slot.successor is None)
        assert any("rollover failed" in line and "CUDA out of memory" in line for line in h.lines)
        status = (await client.get("/gateway/status", headers=AUTH)).json()["models"][0]
        assert "CUDA out of memory" in status["rollover_error"]
        row = await listed(client)
        assert (row["state"], row["job_id"], row["error"]) == ("ready", "100", None)
        assert (await ask(client)).json()["key"] == "key-100"
        assert h.sessions[0].stopped_by == ""
        assert h.roll_over() == [] and len(h.sessions) == 2
        # The old job reaches its limit: the next request starts a new session.
        h.sessions[0].end()
        await eventually(lambda: slot.run is None)
        assert (await ask(client)).json()["key"] == "key-102"

    Harness(plan=[{}, {"fail": True}]).run(scenario)


def test_an_old_job_ending_before_its_successor_serves_holds_requests_on_the_successor() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert h.models is not None
        slot = h.models.slots["m1"]
        assert (await ask(client)).status_code == 200
        h.near_limit(h.sessions[0])
        h.roll_over()
        h.sessions[0].end()
        await eventually(lambda: slot.job_id == "101")
        assert (await listed(client))["state"] == "queued"
        held = asyncio.create_task(ask(client))
        await asyncio.sleep(0.2)
        assert not held.done()
        h.sessions[1].release()
        assert (await held).json()["key"] == "key-101"
        assert len(h.sessions) == 2 and slot.error == ""

    Harness(plan=[{}, {"hold": True}]).run(scenario)


def test_the_idle_loop_rolls_over_by_itself() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert h.models is not None
        assert (await ask(client)).status_code == 200
        # The lead is the model's expected load time here (more than the floor).
        h.load["m1"] = 2 * HOUR
        await eventually(lambda: h.models is not None and h.models.slots["m1"].job_id == "101")
        assert (await ask(client)).json()["key"] == "key-101"

    Harness(idle_check=0.05).run(scenario)


def test_idle_stop_and_shutdown_stop_successors_and_replaced_sessions() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert h.models is not None
        # m1: a successor still queueing; m2: a replaced session with a stream in flight.
        assert (await ask(client, "m1")).status_code == 200
        h.near_limit(h.sessions[0])
        h.roll_over()
        assert (await ask(client, "m2")).status_code == 200
        stream = asyncio.create_task(
            client.post(
                "/v1/chat/completions",
                headers=AUTH,
                json={"model": "m2", "stream": True, "user": "slow", **CHAT},
            )
        )
        await eventually(lambda: len(h.upstream.keys) == 3)
        h.near_limit(h.sessions[2])
        h.roll_over()
        await eventually(lambda: h.models is not None and h.models.slots["m2"].job_id == "103")
        assert len(h.sessions) == 4 and h.sessions[2].stopped_by == ""
        assert await h.models.shutdown(10) == []
        assert all(s.ended.is_set() and s.stopped_by == "gateway shutdown" for s in h.sessions)
        assert all(s.runs() == [] for s in h.models.slots.values())
        stream.cancel()

    Harness(plan=[{}, {"hold": True}, {}, {}]).run(scenario)


def test_an_idle_stop_stops_the_successor_too() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        assert h.models is not None
        assert (await ask(client)).status_code == 200
        h.near_limit(h.sessions[0])
        h.roll_over()
        h.models.slots["m1"].last_active -= 120
        assert h.models.stop_idle(60) == ["m1"]
        await eventually(lambda: all(s.ended.is_set() for s in h.sessions))
        assert [s.stopped_by for s in h.sessions] == ["idle timeout"] * 2
        await eventually(lambda: h.models is not None and h.models.slots["m1"].runs() == [])

    Harness(plan=[{}, {"hold": True}]).run(scenario)


def test_the_lead_is_the_queue_wait_and_load_time_at_least_the_setting() -> None:
    record = SessionRecord(
        name="gw-m", model="m", gpus="A40:1", entered_at={"submitted": 1000.0, "running": 1050.0}
    )
    assert rollover_lead(record, 10, lambda model, gpus: 30.0) == 80.0
    assert rollover_lead(record, 600, lambda model, gpus: 30.0) == 600
    assert rollover_lead(record, 10, lambda model, gpus: None) == 50.0
    assert rollover_lead(SessionRecord(name="gw-m", model="m"), 10, None) == 10
    assert record.time_left() is None  # not running yet
    record.running_since, record.time_limit_s = time.time() - 100, 160
    left = record.time_left()
    assert left is not None and 0 < left <= 60


def test_successor_session_names_differ_and_stay_valid() -> None:
    assert [session_name("m", lane) for lane in range(3)] == ["gw-m", "gw-m-2", "gw-m-3"]
    long = "org/" + "x" * 60
    names = {session_name(long, lane) for lane in range(12)}
    assert len(names) == 12 and all(len(n) <= 41 for n in names)


def test_the_slot_is_a_declared_machine() -> None:
    """Every phase is reached from cold, every phase can shut down, and each
    callback the table names exists on the slot."""
    from alvis_fsm.fronts.gateway.slot.models import TRANSITIONS, Slot, SlotPhase

    reached, edges = {SlotPhase.COLD}, True
    while edges:
        edges = False
        for _, sources, dest, _, _ in TRANSITIONS:
            if dest is not None and dest not in reached and reached & set(sources):
                reached.add(dest)
                edges = True
    assert reached == set(SlotPhase)
    assert all(SlotPhase.CLOSED is d for t, _, d, _, _ in TRANSITIONS if t == "close")
    assert {p for t, s, _, _, _ in TRANSITIONS if t == "close" for p in s} == set(SlotPhase)
    names = {n for *_, conditions, before in TRANSITIONS for n in [*conditions, before] if n}
    assert all(callable(getattr(Slot, n, None)) for n in names)
