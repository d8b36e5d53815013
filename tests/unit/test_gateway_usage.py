"""The gateway's per-model settings and figures (issue 14): a catalog
entry's own idle timeout, the separate queue and load budgets of its
sessions, GPU-hours used and saved, and the queue shown per model."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from gateway_client import client_of

from alvis_fsm.cluster.syntax import spoken_seconds
from alvis_fsm.engine.fit.catalog import ModelEntry
from alvis_fsm.engine.session.store import SessionRecord
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import ConfigError, UsageError
from alvis_fsm.fronts.gateway.observe import usage
from alvis_fsm.fronts.gateway.server import Gateway, Options
from alvis_fsm.fronts.gateway.slot.models import Models
from alvis_fsm.fronts.gateway.slot.recorder import Recorder

KEY = "gw-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("1.5h", 5400),
        (" 2M ", 120),
        # One duration syntax everywhere (issue 26): several units, days, SLURM's forms.
        ("1h30m", 5400),
        ("2d", 172800),
        ("15:00", 900),
        ("1:30:00", 5400),
    ],
)
def test_durations_people_write(text: str, seconds: float) -> None:
    assert spoken_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "5y", "m", "1m30h", "soon", "0:00", "5 days"])
def test_durations_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        spoken_seconds(text)


def test_gateway_idle_flag_says_what_is_wrong() -> None:
    from alvis_fsm.fronts.cli.commands.gateway import parse_duration as flag

    with pytest.raises(UsageError, match="--idle: '5 days' is not a duration") as err:
        flag("5 days")
    assert "--idle 15m" in (err.value.hint or "")


def test_a_catalog_entry_may_have_its_own_idle_timeout(tmp_path: Path) -> None:
    from alvis_fsm.engine.fit.catalog import load_catalog

    base = {"path": "/m/", "max_model_len": 10}
    assert ModelEntry.model_validate(base).idle_timeout is None
    assert ModelEntry.model_validate({**base, "idle_timeout": "30m"}).idle_timeout == 1800
    assert ModelEntry.model_validate({**base, "idle_timeout": 45}).idle_timeout == 45
    bad = tmp_path / "models.json"
    bad.write_text(json.dumps({"big": {**base, "idle_timeout": "a while"}}))
    cfg = load_settings(
        {"catalog": {"paths": [str(bad)]}, "session": {"state_dir": str(tmp_path / "s")}}
    )
    with pytest.raises(ConfigError) as err:
        load_catalog(cfg)
    assert "field 'idle_timeout': 'a while' is not accepted" in err.value.message
    assert '"30m"' in err.value.message


def test_sessions_get_the_gateway_s_queue_and_load_budgets(tmp_path: Path) -> None:
    from alvis_fsm.fronts.gateway.slot.sessions import budgets

    cfg = load_settings(
        {
            "gateway": {"queue_timeout": 7200, "load_timeout": 1200},
            "session": {"state_dir": str(tmp_path)},
        }
    )
    mine = budgets(cfg)
    assert (mine.timeouts.job_start, mine.timeouts.server_ready) == (7200, 1200)
    assert mine.timeouts.connection_test == cfg.timeouts.connection_test
    assert (cfg.timeouts.job_start, cfg.timeouts.server_ready) == (600, 600)  # `start`'s untouched
    # "start --new starts another" is `start`'s advice; the gateway rolls over itself.
    assert mine.session.warn_before_end == [] and cfg.session.warn_before_end == [600, 60]


@pytest.mark.parametrize(
    ("gpus", "count"), [("A40:2", 2), ("4", 4), ("A100fat:1", 1), ("auto", 0), ("", 0)]
)
def test_gpu_count(gpus: str, count: int) -> None:
    assert usage.gpu_count(gpus) == count


def test_gpu_hours_held_and_left() -> None:
    now = 1_000_000.0
    r = SessionRecord(
        name="gw-m", model="m", gpus="A40:2", time_limit_s=3600, running_since=now - 1800
    )
    assert usage.held(r, now) == pytest.approx(1.0)  # 2 GPUs × half an hour
    assert usage.left(r, now) == pytest.approx(1.0)
    assert usage.held(r, now + 7200) == pytest.approx(2.0)  # never past the time limit
    assert usage.left(r, now + 7200) == 0
    queued = SessionRecord(name="gw-m", model="m", gpus="A40:2", time_limit_s=3600)
    assert usage.held(queued, now) == 0 and usage.left(queued, now) == 0


class Session:
    """Serves at once (its job started half an hour ago); or waits in the
    queue until stopped."""

    def __init__(self, model: str, observer: Recorder, queued: bool) -> None:
        self.record = SessionRecord(
            name=f"gw-{model}",
            model=model,
            gpus="A40:1",
            time_limit_s=7200,
            job_id="7",
            state="submitted",
        )
        self.observer = observer
        self.queued = queued
        self.reason = ""
        self._stop = threading.Event()

    def request_stop(self, reason: str = "stopped") -> None:
        self.reason = reason
        self._stop.set()

    def drive(self) -> None:
        from alvis_fsm.errors import Interrupted

        r = self.record
        if self.queued:
            r.queue_reason = "waiting for GPUs to free up (Resources)"
            r.expected_start = "2026-11-27 18:00"
        else:
            r.node, r.running_since, r.state = "alvis7-07", time.time() - 1800, "tunneled"
        self.observer.info("changed")
        self._stop.wait()
        r.state = "cleaned"
        raise Interrupted(f"Stopped by {self.reason}")


def _run(
    scenario: Callable[[httpx.AsyncClient, Models], Awaitable[None]],
    models: Models,
    options: Options,
) -> None:
    async def main() -> None:
        async with client_of(Gateway(KEY, models, options), timeout=10) as client:
            try:
                await scenario(client, models)
            finally:
                assert await models.shutdown(5) == []

    asyncio.run(main())


def _models(queued: set[str]) -> Models:
    def factory(model: str, observer: Recorder, lane: int) -> Session:
        return Session(model, observer, model in queued)

    return Models({"fast": "org/fast", "slow": "org/slow"}, factory)  # type: ignore[arg-type]


async def _until(check: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert check()


def test_each_model_idles_by_its_own_timeout_and_the_saving_is_counted() -> None:
    models = _models(queued=set())
    models.slots["slow"].idle_timeout = 3600.0  # the catalog's: stays

    async def scenario(client: httpx.AsyncClient, models: Models) -> None:
        for name in ("fast", "slow"):
            models.slots[name].start()
        await _until(lambda: all(s.state == "ready" for s in models.slots.values()))
        status = (await client.get("/gateway/status", headers=AUTH)).json()
        assert status["gpu_hours_used"] == pytest.approx(1.0, abs=0.01)  # 2 × 1 GPU × 0.5 h
        assert status["gpu_hours_saved"] == 0
        await _until(lambda: models.slots["fast"].handle is None)  # idle: stopped
        assert models.slots["slow"].handle is not None and models.slots["slow"].idle_stops == 0
        status = (await client.get("/gateway/status", headers=AUTH)).json()
        fast = next(m for m in status["models"] if m["id"] == "fast")
        # Stopped with 1.5 h of its 2 h left on one GPU; it held half an hour.
        assert fast["gpu_hours_saved"] == pytest.approx(1.5, abs=0.01)
        assert fast["gpu_hours_used"] == pytest.approx(0.5, abs=0.01)
        assert status["gpu_hours_saved"] == pytest.approx(1.5, abs=0.01)

    _run(scenario, models, Options(idle_timeout=0.3, idle_check=0.05))


def test_a_queued_model_shows_the_scheduler_s_reason_and_expected_start() -> None:
    models = _models(queued={"slow"})

    async def scenario(client: httpx.AsyncClient, models: Models) -> None:
        models.slots["slow"].start()
        await _until(
            lambda: (
                models.slots["slow"].handle is not None
                and models.slots["slow"].handle.record.queue_reason != ""
            )
        )
        rows = {m["id"]: m for m in (await client.get("/v1/models", headers=AUTH)).json()["data"]}
        assert rows["slow"]["state"] == "queued" and rows["slow"]["job_id"] == "7"
        assert rows["slow"]["queue_reason"] == "waiting for GPUs to free up (Resources)"
        assert rows["slow"]["expected_start"] == "2026-11-27 18:00"
        assert rows["fast"]["state"] == "cold" and rows["fast"]["queue_reason"] is None

    _run(scenario, models, Options(idle_timeout=60, idle_check=0.05))


def test_requests_reach_a_session_through_its_unix_socket(tmp_path: Path) -> None:
    """The gateway's sessions' tunnels end in a socket, not a port: a stream
    passes through it whole, with the session's key and served name."""
    from aiohttp import web

    seen: list[dict[str, object]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        assert request.headers["Authorization"] == "Bearer session-key"
        seen.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(200):
            await resp.write(f"data: {i}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    class Ready:
        def __init__(self, model: str, observer: Recorder, lane: int) -> None:
            self.record = SessionRecord(
                name=f"gw-{model}",
                model=model,
                state="tunneled",
                served_name=f"org/{model}",
                api_key="session-key",
                local_socket=str(tmp_path / "s"),
            )
            self._stop = threading.Event()

        def request_stop(self, reason: str = "stopped") -> None:
            self._stop.set()

        def drive(self) -> None:
            from alvis_fsm.errors import Interrupted

            self._stop.wait()
            raise Interrupted("stopped")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        upstream = web.AppRunner(app)
        await upstream.setup()
        await web.UnixSite(upstream, str(tmp_path / "s")).start()
        models = Models({"m": "org/m"}, Ready)  # type: ignore[arg-type]
        body = {"model": "m", "stream": True, "messages": []}
        try:
            async with client_of(
                Gateway(KEY, models, Options(idle_timeout=60)), timeout=10
            ) as client:
                try:
                    async with client.stream(
                        "POST", "/v1/chat/completions", headers=AUTH, json=body
                    ) as resp:
                        assert resp.status_code == 200
                        lines = [x async for x in resp.aiter_lines() if x]
                finally:
                    assert await models.shutdown(5) == []
            assert lines == [f"data: {i}" for i in range(200)] + ["data: [DONE]"]
            assert seen == [{**body, "model": "org/m"}]
        finally:
            await upstream.cleanup()

    asyncio.run(main())
