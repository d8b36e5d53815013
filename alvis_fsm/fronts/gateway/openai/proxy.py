"""The gateway's ``POST /v1/...``: a request's JSON body read within bounds,
routed by its ``model`` to that model's session, held while the session
starts (a stream gets SSE comments meanwhile), then forwarded to the
session's tunnel with aiohttp's client, chunk by chunk (never buffered).

``Gateway`` (server.py) owns the app, its middlewares and the other routes;
this is its collaborator for the one route that reaches vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from alvis_fsm.engine.session.store import SessionRecord
from alvis_fsm.fronts.gateway.slot.models import READY, Handle, Models, Slot, Unavailable

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.observe.watch import Meter, Watch
    from alvis_fsm.fronts.gateway.server import Options

# Headers that belong to one hop, never passed on.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "date",
    "server",
}
RETRY_AFTER = 30  # seconds, for a request refused while its model starts
MAX_DEPTH = 64  # levels of JSON nesting in a request body
JSON_TYPES = ("application/json", "text/json")  # or any ``+json``; none given is JSON too


def error(
    status: int,
    message: str,
    kind: str,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-style error body: ``{"error": {"message", "type", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _retry_later(message: str) -> web.Response:
    return error(
        503,
        message,
        "service_unavailable",
        "model_starting",
        headers={"Retry-After": str(RETRY_AFTER), "x-should-retry": "true"},
    )


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class BadBody(Exception):
    """A request body the gateway refuses (4xx), with its answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


class BodyTimeout(BadBody, TimeoutError):
    """A body that did not arrive within ``body_timeout``: the 408 every
    route's read raises. Set on the request's body stream when the time is
    up (``arm``), so it reaches whatever is waiting on it (``request.read``,
    ``request.json``, a multipart reader) and aiohttp's own read of the
    rest, which takes a ``TimeoutError`` as its cue to close the connection."""

    def __init__(self, seconds: float) -> None:
        response = error(
            408,
            f"The request body did not arrive within {seconds:g} s",
            "invalid_request_error",
            "request_timeout",
        )
        response.force_close()  # the rest of the body may still come: never read as a request
        super().__init__(response)

    @classmethod
    def arm(cls, request: web.Request, seconds: float) -> asyncio.TimerHandle | None:
        """The request's body deadline, ``seconds`` from now (its headers are
        in); None for a request without a body. Cancel it once the request ends."""
        if not request.body_exists:
            return None
        stream = request.content

        def due() -> None:
            if not stream.is_eof():
                stream.set_exception(cls(seconds))

        return asyncio.get_running_loop().call_later(seconds, due)


async def read_json(request: web.Request, expected: str) -> object:
    """A request's JSON body (any route's): ``BadBody`` for what is not a
    JSON document of sane size and nesting (``expected`` says what the
    route wants, for the message); its time is bounded by the request's
    ``BodyTimeout``."""
    given = request.headers.get("Content-Type", "")
    kind = given.partition(";")[0].strip().lower()
    if given and kind not in JSON_TYPES and not kind.endswith("+json"):
        raise BadBody(
            error(
                415,
                f"The body must be JSON (Content-Type: application/json), not {kind!r}",
                "invalid_request_error",
                "unsupported_media_type",
            )
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadBody(
            error(
                413,
                f"The request body is larger than {request.client_max_size} bytes",
                "invalid_request_error",
                "request_too_large",
            )
        ) from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:
        body, depth = None, MAX_DEPTH + 1
    except ValueError:  # not UTF-8, not JSON
        raise BadBody(
            error(
                400,
                f"The body is not valid JSON ({expected})",
                "invalid_request_error",
                "invalid_json",
            )
        ) from None
    else:
        depth = _depth(body)
    if depth > MAX_DEPTH:
        raise BadBody(
            error(
                400,
                f"The body's JSON is nested deeper than {MAX_DEPTH} levels",
                "invalid_request_error",
                "invalid_json",
            )
        )
    return body


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


class Proxy:
    """``POST /v1/...`` for a ``Gateway``: held requests counted, pooled
    clients to the sessions' tunnels (one per unix socket), each request
    metered on the page's ``watch`` when there is one."""

    def __init__(self, models: Models, options: Options) -> None:
        self.models = models
        self.options = options
        self.held = 0
        self.client: aiohttp.ClientSession | None = None  # to sessions' local ports
        self._socket_clients: dict[str, aiohttp.ClientSession] = {}  # one per tunnel socket
        self._closing: set[asyncio.Task[None]] = set()  # clients of ended sessions, closing

    def open(self) -> None:
        """The pooled client, made inside the running loop (the app's start-up)."""
        self.client = self._new_client()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        for client in self._socket_clients.values():
            await client.close()

    @staticmethod
    def _new_client(uds: str = "") -> aiohttp.ClientSession:
        """A pooled client to sessions' tunnels (a unix socket, else local
        ports). aiohttp's, not httpx's: the gateway is aiohttp end to end, and
        its C parser passes a stream on ~3× faster than httpx's h11 (36 vs 10
        MB/s of SSE on one core), which a proxy of token streams needs."""
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=uds, keepalive_timeout=4.0, limit=0)
            if uds
            # vLLM's uvicorn closes a connection idle for 5 s: reusing one
            # then would fail a request, so the pool lets go first.
            else aiohttp.TCPConnector(keepalive_timeout=4.0, limit=0)
        )
        # trust_env False (the default): no proxy from the environment, the
        # tunnel is on this machine. auto_decompress False: bytes pass as sent.
        return aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
        )

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
            live = {
                r.handle.record.local_socket
                for slot in self.models.slots.values()
                for r in slot.runs()
            }
            for gone in [p for p in self._socket_clients if p not in live]:
                old = self._socket_clients.pop(gone)
                task = asyncio.get_running_loop().create_task(old.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            client = self._socket_clients[path] = self._new_client(path)
        return client, "http://localhost"

    async def post(self, request: web.Request, watch: Watch | None) -> web.StreamResponse:
        """The route, metered on ``watch`` (the page's) when there is one."""
        if watch is None:
            return await self._post(request, None)
        meter = watch.begin(request.path)
        resp: web.StreamResponse | None = None
        try:
            resp = await self._post(request, meter)
            return resp
        except BadBody as bad:
            resp = bad.response
            raise
        finally:
            # 499: the client went away first (as nginx logs it).
            watch.done(
                meter,
                resp.status if resp is not None else 499,
                _said(resp) if resp is not None and resp.status >= 400 else "",
            )

    async def _post(self, request: web.Request, meter: Meter | None) -> web.StreamResponse:
        body = await read_json(request, 'a JSON object naming a "model"')
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error(
                400,
                'The body must be a JSON object naming a "model"',
                "invalid_request_error",
                "invalid_body",
            )
        slot = self.models.find(body["model"])
        if slot is None:
            names = ", ".join(self.models.names())
            return error(
                404,
                f"The model '{body['model']}' is not in the gateway's catalog."
                f" Available models: {names}",
                "invalid_request_error",
                "model_not_found",
            )
        if meter is not None:
            meter.model, meter.stream = slot.name, bool(body.get("stream"))
        slot.enter()
        try:
            return await self._serve(request, slot, body, meter)
        finally:
            slot.leave()

    async def _serve(
        self, request: web.Request, slot: Slot, body: dict[str, Any], meter: Meter | None
    ) -> web.StreamResponse:
        if slot.handle is not None and slot.state == READY and not slot.stopping:
            return await self._proxy(request, slot, slot.handle, body, None, meter)
        if self.held >= self.options.max_held:
            return _retry_later(
                f"{self.held} requests are already held while models start"
                f" (gateway.max_held); {slot.name} is {slot.state}"
            )
        self.held += 1
        try:
            if body.get("stream"):
                return await self._hold_stream(request, slot, body, meter)
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
        return await self._proxy(request, slot, handle, body, None, meter)

    async def _hold_stream(
        self, request: web.Request, slot: Slot, body: dict[str, Any], meter: Meter | None
    ) -> web.StreamResponse:
        """200 at once, SSE comments while the model starts, then its stream."""
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )
        await resp.prepare(request)

        async def keep_alive(state: str) -> None:
            with contextlib.suppress(
                ConnectionResetError
            ):  # the client went away: the next write says so
                await resp.write(f": keep-alive {state}\n\n".encode())

        try:
            handle = await slot.ready(self.options.keepalive_interval, keep_alive)
        except Unavailable as exc:
            await resp.write(
                _sse(
                    {
                        "error": {
                            "message": str(exc),
                            "type": "service_unavailable",
                            "param": None,
                            "code": "model_failed",
                        }
                    }
                )
            )
            await resp.write_eof()
            return resp
        self.held -= 1  # no longer held: proxied (the caller's finally adds it back)
        try:
            return await self._proxy(request, slot, handle, body, resp, meter)
        finally:
            self.held += 1

    async def _proxy(
        self,
        request: web.Request,
        slot: Slot,
        handle: Handle,
        body: dict[str, Any],
        prepared: web.StreamResponse | None,
        meter: Meter | None,
    ) -> web.StreamResponse:
        """Forward to the session's tunnel with its own key and served name;
        the answer goes back chunk by chunk as it comes, never buffered.
        Counted in flight on that session (not only on the model), so a
        session replaced by a rollover is stopped only after its own."""
        handle = slot.begin(handle)
        served = False
        try:
            resp, served = await self._forward(request, slot, handle, body, prepared, meter)
            return resp
        finally:
            slot.finish(handle, served)
            if meter is not None:
                meter.served = served

    async def _forward(
        self,
        request: web.Request,
        slot: Slot,
        handle: Handle,
        body: dict[str, Any],
        prepared: web.StreamResponse | None,
        meter: Meter | None,
    ) -> tuple[web.StreamResponse, bool]:
        """``_proxy``'s work: the response, and whether it went out whole."""
        r = handle.record
        client, base = self._upstream(r)
        body = {**body, "model": r.served_name or slot.served}
        try:
            answer = await client.post(
                base + request.path_qs,
                data=json.dumps(body).encode(),
                headers=_upstream_headers(request, r.api_key),
            )
        except (aiohttp.ClientError, OSError) as exc:
            message = f"{slot.name}: its server did not answer ({type(exc).__name__}); retry"
            if prepared is not None:
                await _end_with_error(prepared, message, "service_unavailable", None)
                return prepared, False
            return _retry_later(message), False
        resp = prepared
        try:
            if prepared is not None and answer.status != 200:
                # The 200 is sent already: the error goes as an SSE event.
                said = _message_of((await answer.read()).decode("utf-8", "replace"))
                await _end_with_error(prepared, said, "upstream_error", answer.status)
                return prepared, False
            if resp is None:
                resp = web.StreamResponse(
                    status=answer.status,
                    headers={k: v for k, v in answer.headers.items() if k.lower() not in _HOP},
                )
                await resp.prepare(request)
            # As it comes, whatever the upstream's chunks: never buffered.
            async for chunk in answer.content.iter_any():
                await resp.write(chunk)
                if meter is not None:
                    meter.feed(chunk)
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


def _upstream_headers(request: web.Request, api_key: str | None) -> dict[str, str]:
    """What the gateway sends its session's server. The client's own
    Accept-Encoding (else aiohttp's default would ask for gzip): the
    answer's bytes pass through as they are."""
    headers = {
        "Content-Type": "application/json",
        "Accept": request.headers.get("Accept", "*/*"),
        "Accept-Encoding": request.headers.get("Accept-Encoding", "identity"),
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _message_of(said: str) -> str:
    """An upstream error body's message (OpenAI's or vLLM's shape), else the body."""
    with contextlib.suppress(ValueError, AttributeError):
        parsed = json.loads(said)
        return str((parsed.get("error") or {}).get("message") or parsed.get("message") or said)
    return said


async def _end_with_error(
    prepared: web.StreamResponse, message: str, kind: str, code: int | None
) -> None:
    """A stream whose 200 is sent already ends with its error as an SSE event."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    await prepared.write(_sse({"error": error}))
    await prepared.write_eof()


def _said(resp: web.StreamResponse) -> str:
    """The message of an error body the gateway made (for the page)."""
    if isinstance(resp, web.Response) and isinstance(resp.body, bytes):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return str(json.loads(resp.body)["error"]["message"])
    return ""
