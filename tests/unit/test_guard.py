"""The guard in front of vLLM (alvis_fsm/cluster/remote/guard.py): its one decision,
its ASGI class (issue 22, finding 1), and the tool's health check, which
sends the key only through the tunnel's private socket (issue 31, item 7)."""

from __future__ import annotations

import asyncio
import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from alvis_fsm.cluster.remote import guard
from alvis_fsm.cluster.tunnel import health

KEY = "k-0123456789abcdef"
OK = [("Host", "127.0.0.1:58000"), ("Authorization", f"Bearer {KEY}")]


def _status(headers: list[tuple[str, str]], key: str = KEY) -> int:
    refused = guard.refusal(headers, key)
    return 0 if refused is None else refused.status


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:58000",
        "localhost:58000",
        "LOCALHOST",
        "127.0.0.1",
        "127.1.2.3:1",
        "[::1]:58000",
        "[::1]",
        " localhost:8000 ",
    ],
)
def test_loopback_hosts_pass(host: str) -> None:
    assert guard.loopback_host(host)
    assert _status([("Host", host), ("Authorization", f"Bearer {KEY}")]) == 0


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:58000",
        "rebind.attacker.test",
        "192.168.1.5:58000",
        "0.0.0.0:58000",
        "localhost.evil.test",
        "127.0.0.1.nip.io",
        "[::2]",
        "[::1",
        "localhost:99999",
        "",
        "localhost:58000:1",
        "user@localhost",
        "[fe80::1]:80",
    ],
)
def test_other_hosts_are_refused(host: str) -> None:
    assert not guard.loopback_host(host)
    refused = guard.refusal([("Host", host), ("Authorization", f"Bearer {KEY}")], KEY)
    assert refused is not None and refused.status == 403
    assert json.loads(refused.body())["error"]["code"] == "host_not_allowed"


def test_no_host_or_two_hosts_are_refused() -> None:
    assert _status([("Authorization", f"Bearer {KEY}")]) == 403
    assert _status([*OK, ("Host", "evil.example")]) == 403


@pytest.mark.parametrize(
    "given",
    [
        None,
        "",
        "Bearer",
        f"Bearer {KEY}x",
        f"bearer {KEY}",
        KEY,
        f"Bearer  {KEY}",
        f"Basic {KEY}",
        "Bearer k-0123456789abcdeé",
    ],
)
def test_the_key_is_required_on_every_request(given: str | None) -> None:
    headers = [("Host", "localhost:58000")]
    if given is not None:
        headers.append(("Authorization", given))
    refused = guard.refusal(headers, KEY)
    assert refused is not None and refused.status == 401
    body = json.loads(refused.body())
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert KEY not in refused.body().decode()
    assert not [h for h in refused.all_headers() if h[0].lower().startswith("access-control")]


def test_two_authorization_headers_are_refused() -> None:
    assert _status([*OK, ("Authorization", f"Bearer {KEY}")]) == 401


def test_no_key_configured_keeps_the_host_and_origin_checks() -> None:
    assert _status([("Host", "localhost:1")], key="") == 0
    assert _status([("Host", "evil.example")], key="") == 403
    assert _status([("Host", "localhost:1"), ("Origin", "http://evil.example")], key="") == 403


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "http://localhost:8080",
        "http://127.0.0.1:58001",
        "https://127.0.0.1:58000",
        "http://localhost:58000",
    ],
)
def test_other_origins_are_refused_even_with_the_key(origin: str) -> None:
    refused = guard.refusal([*OK, ("Origin", origin)], KEY)
    assert refused is not None and refused.status == 403
    assert json.loads(refused.body())["error"]["code"] == "origin_not_allowed"


def test_the_server_own_origin_passes() -> None:
    assert _status([*OK, ("Origin", "http://127.0.0.1:58000")]) == 0


def test_a_refusal_answers_no_challenge_and_proves_nothing() -> None:
    """Issue 31, item 7: a guard that signed a nonce for anyone would be an
    oracle on every listener holding the key (route login's TCP port on the
    node serves every cluster user), and a local process holding the
    laptop's port could relay the tool's challenge to it. It answers a
    challenge as any keyless request: the same refusal, nothing computed."""
    plain = guard.refusal([("Host", "localhost")], KEY)
    for challenge in ("c" * 32, "d" * 64):
        refused = guard.refusal([("Host", "localhost"), ("x-alvis-fsm-challenge", challenge)], KEY)
        assert refused is not None and plain is not None and refused.status == 401
        assert refused.all_headers() == plain.all_headers() and refused.body() == plain.body()
    assert not hasattr(guard, "proof") and "x-alvis-fsm-proof" not in guard.source()


# -- the ASGI class, as vLLM runs it --------------------------------------------------------------


def _asgi(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    asyncio.run(app(scope, receive, send))
    return sent


def _scope(kind: str, headers: list[tuple[str, str]], path: str = "/invocations") -> dict[str, Any]:
    return {
        "type": kind,
        "method": "POST",
        "path": path,
        "headers": [(n.lower().encode(), v.encode()) for n, v in headers],
    }


class Inner:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"work done"})


def test_asgi_guard_refuses_before_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guard.KEY_ENV, KEY)
    inner = Inner()
    app = guard.Guard(inner)  # as Starlette builds it: cls(app=...), the key from vLLM's env
    for path in ("/invocations", "/tokenize", "/metrics", "/health", "/v1/models", "/pooling"):
        sent = _asgi(app, _scope("http", [("Host", "localhost:58000")], path))
        assert sent[0]["status"] == 401 and b"invalid_api_key" in sent[1]["body"]
        assert (b"content-type", b"application/json") in sent[0]["headers"]
    sent = _asgi(app, _scope("http", [*OK, ("Origin", "http://evil.example")]))
    assert sent[0]["status"] == 403
    assert inner.calls == []
    assert _asgi(app, _scope("http", OK))[1]["body"] == b"work done"
    assert _asgi(app, _scope("websocket", [("Host", "localhost")])) == [
        {"type": "websocket.close", "code": 1008}
    ]
    _asgi(app, {"type": "lifespan"})
    assert inner.calls == ["http", "lifespan"]


def test_asgi_guard_with_latin1_bytes_in_a_header() -> None:
    inner = Inner()
    scope = _scope("http", [("Host", "localhost")])
    scope["headers"].append((b"authorization", b"Bearer \xff\xfe"))
    assert _asgi(guard.Guard(inner, key=KEY), scope)[0]["status"] == 401


def test_the_shipped_source_is_stdlib_only() -> None:
    text = guard.source()
    imports = [
        line.split()[1] for line in text.splitlines() if line.startswith(("import ", "from "))
    ]
    assert "alvis_fsm" not in " ".join(imports)
    assert not {i.split(".")[0] for i in imports} - {
        "__future__",
        "hmac",
        "ipaddress",
        "json",
        "os",
        "re",
        "collections",
        "dataclasses",
        "typing",
    }


# -- the tool's health check: the private channel, never the public port --------------------------


class _Handler(BaseHTTPRequestHandler):
    """The guard in front of a server that answers 200 (``guarded``), or a
    local process holding a port that relays every request to ``relay_to``
    (the node's TCP listener of route login) and keeps what it saw."""

    seen: list[dict[str, str]]
    guarded = True
    relay_to: int = 0

    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers.items()))
        if self.relay_to:
            import http.client

            upstream = http.client.HTTPConnection("127.0.0.1", self.relay_to, timeout=5)
            upstream.request("GET", self.path, headers=dict(self.headers.items()))
            answer = upstream.getresponse()
            status, headers, body = answer.status, answer.getheaders(), answer.read()
        else:
            refused = guard.refusal(self.headers.items(), KEY) if self.guarded else None
            if refused is None:
                status, headers, body = 200, [("content-length", "0")], b""
            else:
                status, headers, body = refused.status, refused.all_headers(), refused.body()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = super().get_request()
        return conn, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port)


class _Server:
    def __init__(self, guarded: bool = True, relay_to: int = 0, path: str = "") -> None:
        self.seen: list[dict[str, str]] = []
        handler = type(
            "H", (_Handler,), {"seen": self.seen, "guarded": guarded, "relay_to": relay_to}
        )
        self.httpd: socketserver.BaseServer = (
            _Unix(path, handler) if path else ThreadingHTTPServer(("127.0.0.1", 0), handler)
        )
        self.port = 0 if path else self.httpd.server_address[1]  # type: ignore[index]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[_Server, _Server, _Server]]:
    """The session's private socket (to a guarded server), the node's TCP
    listener of route login (guarded), and an impostor on the laptop's port
    relaying to the latter."""
    ours = _Server(path=str(tmp_path / "s"))
    node = _Server()
    impostor = _Server(relay_to=node.port)
    yield ours, node, impostor
    for s in (ours, node, impostor):
        s.close()


def test_health_sends_the_key_only_through_the_private_socket(
    servers: tuple[_Server, _Server, _Server], tmp_path: Path
) -> None:
    ours, _, _ = servers
    path = str(tmp_path / "s")
    # One request, with the key: the socket is ours by construction.
    assert health(0, api_key=KEY, local_socket=path) is True
    assert [h.get("Authorization") for h in ours.seen] == [f"Bearer {KEY}"]
    assert health(0, api_key="another session's key", local_socket=path) is False
    assert health(0, api_key=KEY, local_socket=str(tmp_path / "gone")) is False


def test_a_relayed_port_never_receives_the_key(
    servers: tuple[_Server, _Server, _Server], tmp_path: Path
) -> None:
    """Issue 31, item 7: after a drop, a local process holding the laptop's
    port relays everything to a listener holding the key. The check never
    asks the port (with a live socket, a dead one, or none: an older
    session), so the impostor sees nothing, let alone the key."""
    ours, node, impostor = servers
    assert health(impostor.port, api_key=KEY, local_socket=str(tmp_path / "s")) is True
    assert len(ours.seen) == 1  # the socket answered, not the port
    assert health(impostor.port, api_key=KEY, local_socket=str(tmp_path / "gone")) is False
    assert health(impostor.port, api_key=KEY, local_socket="") is False
    assert impostor.seen == [] and node.seen == []
    # Without a key there is nothing to give away: the port is asked.
    assert health(impostor.port, api_key=None) is False  # the guard wants a key it does not get
    assert impostor.seen and not any(KEY in v for h in impostor.seen for v in h.values())
