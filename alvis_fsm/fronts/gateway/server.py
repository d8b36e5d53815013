"""The gateway's HTTP app (aiohttp): the key check, ``GET /v1/models``,
``/gateway/status``, and every ``POST /v1/...`` routed by its JSON ``model``
to that model's session, held while the session starts, then proxied to the
session's tunnel with aiohttp's client, chunk by chunk (that route is
``Proxy``'s, gateway/proxy.py; the files and batches routes are
gateway/batches.py's, the page's gateway/page.py's).

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from alvis_fsm.cluster.remote import guard
from alvis_fsm.fronts.gateway.keys import matches
from alvis_fsm.fronts.gateway.observe.rows import ModelRow, Totals
from alvis_fsm.fronts.gateway.openai.batches import Batches
from alvis_fsm.fronts.gateway.openai.proxy import BadBody, BodyTimeout, Proxy, error
from alvis_fsm.fronts.gateway.slot.models import Models
from alvis_fsm.paths import packaged_default

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.page.routes import Page


def _setting(key: str) -> Any:
    """A field whose default is the setting's packaged one (default.toml)."""
    return field(default_factory=lambda: packaged_default(key))


@dataclass
class Options:
    """The gateway's bounds; those that are settings default to the packaged values."""

    hold_timeout: float = _setting("gateway.hold_timeout")
    idle_timeout: float = _setting("gateway.idle_timeout")
    max_held: int = _setting("gateway.max_held")
    keepalive_interval: float = 5.0  # between SSE comments to a held stream
    idle_check: float = 5.0  # how often idle sessions (and time limits) are looked at
    rollover_lead: float = _setting(
        "gateway.rollover_lead"
    )  # a successor's least lead before the time limit
    header_timeout: float = 15.0  # a request's headers, and the idle time between requests
    body_timeout: float = _setting(
        "gateway.body_timeout"
    )  # a request's body, once its headers are in
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


class _Refuse(asyncio.Protocol):
    """A connection over the cap while every open one is inside a request:
    a 503 at once, and closed (no descriptor kept)."""

    BODY = json.dumps(
        {
            "error": {
                "message": "The gateway has too many open connections; retry",
                "type": "service_unavailable",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
            + str(len(self.BODY)).encode()
            + b"\r\n\r\n"
            + self.BODY
        )
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

    @property
    def open(self) -> int:
        return len(self.live) + self.pending

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open >= self.cap:
            oldest = next((c for c in self.live if c.handler not in self.busy), None)
            if oldest is None:
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
        self._server = await loop.create_server(
            self._limit, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


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
    def __init__(
        self,
        key: str,
        models: Models,
        options: Options | None = None,
        batches: Batches | None = None,
    ) -> None:
        self.key = key
        self.batches = batches  # /v1/files and /v1/batches (gateway/batches.py)
        self.models = models
        self.options = options or Options()
        self.proxy = Proxy(models, self.options)  # POST /v1/... (gateway/proxy.py)
        self._idle_task: asyncio.Task[None] | None = None
        self.started = time.time()
        self.connections: Connections | None = None  # set by serve()
        self.page: Page | None = None  # the browser page, /metrics and the request log

    # -- the app --------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=self.options.max_body
        )
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/gateway/status", self.status)
        if self.batches is not None:
            self.batches.register(app.router)
        app.router.add_post("/v1/{tail:.*}", self.post)
        if self.page is not None:
            self.page.register(app)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.proxy.open()
        self._idle_task = asyncio.create_task(self._idle_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        await self.proxy.close()

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.idle_check)
            self.models.stop_idle(self.options.idle_timeout)
            self.models.roll_over(self.options.rollover_lead)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Outermost: marks the connection inside a request (see
        ``Connections``); gives its body ``body_timeout`` to arrive, whatever
        the route reads it with (``BodyTimeout``); bad input, and aiohttp's
        own 4xx answers, in OpenAI's shape; no request ever ends in a
        traceback."""
        limit = self.connections
        if limit is not None:
            limit.busy.add(request.protocol)
        deadline = BodyTimeout.arm(request, self.options.body_timeout)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error(
                exc.status,
                exc.text or exc.reason,
                "invalid_request_error",
                exc.reason.lower().replace(" ", "_"),
            )
        except BadBody as exc:
            return exc.response
        except BadHttpMessage as exc:  # aiohttp's parser on a body part (multipart headers)
            return error(
                400,
                f"The request body is malformed: {exc.message}"[:300],
                "invalid_request_error",
                "invalid_body",
            )
        finally:
            if deadline is not None:
                deadline.cancel()
            if limit is not None:
                limit.busy.discard(request.protocol)

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.page is not None and self.page.owns(request.path):
            # The page checks its own access: cookie, CSRF, its own origin and
            # a loopback Host with the gateway's port.
            return await handler(request)
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
                "invalid_request_error",
                "invalid_api_key",
            )
        return await handler(request)

    # -- routes -----------------------------------------------------------------
    def _listed(self, row: ModelRow) -> dict[str, Any]:
        """A model as ``GET /v1/models`` lists it (OpenAI's shape, and its state)."""
        return {
            "id": row.name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "alvis-fsm",
            "aliases": [row.served] if row.served else [],
            "state": row.state,
            "job_id": row.job_id,
            "node": row.node,
            "queue_reason": row.queue_reason,
            "expected_start": row.expected_start,
            "time_left": row.time_left,
            "error": row.error,
        }

    async def list_models(self, request: web.Request) -> web.Response:
        rows = [self._listed(ModelRow.of(slot)) for slot in self.models.slots.values()]
        return web.json_response({"object": "list", "data": rows})

    async def status(self, request: web.Request) -> web.Response:
        rows = []
        for slot in self.models.slots.values():
            row = ModelRow.of(slot)
            rows.append(
                {
                    **self._listed(row),
                    "in_flight": row.in_flight,
                    "requests_served": row.served_requests,
                    "sessions_started": row.sessions,
                    "idle_stops": row.idle_stops,
                    "rollovers": row.rollovers,
                    "successor_job_id": row.successor_job_id,
                    "retiring_job_ids": list(row.retiring_job_ids),
                    "rollover_error": row.rollover_error,
                    "status": row.status,
                    "gpu_hours_used": row.gpu_hours_used,
                    "gpu_hours_saved": row.gpu_hours_saved,
                    "log": list(row.log),
                }
            )
        totals = Totals.of(self.models)
        return web.json_response(
            {
                "models": rows,
                "held": self.held,
                "requests_served": totals.requests_served,
                "gpu_hours_used": totals.gpu_hours_used,
                "gpu_hours_saved": totals.gpu_hours_saved,
            }
        )

    @property
    def held(self) -> int:
        """Requests held while their model starts."""
        return self.proxy.held

    async def post(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.post(request, self.page.watch if self.page is not None else None)

    async def not_found(self, request: web.Request) -> web.Response:
        return error(
            404,
            f"No route {request.method} {request.path} on the gateway",
            "invalid_request_error",
            "not_found",
        )


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
    runner = web.AppRunner(
        gateway.app(), access_log=None, handle_signals=False, keepalive_timeout=o.header_timeout
    )
    await runner.setup()
    assert runner.server is not None
    gateway.connections = Connections(runner.server, o.max_connections or fd_connections())
    site = _Site(runner, host, port, gateway.connections)
    await site.start()
    bound = [a for a in runner.addresses if isinstance(a, tuple)]
    return Serving(runner, int(bound[0][1]) if bound else port)
