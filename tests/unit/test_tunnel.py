"""The handshake address, the connection test (verified serving) against a
real local HTTP server, proxies in the environment, and the ready block."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from alvis_fsm.cluster.tunnel import Address, Tunnel, health, parse_address, verify
from alvis_fsm.errors import ServerError
from alvis_fsm.fronts.ui import Reporter

KEY = "afsm-test-key"
SERVED = "org/model"

# -- the address file ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("alvis7-07:41084", Address("alvis7-07", port=41084)),
        ("alvis7-07:41084\n", Address("alvis7-07", port=41084)),
        (
            "alvis7-07:/tmp/afsm-1.x/vllm.sock",
            Address("alvis7-07", socket="/tmp/afsm-1.x/vllm.sock"),
        ),
        # A socket path may hold ':' (the host never does).
        ("n1:/scratch/a:b/vllm.sock", Address("n1", socket="/scratch/a:b/vllm.sock")),
        ("n1:/p q/vllm.sock", Address("n1", socket="/p q/vllm.sock")),
    ],
)
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "text",
    [
        "",
        "alvis7-07",
        ":41084",
        "alvis7-07:",
        "alvis7-07:0",
        "alvis7-07:65536",
        "n:12ab",
        "n:relative/vllm.sock",
        "n:٣",
        "a b:1",
        "n:-1",
    ],
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ServerError, match="unreadable server address"):
        parse_address(text)


def test_address_round_trips_through_str() -> None:
    for text in ("n:41084", "n:/tmp/x/vllm.sock"):
        assert str(parse_address(text)) == text


def _tunnel(**kw: Any) -> Tunnel:
    values: dict[str, Any] = {
        "conn": None,
        "route": "jump",
        "bind": "127.0.0.1",
        "local_port": 58000,
        "node": "alvis7-07",
        "remote_port": 0,
        "control": Path("/x"),
    }
    values.update(kw)
    return Tunnel(**values)


def test_forward_to_a_socket_or_a_port() -> None:
    assert _tunnel(remote_socket="/t/vllm.sock").forwards == ["127.0.0.1:58000:/t/vllm.sock"]
    assert _tunnel(remote_port=41084).forwards == ["127.0.0.1:58000:alvis7-07:41084"]


def test_forward_from_a_local_socket() -> None:
    # The gateway's sessions: no local port at all, only this user's socket.
    local = {"local_socket": "/s/ctl/ab12", "local_port": 0}
    assert _tunnel(remote_socket="/t/vllm.sock", **local).forwards == ["/s/ctl/ab12:/t/vllm.sock"]
    assert _tunnel(remote_port=41084, **local).forwards == ["/s/ctl/ab12:alvis7-07:41084"]


def test_start_forwards_its_port_then_its_private_socket() -> None:
    """Issue 31, item 7: start's sessions have both ends in one ssh, the
    port first (no socket when the port cannot be had); the tool's own
    checks use the socket."""
    t = _tunnel(remote_port=41084, local_socket="/s/ctl/ab12")
    assert t.forwards == ["127.0.0.1:58000:alvis7-07:41084", "/s/ctl/ab12:alvis7-07:41084"]
    assert t.local == "local port 58000"
    assert t._forward_args() == [
        "-L",
        "127.0.0.1:58000:alvis7-07:41084",
        "-L",
        "/s/ctl/ab12:alvis7-07:41084",
    ]


# -- a local vLLM-like server ---------------------------------------------------------------


class Fake:
    def __init__(self) -> None:
        self.completion_status = 200
        self.models = [SERVED]
        self.requests: list[tuple[str, str, str]] = []  # method, path, authorization


def _handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":  # open, as vLLM's
                return self._answer(200, {})
            fake.requests.append(("GET", self.path, self.headers.get("Authorization", "")))
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._answer(401, {"error": "Unauthorized"})
            self._answer(200, {"data": [{"id": m} for m in fake.models]})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length))
            fake.requests.append(("POST", self.path, self.headers.get("Authorization", "")))
            assert body["max_tokens"] == 1 and body["model"] == SERVED
            if fake.completion_status != 200:
                return self._answer(fake.completion_status, {"error": {"message": "engine dead"}})
            self._answer(200, {"choices": [{"text": "Hi"}]})

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[int, Fake]]:
    fake = Fake()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], fake
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_verified_means_models_and_a_one_token_completion(server: tuple[int, Fake]) -> None:
    port, fake = server
    seen = verify(port, KEY, 5, SERVED)
    assert seen.models == [SERVED]
    assert 0 <= seen.first_token_s < 5
    assert [(m, p) for m, p, _ in fake.requests] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
    ]
    assert all(auth == f"Bearer {KEY}" for _, _, auth in fake.requests)


def test_dead_engine_is_refused_at_once(server: tuple[int, Fake]) -> None:
    port, fake = server
    fake.completion_status = 500
    with pytest.raises(ServerError) as err:
        verify(port, KEY, 30, SERVED)
    assert err.value.message == (
        f"vLLM lists {SERVED} but cannot generate: a 1-token completion failed with HTTP 500"
    )
    assert err.value.details and "engine dead" in err.value.details
    assert len(fake.requests) == 2  # no retries until the deadline


def test_wrong_key_and_missing_model(server: tuple[int, Fake]) -> None:
    port, fake = server
    with pytest.raises(ServerError, match="refused our API key"):
        verify(port, "wrong", 5, SERVED)
    fake.models = ["other/model"]
    with pytest.raises(ServerError, match=f"does not serve {SERVED}") as err:
        verify(port, KEY, 5, SERVED)
    assert err.value.details and "other/model" in err.value.details


def test_nothing_listening_until_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match="did not answer through the tunnel within 1 s"):
            verify(port, KEY, 1, SERVED)
    assert health(port, api_key=None) is False


class Recorder:
    """Counts connections: a proxy that must never be used."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.close()


@pytest.mark.parametrize("case", ["lower", "upper"])
def test_proxies_in_the_environment_are_ignored(
    server: tuple[int, Fake], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    port, _ = server
    recorder = Recorder()
    try:
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        for name in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(
                name.upper() if case == "upper" else name, f"http://127.0.0.1:{recorder.port}"
            )
        # Control: a client that trusts the environment goes to the proxy.
        with httpx.Client(timeout=2) as client, pytest.raises(httpx.HTTPError):
            client.get(f"http://127.0.0.1:{port}/v1/models")
        assert recorder.hits == 1
        assert verify(port, KEY, 5, SERVED).models == [SERVED]
        assert health(port, api_key=None) is True  # to the server, not the proxy
        assert recorder.hits == 1
    finally:
        recorder.sock.close()


# -- the ready block ---------------------------------------------------------------------------


def test_ready_block_shows_first_token_latency(capsys: pytest.CaptureFixture[str]) -> None:
    record = SimpleNamespace(
        url="http://localhost:58000", api_key=KEY, served_name=SERVED, name="s"
    )
    Reporter().connected(record, [SERVED], 0.1234)
    out = capsys.readouterr().out
    assert out.startswith("✓ Connection successful! Server available at http://localhost:58000\n")
    assert "  First token: 123 ms (a 1-token completion, through the tunnel)\n" in out
    assert f"  Model:    {SERVED}\n" in out
    Reporter().connected(record, [SERVED], 2.5)
    assert (
        "  First token: 2.50 s (a 1-token completion, through the tunnel)\n"
        in capsys.readouterr().out
    )
    Reporter().connected(record, [SERVED])  # resume's reconnect: no measurement, no line
    assert "First token" not in capsys.readouterr().out


# -- the tunnel's local end as a unix socket (the gateway's sessions) ---------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = super().get_request()
        return conn, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port)


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[tuple[str, Fake]]:
    fake = Fake()
    path = str(tmp_path / "s")
    httpd = _UnixHTTPServer(path, _handler(fake))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield path, fake
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_verified_through_a_local_socket(unix_server: tuple[str, Fake]) -> None:
    path, fake = unix_server
    seen = verify(0, KEY, 5, SERVED, local_socket=path)
    assert seen.models == [SERVED]
    assert [(m, p) for m, p, _ in fake.requests] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
    ]
    assert health(0, api_key=None, local_socket=path) is True
    assert health(0, api_key=None, local_socket=str(Path(path).with_name("gone"))) is False


def test_a_stale_local_socket_is_cleared_and_a_live_one_kept(
    unix_server: tuple[str, Fake], tmp_path: Path
) -> None:
    stale = tmp_path / "stale"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: what a killed ssh leaves
    _tunnel(local_socket=str(stale))._clear_stale_socket()
    assert not stale.exists()
    live, _ = unix_server
    _tunnel(local_socket=live)._clear_stale_socket()
    assert Path(live).exists()
