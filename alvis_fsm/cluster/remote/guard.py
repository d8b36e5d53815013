"""The guard in front of vLLM: the key on every path, loopback ``Host`` only,
no other origin.

vLLM 0.11 checks its API key only under ``/v1``: ``/invocations`` (which runs
a completion), ``/tokenize``, ``/metrics``, ``/pooling``, ``/score`` ... answer
anyone who can connect; its CORS grants every origin and it never looks at
``Host``. So any web page in the user's browser could use ``start``'s port
(DNS rebinding too), and route ``login``'s TCP port serves every cluster user.

This module is shipped by the job script into the run directory and loaded
by ``vllm serve --middleware alvis_fsm_guard.Guard``: vLLM adds it with
``app.add_middleware`` after its own CORS and key middlewares, so it is the
outermost layer and sees every request first. It must import inside the vLLM
container: **standard library only, nothing from alvis_fsm**.

One check, used by everything that guards a listener: ``refusal`` is a pure
function of a request's method and headers. ``Guard`` (ASGI, for vLLM), the
lab's stand-in for vLLM (``tests/lab/bin/vllm --middleware``) and the
gateway all apply it.

It answers no challenge and proves nothing: a listener others can reach
(route ``login``'s TCP port on the node) that signed a nonce for anyone
would be an oracle, and a local process holding the laptop's port could
relay the tool's challenge to it and be trusted with the key (issue 31).
The tool's own checks trust a channel instead of an answer: they go
through the tunnel's private unix socket (``cluster/tunnel.py``,
``health``)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

MODULE = "alvis_fsm_guard"  # the name the job script ships this file under
CLASS = "Guard"
MIDDLEWARE = f"{MODULE}.{CLASS}"  # vllm serve --middleware MIDDLEWARE
KEY_ENV = "VLLM_API_KEY"  # the key vLLM itself reads (the job script sets it)

# host[:port]; an IPv6 address in brackets.
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]+))(?::(?P<port>[0-9]{1,5}))?")


@dataclass(frozen=True)
class Refusal:
    """An answer the guard gives instead of the server: an OpenAI-style
    error body and no CORS header, so a web page can read nothing."""

    status: int
    reason: str
    message: str
    code: str
    headers: tuple[tuple[str, str], ...] = field(default=())

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status == 401 else "permission_error"
        return json.dumps(
            {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}
        ).encode()

    def all_headers(self) -> list[tuple[str, str]]:
        return [
            ("content-type", "application/json"),
            ("content-length", str(len(self.body()))),
            ("cache-control", "no-store"),
            *self.headers,
        ]


def loopback_host(value: str) -> bool:
    """True for ``localhost``, a 127.0.0.0/8 address or ``[::1]``, with or
    without a port: the names the tool's own clients use. Anything else (a
    rebound DNS name, a LAN address) is a request not meant for this server."""
    m = _HOST.fullmatch(value.strip())
    if m is None:
        return False
    if m.group("port") is not None and int(m.group("port")) > 65535:
        return False
    name = m.group("name")
    if name is not None:
        if name.lower() == "localhost":
            return True
        try:
            return ipaddress.IPv4Address(name).is_loopback
        except ValueError:
            return False
    try:
        return ipaddress.IPv6Address(m.group("v6")).is_loopback
    except ValueError:
        return False


def _one(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name, [])
    return values[0] if len(values) == 1 else None


def host_refusal(headers: dict[str, list[str]]) -> Refusal | None:
    """Exactly one ``Host``, naming loopback (DNS rebinding sends another)."""
    host = _one(headers, "host")
    if host is None or not loopback_host(host):
        return Refusal(
            403,
            "Forbidden",
            "This server answers only requests to localhost (the Host header names another host)",
            "host_not_allowed",
        )
    return None


def origin_refusal(headers: dict[str, list[str]]) -> Refusal | None:
    """No request from a web page of another origin: browsers send
    ``Origin`` with every cross-origin request and preflight (and with
    same-origin POSTs, which then name this very host)."""
    if "origin" not in headers:
        return None
    origin = _one(headers, "origin")
    host = _one(headers, "host")
    if origin is None or host is None or origin.strip().lower() != f"http://{host.strip().lower()}":
        return Refusal(
            403,
            "Forbidden",
            "Requests from web pages of other origins are not allowed (no CORS)",
            "origin_not_allowed",
        )
    return None


def key_refusal(headers: dict[str, list[str]], key: str) -> Refusal | None:
    """``Authorization: Bearer KEY``, compared in constant time. A refusal
    says nothing a key holder computed (no proof of any kind)."""
    given = _one(headers, "authorization") or ""
    expected = ("Bearer " + key).encode()
    if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
        return None
    return Refusal(
        401,
        "Unauthorized",
        "Missing or wrong API key: send the session's key as 'Authorization: Bearer KEY'",
        "invalid_api_key",
    )


def header_map(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Header pairs as lower-case name -> every value, in order."""
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name.lower(), []).append(value)
    return out


def refusal(headers: Iterable[tuple[str, str]], key: str) -> Refusal | None:
    """The guard's whole decision for one request, whatever its path or
    method (a CORS preflight is a request like any other): None lets it
    through. An empty ``key`` (the user turned the key off: ``vllm.api_key
    = false``) skips only the key check."""
    h = header_map(headers)
    return host_refusal(h) or origin_refusal(h) or (key_refusal(h, key) if key else None)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """Pure ASGI middleware applying ``refusal`` to every HTTP request and
    websocket of the app it wraps (``vllm serve --middleware``). The key is
    vLLM's own, from the environment."""

    def __init__(self, app: App, key: str | None = None) -> None:
        self.app = app
        self.key = os.environ.get(KEY_ENV, "") if key is None else key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        pairs = [
            (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
            for n, v in scope.get("headers", [])
        ]
        refused = refusal(pairs, self.key)
        if refused is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": refused.status,
                    "headers": [
                        (n.encode("latin-1"), v.encode("latin-1")) for n, v in refused.all_headers()
                    ],
                }
            )
            await send({"type": "http.response.body", "body": refused.body()})


def source() -> str:
    """This module's text, as the job script ships it."""
    with open(__file__, encoding="utf-8") as f:
        return f.read()
