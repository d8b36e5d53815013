"""The gateway's HTTP app (aiohttp, imported only here): the key check,
``GET /v1/models``, and every ``POST /v1/...`` routed by its JSON ``model``
to that model's session, held while the session starts, then proxied to the
session's tunnel with aiohttp's client, chunk by chunk.

Bounded (issue 22, findings 3 and 4): a connection must send its request's
headers within ``header_timeout`` (also the idle time between requests) and
its body within ``body_timeout``; at most ``max_connections`` are open (by
default what the process's descriptor limit leaves room for): at the cap a
new connection takes the place of the oldest idle one, or is refused with a
503 when every one is inside a request. Bodies are limited in size and JSON
in nesting; bad input is a 4xx with an OpenAI-style error body, never a 500;
a client that goes away mid-answer is not an error. The libraries' own log
records (aiohttp's, asyncio's) reach the output as single inert lines, at
most a few a minute."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from alvis_fsm.cluster import guard
from alvis_fsm.engine.store import SessionRecord
from alvis_fsm.fronts.gateway.batches import Batches
from alvis_fsm.fronts.gateway.keys import matches
from alvis_fsm.fronts.gateway.models import QUEUED, READY, Handle, Models, Slot, Unavailable

# Headers that belong to one hop, never passed on.
_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "date", "server",
}  # fmt: skip
RETRY_AFTER = 30  # seconds, for a request refused while its model starts
MAX_DEPTH = 64  # levels of JSON nesting in a request body
JSON_TYPES = ("application/json", "text/json")  # or any ``+json``; none given is JSON too


@dataclass
class Options:
    hold_timeout: float = 540.0
    idle_timeout: float = 900.0
    max_held: int = 256
    keepalive_interval: float = 5.0  # between SSE comments to a held stream
    idle_check: float = 5.0  # how often idle sessions (and time limits) are looked at
    rollover_lead: float = 600.0  # the least lead of a successor before a job's time limit
    header_timeout: float = 15.0  # a request's headers, and the idle time between requests
    body_timeout: float = 60.0  # a request's body, once its headers are in
    max_body: int = 64 * 1024 * 1024  # bytes
    max_connections: int = 0  # 0: what the descriptor limit leaves room for


def fd_connections() -> int:
    """How many client connections fit in the process's descriptor limit
    (macOS's default ``ulimit -n`` is 256): each may hold one more to its
    session's tunnel, and the sessions' ssh, pipes and logs need some."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 65536:
        soft = 65536
    return max(8, min(4096, (soft - 64) // 2))


def _depth(value: object) -> int:
    """The nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                break
            todo += [(v, level + 1) for v in item]
    return deepest


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


class BadBody(Exception):
    """A request body the gateway refuses (4xx), with its answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


class _Refuse(asyncio.Protocol):
    """A connection over the cap while every open one is inside a request:
    a 503 at once, and closed (no descriptor kept)."""

    BODY = json.dumps({"error": {
        "message": "The gateway has too many open connections; retry", "type": "service_unavailable",
        "param": None, "code": "too_many_connections",
    }}).encode()  # fmt: skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
            + str(len(self.BODY)).encode() + b"\r\n\r\n" + self.BODY
        )  # fmt: skip
        transport.close()


class _Tracked(asyncio.Protocol):
    """One accepted connection: aiohttp's handler, seen by ``Connections``
    from its first to its last moment (aiohttp's own list keeps a closed
    connection until its handler's task ends)."""

    def __init__(self, owner: Connections, handler: asyncio.Protocol) -> None:
        self.owner = owner
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.since = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.owner.pending -= 1
        self.transport = transport
        self.owner.live[self] = None
        self.handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.live.pop(self, None)
        self.handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class Connections:
    """The cap on open connections (the protocol factory of the listener):
    at the cap, the oldest connection not inside a request (a half-sent
    request, an idle keep-alive) is closed to make room; when every one is
    inside a request, the new one is refused."""

    def __init__(self, server: web.Server, cap: int) -> None:
        self.server = server
        self.cap = cap
        self.live: dict[_Tracked, None] = {}  # open, oldest first
        self.pending = 0  # accepted, not yet started
        self.busy: set[object] = set()  # aiohttp handlers inside a request
        self.evicted = 0
        self.refused = 0

    @property
    def open(self) -> int:
        return len(self.live) + self.pending

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open >= self.cap:
            oldest = next((c for c in self.live if c.handler not in self.busy), None)
            if oldest is None:
                self.refused += 1
                return _Refuse()
            del self.live[oldest]
            assert oldest.transport is not None
            oldest.transport.close()
            self.evicted += 1
        self.pending += 1
        return _Tracked(self, self.server())


class _Site(web.BaseSite):
    """A TCP listener whose connections go through ``Connections``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limit: Connections) -> None:
        super().__init__(runner, backlog=max(16, min(128, limit.cap // 3)))
        self._host, self._port, self._limit = host, port, limit

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._limit, self._host, self._port,
                                                backlog=self._backlog, reuse_address=True)  # fmt: skip


class LibraryLog(logging.Handler):
    """aiohttp's and asyncio's own log records (a server out of descriptors
    logs one per failed accept), as single inert lines through ``echo``, at
    most ``burst`` a minute; how many were left out is said with the next."""

    def __init__(self, echo: Callable[[str], None], burst: int = 5) -> None:
        super().__init__(logging.WARNING)
        self.echo = echo
        self.burst = burst
        self.window = 0.0
        self.count = 0
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self.window >= 60:
            self.window, self.count = now, 0
        self.count += 1
        if self.count > self.burst:
            self.dropped += 1
            return
        lines = record.getMessage().splitlines()
        text = lines[0] if lines else ""
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f": {type(exc).__name__}: {exc}".splitlines()[0]
        if self.dropped:
            text += f" ({self.dropped} similar lines left out)"
            self.dropped = 0
        self.echo(f"[gateway] {record.name}: {text}"[:500])

    @classmethod
    def install(cls, echo: Callable[[str], None]) -> LibraryLog:
        handler = cls(echo)
        for name in ("aiohttp", "asyncio"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.propagate = False  # not also to logging's last resort (stderr, tracebacks)
        return handler


class Gateway:
    def __init__(self, key: str, models: Models, options: Options | None = None,
                 batches: Batches | None = None) -> None:  # fmt: skip
        self.key = key
        self.batches = batches  # /v1/files and /v1/batches (gateway/batches.py)
        self.models = models
        self.options = options or Options()
        self.held = 0
        self.client: aiohttp.ClientSession | None = None  # to sessions' local ports
        self._socket_clients: dict[str, aiohttp.ClientSession] = {}  # one per tunnel socket
        self._idle_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # clients of ended sessions, closing
        self.started = time.time()
        self.connections: Connections | None = None  # set by serve()

    # -- the app --------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth],
                              client_max_size=self.options.max_body)  # fmt: skip
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/gateway/status", self.status)
        if self.batches is not None:
            self.batches.register(app.router)
        app.router.add_post("/v1/{tail:.*}", self.post)
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
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:  # fmt: skip
        """Outermost: marks the connection inside a request (see
        ``Connections``); aiohttp's own 4xx answers in OpenAI's shape; no
        request ever ends in a traceback."""
        limit = self.connections
        if limit is not None:
            limit.busy.add(request.protocol)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error(exc.status, exc.text or exc.reason, "invalid_request_error",
                         exc.reason.lower().replace(" ", "_"))  # fmt: skip
        except BadBody as exc:
            return exc.response
        finally:
            if limit is not None:
                limit.busy.discard(request.protocol)

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:  # fmt: skip
        # No web page may use the gateway: loopback Host only (DNS rebinding),
        # no other origin, no CORS grant; the same check guards vLLM itself.
        seen = guard.header_map(request.headers.items())
        refused = guard.host_refusal(seen) or guard.origin_refusal(seen)
        if refused is not None:
            return error(refused.status, refused.message, "permission_error", refused.code)
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

    async def _body(self, request: web.Request) -> object:
        """The request's JSON, read within ``body_timeout``; ``BadBody``
        for what is not a JSON document of sane size and nesting."""
        given = request.headers.get("Content-Type", "")
        kind = given.partition(";")[0].strip().lower()
        if given and kind not in JSON_TYPES and not kind.endswith("+json"):
            raise BadBody(error(415, f"The body must be JSON (Content-Type: application/json), not {kind!r}",
                                "invalid_request_error", "unsupported_media_type"))  # fmt: skip
        try:
            raw = await asyncio.wait_for(request.read(), self.options.body_timeout)
        except TimeoutError:
            raise BadBody(error(408, f"The request body did not arrive within {self.options.body_timeout:.0f} s",
                                "invalid_request_error", "request_timeout")) from None  # fmt: skip
        except web.HTTPRequestEntityTooLarge:
            raise BadBody(error(413, f"The request body is larger than {self.options.max_body} bytes",
                                "invalid_request_error", "request_too_large")) from None  # fmt: skip
        try:
            body = json.loads(raw.decode("utf-8"))
        except RecursionError:
            body, depth = None, MAX_DEPTH + 1
        except ValueError:  # not UTF-8, not JSON
            raise BadBody(error(400, 'The body is not valid JSON (a JSON object naming a "model")',
                                "invalid_request_error", "invalid_json")) from None  # fmt: skip
        else:
            depth = _depth(body)
        if depth > MAX_DEPTH:
            raise BadBody(error(400, f"The body's JSON is nested deeper than {MAX_DEPTH} levels",
                                "invalid_request_error", "invalid_json"))  # fmt: skip
        return body

    async def post(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error(400, 'The body must be a JSON object naming a "model"',
                         "invalid_request_error", "invalid_body")  # fmt: skip
        slot = self.models.find(body["model"])
        if slot is None:
            names = ", ".join(self.models.names())
            return error(404, f"The model '{body['model']}' is not in the gateway's catalog."
                         f" Available models: {names}", "invalid_request_error",
                         "model_not_found")  # fmt: skip
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
            with contextlib.suppress(ConnectionResetError):  # the client went away: the next write says so
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
        resp = prepared
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
            if resp is None:
                resp = web.StreamResponse(status=answer.status, headers={
                    k: v for k, v in answer.headers.items() if k.lower() not in _HOP
                })  # fmt: skip
                await resp.prepare(request)
            # As it comes, whatever the upstream's chunks: never buffered.
            async for chunk in answer.content.iter_any():
                await resp.write(chunk)
        except ConnectionResetError:
            # The client went away mid-answer (aiohttp's ClientConnectionResetError):
            # its own choice, not the gateway's error, and nothing to tell it.
            return resp or web.Response(status=499), False
        finally:
            answer.release()
        with contextlib.suppress(ConnectionResetError):
            # The client may close as soon as it has the last chunk: it has
            # its answer whether or not the end of the stream reaches it.
            await resp.write_eof()
        return resp, True


@dataclass
class Serving:
    """A running gateway (``serve``): its runner, and the port it took."""

    runner: web.AppRunner
    port: int


async def serve(gateway: Gateway, host: str, port: int) -> Serving:
    o = gateway.options
    # aiohttp closes a connection that has not sent a whole request within
    # its keep-alive timeout (from the accept, and between requests): the
    # header timeout. Its parser refuses long header lines (8190 bytes) and
    # more than 128 headers with a 400.
    runner = web.AppRunner(gateway.app(), access_log=None, handle_signals=False,
                           keepalive_timeout=o.header_timeout)  # fmt: skip
    await runner.setup()
    assert runner.server is not None
    gateway.connections = Connections(runner.server, o.max_connections or fd_connections())
    site = _Site(runner, host, port, gateway.connections)
    await site.start()
    bound = [a for a in runner.addresses if isinstance(a, tuple)]
    return Serving(runner, int(bound[0][1]) if bound else port)
