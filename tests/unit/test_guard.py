"""The guard in front of vLLM (alvis_fsm/cluster/guard.py): its one decision,
its ASGI class, and the tool's health check that proves the server before
it sends the key (issue 22, finding 1)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from alvis_fsm.cluster import guard
from alvis_fsm.cluster.tunnel import health

KEY = "k-0123456789abcdef"
OK = [("Host", "127.0.0.1:58000"), ("Authorization", f"Bearer {KEY}")]


def _status(headers: list[tuple[str, str]], key: str = KEY) -> int:
    refused = guard.refusal(headers, key)
    return 0 if refused is None else refused.status


@pytest.mark.parametrize("host", [
    "127.0.0.1:58000", "localhost:58000", "LOCALHOST", "127.0.0.1", "127.1.2.3:1", "[::1]:58000",
    "[::1]", " localhost:8000 ",
])  # fmt: skip
def test_loopback_hosts_pass(host: str) -> None:
    assert guard.loopback_host(host)
    assert _status([("Host", host), ("Authorization", f"Bearer {KEY}")]) == 0


@pytest.mark.parametrize("host", [
    "evil.example:58000", "rebind.attacker.test", "192.168.1.5:58000", "0.0.0.0:58000",
    "localhost.evil.test", "127.0.0.1.nip.io", "[::2]", "[::1", "localhost:99999", "",
    "localhost:58000:1", "user@localhost", "[fe80::1]:80",
])  # fmt: skip
def test_other_hosts_are_refused(host: str) -> None:
    assert not guard.loopback_host(host)
    refused = guard.refusal([("Host", host), ("Authorization", f"Bearer {KEY}")], KEY)
    assert refused is not None and refused.status == 403
    assert json.loads(refused.body())["error"]["code"] == "host_not_allowed"


def test_no_host_or_two_hosts_are_refused() -> None:
    assert _status([("Authorization", f"Bearer {KEY}")]) == 403
    assert _status([*OK, ("Host", "evil.example")]) == 403


@pytest.mark.parametrize("given", [
    None, "", "Bearer", f"Bearer {KEY}x", f"bearer {KEY}", KEY, f"Bearer  {KEY}", f"Basic {KEY}",
    "Bearer k-0123456789abcdeé",
])  # fmt: skip
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


@pytest.mark.parametrize("origin", [
    "http://evil.example", "null", "http://localhost:8080", "http://127.0.0.1:58001",
    "https://127.0.0.1:58000", "http://localhost:58000",
])  # fmt: skip
def test_other_origins_are_refused_even_with_the_key(origin: str) -> None:
    refused = guard.refusal([*OK, ("Origin", origin)], KEY)
    assert refused is not None and refused.status == 403
    assert json.loads(refused.body())["error"]["code"] == "origin_not_allowed"


def test_the_server_own_origin_passes() -> None:
    assert _status([*OK, ("Origin", "http://127.0.0.1:58000")]) == 0


def test_a_refusal_answers_a_challenge_with_the_proof_only() -> None:
    challenge = "c" * 32
    refused = guard.refusal([("Host", "localhost"), (guard.CHALLENGE_HEADER, challenge)], KEY)
    assert refused is not None and refused.status == 401
    said = dict(refused.all_headers())[guard.PROOF_HEADER]
    assert said == guard.proof(KEY, challenge) and KEY not in said
    assert guard.proof("other", challenge) != said and guard.proof(KEY, "d" * 32) != said
    for bad in ("short", "x" * 129, "a b" * 10, "é" * 20):
        refused = guard.refusal([("Host", "localhost"), (guard.CHALLENGE_HEADER, bad)], KEY)
        assert refused is not None and guard.PROOF_HEADER not in dict(refused.all_headers())


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
    return {"type": kind, "method": "POST", "path": path,
            "headers": [(n.lower().encode(), v.encode()) for n, v in headers]}  # fmt: skip


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
    imports = [line.split()[1] for line in text.splitlines()
               if line.startswith(("import ", "from "))]  # fmt: skip
    assert "alvis_fsm" not in " ".join(imports)
    assert not {i.split(".")[0] for i in imports} - {
        "__future__", "hashlib", "hmac", "ipaddress", "json", "os", "re", "collections", "dataclasses",
        "typing",
    }


# -- the tool's health check: prove, then send the key -------------------------------------------


class _Server:
    def __init__(self, guarded: bool) -> None:
        self.seen: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.seen.append(dict(self.headers.items()))
                refused = guard.refusal(self.headers.items(), KEY) if guarded else None
                if refused is None:
                    status, headers, body = 200, [("content-length", "0")], b""
                else:
                    status, headers, body = refused.status, refused.all_headers(), refused.body()
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def servers() -> Iterator[tuple[_Server, _Server]]:
    ours, rogue = _Server(guarded=True), _Server(guarded=False)
    yield ours, rogue
    for s in (ours, rogue):
        s.httpd.shutdown()
        s.httpd.server_close()


def test_health_proves_the_server_before_sending_the_key(servers: tuple[_Server, _Server]) -> None:
    ours, rogue = servers
    assert health(ours.port, api_key=KEY) is True
    assert [("Authorization" in h) for h in ours.seen] == [False, True]
    # A local process that merely holds the port answers 200 to anything:
    # it is not our server, and it never sees the key.
    assert health(rogue.port, api_key=KEY) is False
    assert len(rogue.seen) == 1 and not any(KEY in v for h in rogue.seen for v in h.values())
    assert health(ours.port, api_key="another session's key") is False
