"""The gateway's HTTP app (aiohttp, imported only here): the key check,
``GET /v1/models``, and every ``POST /v1/...`` routed by its JSON ``model``
to that model's session, held while the session starts, then proxied to the
session's tunnel with aiohttp's client, chunk by chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from alvis_fsm.engine.store import SessionRecord
from alvis_fsm.fronts.gateway.keys import matches
from alvis_fsm.fronts.gateway.models import QUEUED, READY, Handle, Models, Slot, Unavailable

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.page import Page
    from alvis_fsm.fronts.gateway.watch import Meter

# Headers that belong to one hop, never passed on.
_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "date", "server",
}  # fmt: skip
RETRY_AFTER = 30  # seconds, for a request refused while its model starts


@dataclass
class Options:
    hold_timeout: float = 540.0
    idle_timeout: float = 900.0
    max_held: int = 256
    keepalive_interval: float = 5.0  # between SSE comments to a held stream
    idle_check: float = 5.0  # how often idle sessions (and time limits) are looked at
    rollover_lead: float = 600.0  # the least lead of a successor before a job's time limit


def error(status: int, message: str, kind: str, code: str | int | None = None,
          headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    """An OpenAI-style error body: ``{"error": {"message", "type", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _retry_later(message: str) -> web.Response:
    return error(503, message, "service_unavailable", "model_starting",
                 headers={"Retry-After": str(RETRY_AFTER), "x-should-retry": "true"})  # fmt: skip


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class Gateway:
    def __init__(self, key: str, models: Models, options: Options | None = None) -> None:
        self.key = key
        self.models = models
        self.options = options or Options()
        self.held = 0
        self.client: aiohttp.ClientSession | None = None  # to sessions' local ports
        self._socket_clients: dict[str, aiohttp.ClientSession] = {}  # one per tunnel socket
        self._idle_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # clients of ended sessions, closing
        self.started = time.time()
        self.page: Page | None = None  # the browser page, /metrics and the request log
        self._meters: dict[int, Meter] = {}  # id(request) -> its meter, while the page is on

    # -- the app --------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/gateway/status", self.status)
        app.router.add_post("/v1/{tail:.*}", self.post)
        if self.page is not None:
            self.page.register(app)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.client = self._new_client()
        self._idle_task = asyncio.create_task(self._idle_loop())

    @staticmethod
    def _new_client(uds: str = "") -> aiohttp.ClientSession:
        """A pooled client to sessions' tunnels (a unix socket, else local
        ports). aiohttp's, not httpx's: the gateway is aiohttp end to end, and
        its C parser passes a stream on ~3× faster than httpx's h11 (36 vs 10
        MB/s of SSE on one core), which a proxy of token streams needs."""
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=uds, keepalive_timeout=4.0, limit=0) if uds
            # vLLM's uvicorn closes a connection idle for 5 s: reusing one
            # then would fail a request, so the pool lets go first.
            else aiohttp.TCPConnector(keepalive_timeout=4.0, limit=0)
        )
        # trust_env False (the default): no proxy from the environment, the
        # tunnel is on this machine. auto_decompress False: bytes pass as sent.
        return aiohttp.ClientSession(
            connector=connector, trust_env=False, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
        )  # fmt: skip

    def _upstream(self, record: SessionRecord) -> tuple[aiohttp.ClientSession, str]:
        """The client and base URL of a session's tunnel: its unix socket
        (one pooled client per socket), or its local port."""
        path = record.local_socket
        if not path:
            assert self.client is not None
            return self.client, f"http://127.0.0.1:{record.local_port}"
        client = self._socket_clients.get(path)
        if client is None:
            # A new session: forget the clients of sessions that ended (each
            # session has a socket of its own; a gateway runs for days).
            live = {r.handle.record.local_socket for slot in self.models.slots.values()
                    for r in slot.runs()}  # fmt: skip
            for gone in [p for p in self._socket_clients if p not in live]:
                old = self._socket_clients.pop(gone)
                task = asyncio.get_running_loop().create_task(old.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            client = self._socket_clients[path] = self._new_client(path)
        return client, "http://localhost"

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        if self.client is not None:
            await self.client.close()
        for client in self._socket_clients.values():
            await client.close()

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.idle_check)
            self.models.stop_idle(self.options.idle_timeout)
            self.models.roll_over(self.options.rollover_lead)

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:  # fmt: skip
        if self.page is not None and self.page.owns(request.path):
            return await handler(request)  # the page checks its own access
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not matches(token.strip(), self.key):
            return error(
                401,
                "Missing or wrong API key: send the gateway's key as 'Authorization: Bearer KEY'"
                " (`alvis-fsm gateway` prints it as OPENAI_API_KEY)",
                "invalid_request_error", "invalid_api_key",
            )  # fmt: skip
        return await handler(request)

    # -- routes -----------------------------------------------------------------
    def _row(self, slot: Slot) -> dict[str, Any]:
        left = slot.time_left()
        r = slot.handle.record if slot.handle is not None else None
        queued = r is not None and slot.state == QUEUED
        return {
            "id": slot.name, "object": "model", "created": int(self.started),
            "owned_by": "alvis-fsm", "aliases": [slot.served] if slot.served else [],
            "state": slot.state, "job_id": slot.job_id or None,
            "node": (r.node or None) if r is not None else None,
            "queue_reason": (r.queue_reason or None) if queued and r is not None else None,
            "expected_start": (r.expected_start or None) if queued and r is not None else None,
            "time_left": round(left) if left is not None else None,
            "error": slot.error or None,
        }  # fmt: skip

    async def list_models(self, request: web.Request) -> web.Response:
        rows = [self._row(slot) for slot in self.models.slots.values()]
        return web.json_response({"object": "list", "data": rows})

    async def status(self, request: web.Request) -> web.Response:
        rows = []
        for slot in self.models.slots.values():
            obs = slot.observer
            rows.append({
                **self._row(slot), "in_flight": slot.in_flight,
                "requests_served": slot.served_requests, "sessions_started": slot.sessions,
                "idle_stops": slot.idle_stops, "rollovers": slot.rollovers,
                "successor_job_id": (slot.successor.job_id or None) if slot.successor else None,
                "retiring_job_ids": [r.job_id for r in slot.retiring if r.job_id],
                "rollover_error": slot.rollover_error or None,
                "status": obs.status if obs else None,
                "gpu_hours_used": round(slot.gpu_hours_used, 4),
                "gpu_hours_saved": round(slot.gpu_hours_saved, 4),
                "log": list(obs.lines)[-10:] if obs else [],
            })  # fmt: skip
        slots = self.models.slots.values()
        return web.json_response({
            "models": rows, "held": self.held,
            "requests_served": sum(s.served_requests for s in slots),
            # Saved: what the jobs cancelled for idleness would have held until
            # their time limit had nobody stopped them.
            "gpu_hours_used": round(sum(s.gpu_hours_used for s in slots), 4),
            "gpu_hours_saved": round(sum(s.gpu_hours_saved for s in slots), 4),
        })  # fmt: skip

    async def not_found(self, request: web.Request) -> web.Response:
        return error(404, f"No route {request.method} {request.path} on the gateway",
                     "invalid_request_error", "not_found")  # fmt: skip

    async def post(self, request: web.Request) -> web.StreamResponse:
        if self.page is None:
            return await self._post(request, None)
        meter = self._meters[id(request)] = self.page.watch.begin(request.path)
        resp: web.StreamResponse | None = None
        try:
            resp = await self._post(request, meter)
            return resp
        finally:
            del self._meters[id(request)]
            # 499: the client went away first (as nginx logs it).
            self.page.watch.done(meter, resp.status if resp is not None else 499,
                                 _said(resp) if resp is not None and resp.status >= 400 else "")

    async def _post(self, request: web.Request, meter: Meter | None) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error(400, 'The body must be a JSON object naming a "model"',
                         "invalid_request_error", "invalid_body")  # fmt: skip
        slot = self.models.find(body["model"])
        if slot is None:
            names = ", ".join(self.models.names())
            return error(404, f"The model '{body['model']}' is not in the gateway's catalog."
                         f" Available models: {names}", "invalid_request_error",
                         "model_not_found")  # fmt: skip
        if meter is not None:
            meter.model, meter.stream = slot.name, bool(body.get("stream"))
        slot.enter()
        try:
            return await self._serve(request, slot, body)
        finally:
            slot.leave()

    async def _serve(self, request: web.Request, slot: Slot, body: dict[str, Any]
                     ) -> web.StreamResponse:  # fmt: skip
        if slot.handle is not None and slot.state == READY and not slot.stopping:
            return await self._proxy(request, slot, slot.handle, body, None)
        if self.held >= self.options.max_held:
            return _retry_later(f"{self.held} requests are already held while models start"
                                f" (gateway.max_held); {slot.name} is {slot.state}")  # fmt: skip
        self.held += 1
        try:
            if body.get("stream"):
                return await self._hold_stream(request, slot, body)
            try:
                handle = await asyncio.wait_for(
                    slot.ready(self.options.keepalive_interval), self.options.hold_timeout
                )
            except TimeoutError:
                return _retry_later(
                    f"{slot.name} is still starting ({slot.state}"
                    + (f", job {slot.job_id}" if slot.job_id else "")
                    + f") after {self.options.hold_timeout:.0f} s; retry later"
                )
            except Unavailable as exc:
                return error(503, str(exc), "service_unavailable", "model_failed")
        finally:
            self.held -= 1
        return await self._proxy(request, slot, handle, body, None)

    async def _hold_stream(self, request: web.Request, slot: Slot, body: dict[str, Any]
                           ) -> web.StreamResponse:  # fmt: skip
        """200 at once, SSE comments while the model starts, then its stream."""
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        })  # fmt: skip
        await resp.prepare(request)

        async def keep_alive(state: str) -> None:
            await resp.write(f": keep-alive {state}\n\n".encode())

        try:
            handle = await slot.ready(self.options.keepalive_interval, keep_alive)
        except Unavailable as exc:
            await resp.write(_sse({"error": {"message": str(exc), "type": "service_unavailable",
                                             "param": None, "code": "model_failed"}}))  # fmt: skip
            await resp.write_eof()
            return resp
        self.held -= 1  # no longer held: proxied (the caller's finally adds it back)
        try:
            return await self._proxy(request, slot, handle, body, resp)
        finally:
            self.held += 1

    async def _proxy(self, request: web.Request, slot: Slot, handle: Handle,
                     body: dict[str, Any], prepared: web.StreamResponse | None
                     ) -> web.StreamResponse:  # fmt: skip
        """Forward to the session's tunnel with its own key and served name;
        the answer goes back chunk by chunk as it comes, never buffered.
        Counted in flight on that session (not only on the model), so a
        session replaced by a rollover is stopped only after its own."""
        handle = slot.begin(handle)
        served = False
        try:
            resp, served = await self._forward(request, slot, handle, body, prepared)
            return resp
        finally:
            slot.finish(handle, served)
            if (meter := self._meters.get(id(request))) is not None:
                meter.served = served

    async def _forward(self, request: web.Request, slot: Slot, handle: Handle,
                       body: dict[str, Any], prepared: web.StreamResponse | None
                       ) -> tuple[web.StreamResponse, bool]:  # fmt: skip
        """``_proxy``'s work: the response, and whether it went out whole."""
        r = handle.record
        client, base = self._upstream(r)
        body = {**body, "model": r.served_name or slot.served}
        # The client's own Accept-Encoding (else aiohttp's default would ask
        # for gzip): the answer's bytes pass through as they are.
        headers = {"Content-Type": "application/json",
                   "Accept": request.headers.get("Accept", "*/*"),
                   "Accept-Encoding": request.headers.get("Accept-Encoding", "identity")}  # fmt: skip
        if r.api_key:
            headers["Authorization"] = f"Bearer {r.api_key}"
        try:
            answer = await client.post(base + request.path_qs, data=json.dumps(body).encode(),
                                       headers=headers)  # fmt: skip
        except (aiohttp.ClientError, OSError) as exc:
            message = f"{slot.name}: its server did not answer ({type(exc).__name__}); retry"
            if prepared is not None:
                await prepared.write(_sse({"error": {"message": message, "type":
                                     "service_unavailable", "param": None, "code": None}}))  # fmt: skip
                await prepared.write_eof()
                return prepared, False
            return _retry_later(message), False
        try:
            if prepared is not None and answer.status != 200:
                # The 200 is sent already: the error goes as an SSE event.
                said = (await answer.read()).decode("utf-8", "replace")
                with contextlib.suppress(ValueError):
                    parsed = json.loads(said)
                    said = (parsed.get("error") or {}).get("message") or parsed.get("message") or said
                await prepared.write(_sse({"error": {"message": said, "type": "upstream_error",
                                                     "param": None, "code": answer.status}}))
                await prepared.write_eof()
                return prepared, False
            resp = prepared
            if resp is None:
                resp = web.StreamResponse(status=answer.status, headers={
                    k: v for k, v in answer.headers.items() if k.lower() not in _HOP
                })  # fmt: skip
                await resp.prepare(request)
            # As it comes, whatever the upstream's chunks: never buffered.
            meter = self._meters.get(id(request))
            async for chunk in answer.content.iter_any():
                await resp.write(chunk)
                if meter is not None:
                    meter.feed(chunk)
            await resp.write_eof()
            return resp, True
        finally:
            answer.release()


def _said(resp: web.StreamResponse) -> str:
    """The message of an error body the gateway made (for the page)."""
    if isinstance(resp, web.Response) and isinstance(resp.body, bytes):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return str(json.loads(resp.body)["error"]["message"])
    return ""


@dataclass
class Serving:
    """A running gateway (``serve``): its runner, and the port it took."""

    runner: web.AppRunner
    port: int


async def serve(gateway: Gateway, host: str, port: int) -> Serving:
    runner = web.AppRunner(gateway.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = [a for a in runner.addresses if isinstance(a, tuple)]
    return Serving(runner, int(bound[0][1]) if bound else port)
