"""The gateway is bounded and bad input is a 4xx (issue 22, findings 3 and
4; issue 26, item 10): header and body timeouts, a cap on connections that
keeps serving under a flood of half-open ones (also with a process limit of
256 descriptors, macOS's default), size and nesting limits, OpenAI-style
error bodies, no traceback when a client goes away, and library log records
that cannot flood the log. Real sockets against the real aiohttp app, with
the fake sessions and fake vLLM of test_gateway_http."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_gateway_http import AUTH, CHAT, KEY, Harness, harness

from alvis_fsm.fronts.gateway import instance
from alvis_fsm.fronts.gateway.server import LibraryLog

HERE = Path(__file__).resolve().parent


def _port(client: httpx.AsyncClient) -> int:
    port = client.base_url.port
    assert port is not None
    return port


async def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, read the answer until the server closes or ``wait``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
    except TimeoutError:
        pass
    writer.close()
    return out


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status_and_error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body)["error"]


def _request(
    body: bytes, headers: dict[str, str] | None = None, auth: bytes | None = None
) -> bytes:
    given = {"Host": "127.0.0.1", "Content-Type": "application/json", **(headers or {})}
    lines = [b"POST /v1/chat/completions HTTP/1.1"]
    lines += [f"{k}: {v}".encode() for k, v in given.items()]
    lines.append(b"Authorization: " + (auth if auth is not None else f"Bearer {KEY}".encode()))
    lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """None from the gateway (the fake vLLM's own, when the gateway hangs
    up on it after its client left, are not the gateway's)."""
    import traceback

    def fake_vllms(r: logging.LogRecord) -> bool:
        if not r.exc_info or r.exc_info[2] is None:
            return False
        frames = traceback.extract_tb(r.exc_info[2])
        return any(f.filename.endswith("test_gateway_http.py") and f.name == "chat" for f in frames)

    records = [
        r for r in caplog.records if r.name.startswith(("aiohttp", "asyncio")) and not fake_vllms(r)
    ]
    said = [r.getMessage() for r in records]
    assert not [r for r in records if r.exc_info], said
    assert not [m for m in said if "Error handling request" in m or "Unhandled" in m], said


HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("non-UTF-8 key", _request(b"{}", auth=b"Bearer \xff\xfe\x80key"), 401, "invalid_api_key"),
    ("non-UTF-8 scheme", _request(b"{}", auth=b"\xc3\x28 x"), 401, "invalid_api_key"),
    ("deeply nested JSON", _request(b"[" * 4_000 + b"]" * 4_000), 400, "invalid_json"),
    (
        "nested past the limit",
        _request(
            json.dumps(
                {"model": "m1", "x": [[[[[[[[[[[[]]]]]]]]]]]] * 1}
                | {"y": json.loads("[" * 70 + "]" * 70)}
            ).encode()
        ),
        400,
        "invalid_json",
    ),
    ("bad JSON", _request(b'{"model": "m1", '), 400, "invalid_json"),
    ("not UTF-8 JSON", _request(b'{"model": "\xff"}'), 400, "invalid_json"),
    ("not an object", _request(b"[1, 2]"), 400, "invalid_body"),
    (
        "wrong content type",
        _request(json.dumps({"model": "m1", **CHAT}).encode(), {"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    ),
    (
        "form content type",
        _request(b"model=m1", {"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        "unsupported_media_type",
    ),
    (
        "huge body",
        _request(b'{"model": "m1", "x": "' + b"a" * 20_000 + b'"}'),
        413,
        "request_too_large",
    ),
]


@pytest.mark.parametrize(("what", "raw", "status", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_4xx_in_openai_shape(
    what: str, raw: bytes, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        got, err = _status_and_error(await _raw(_port(client), raw))
        assert (got, err["code"]) == (status, code), err
        assert err["type"] == "invalid_request_error" and isinstance(err["message"], str)
        assert h.sessions == []  # nothing started for it

    harness(max_body=10_000).run(scenario)
    _no_tracebacks(caplog)


def test_huge_headers_are_a_4xx_not_a_500() -> None:
    """aiohttp's parser answers these itself (a plain 400) and logs a
    traceback: the gateway's output gets one line of it."""
    shown: list[str] = []
    handler = LibraryLog.install(shown.append)

    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        port = _port(client)
        big = _request(b"{}", {"X-Big": "a" * 100_000})
        many = _request(b"{}", {f"X-H{i}": "v" for i in range(500)})
        for raw in (big, many):
            head = await _raw(port, raw)
            assert head[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and head[9:10] == b"4", head[:100]
        # ... and the gateway still answers.
        assert (await client.get("/v1/models", headers=AUTH)).status_code == 200

    try:
        harness().run(scenario)
    finally:
        for name in ("aiohttp", "asyncio"):
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).propagate = True
    assert shown and all("\n" not in line and "Traceback" not in line for line in shown)
    assert all(
        line.startswith("[gateway] aiohttp.server: Error handling request") for line in shown
    )


def test_a_body_that_never_arrives_is_a_408() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        raw = _request(b'{"model": "m1"}' + b" " * 100)[:-100]  # 100 bytes promised, never sent
        got, err = _status_and_error(await _raw(_port(client), raw, wait=10))
        assert (got, err["code"]) == (408, "request_timeout")

    harness(body_timeout=0.5).run(scenario)


def test_a_half_sent_request_is_closed_after_the_header_timeout() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        for partial in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127"):
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(client))
            writer.write(partial)
            started = time.monotonic()
            async with asyncio.timeout(10):  # a bound for a hang, not a timing
                assert await reader.read() == b""  # closed by the gateway
            assert time.monotonic() - started >= 0.4
            writer.close()

    harness(header_timeout=0.5).run(scenario)


def test_at_the_connection_cap_the_oldest_idle_connection_makes_room() -> None:
    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        port = _port(client)
        assert (
            await client.post("/v1/chat/completions", json={"model": "m1", **CHAT}, headers=AUTH)
        ).status_code == 200
        flood = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        for _, writer in flood:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")  # and never more
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10
        ) as fresh:
            resp = await fresh.post(
                "/v1/chat/completions", json={"model": "m1", **CHAT}, headers=AUTH
            )
        assert resp.status_code == 200
        gw = h.gateway
        assert gw is not None and gw.connections is not None
        assert gw.connections.evicted >= 30
        assert gw.connections.open <= 10
        for _, writer in flood:
            writer.close()

    harness(max_connections=10).run(scenario)


def test_a_client_that_goes_away_mid_stream_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 26, item 10: ``ClientConnectionResetError: Cannot write to closing
    transport`` on the gateway's terminal when a client closed first."""
    caplog.set_level(logging.DEBUG)

    async def scenario(client: httpx.AsyncClient, h: Harness) -> None:
        port = _port(client)
        for _ in range(5):
            body = json.dumps({"model": "m1", "stream": True, **CHAT}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request(body))
            await reader.readuntil(b"data: ")  # the first chunk, then gone
            writer.transport.abort()
        await asyncio.sleep(0.5)  # the rest of the stream meets the closed socket
        assert (await client.get("/v1/models", headers=AUTH)).status_code == 200

    harness().run(scenario)
    _no_tracebacks(caplog)


def test_library_log_records_are_single_inert_lines_and_rate_limited() -> None:
    shown: list[str] = []
    handler = LibraryLog(shown.append, burst=3)
    logger = logging.getLogger("asyncio.test-bounds")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            for _ in range(1000):
                logger.error(
                    "socket.accept() out of system resource\x1b]52;c;eA==\x07", exc_info=True
                )
    finally:
        logger.removeHandler(handler)
    assert len(shown) == 3
    assert all("\n" not in line and "Too many open files" in line for line in shown)
    assert handler.dropped == 997


def test_the_background_log_is_rotated(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = instance.LogFile(log, fd, max_bytes=10_000)
        for i in range(2000):
            writer.write(f"line {i} " + "x" * 50)
    finally:
        os.close(fd)
    rotated = log.with_name(log.name + ".1")
    assert rotated.exists() and log.stat().st_size <= 10_100 and rotated.stat().st_size <= 10_100
    assert "line 1999" in log.read_text()
    assert oct(log.stat().st_mode & 0o777) == oct(0o600) == oct(rotated.stat().st_mode & 0o777)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptor limits")
def test_300_half_open_connections_under_a_256_descriptor_limit(tmp_path: Path) -> None:
    """Finding 3 as the issue states it: the gateway process limited to 256
    descriptors, 300 connections that send half a request and stay: a valid
    request is still answered (the issue's bound is 1 s; the time is
    printed, not asserted), and the log stays small."""
    log = tmp_path / "gateway.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "bounded_gateway.py"), "256"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=HERE,
        )
    assert proc.stdout is not None and proc.stdin is not None
    flood: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30) as c:
            assert (
                c.post(
                    "/v1/chat/completions", json={"model": "m1", **CHAT}, headers=AUTH
                ).status_code
                == 200
            )
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            flood.append(s)
        time.sleep(1)
        started = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as c:
            resp = c.post("/v1/chat/completions", json={"model": "m1", **CHAT}, headers=AUTH)
        took = time.monotonic() - started
        print(f"a valid request under the flood: {resp.status_code} in {took * 1000:.0f} ms")
        assert resp.status_code == 200
        time.sleep(1)
        assert proc.poll() is None
        assert log.stat().st_size < 20_000, log.read_text()[:2000]
        said = log.read_text()
        assert "Too many open files" not in said and "out of system resource" not in said, said
    finally:
        for s in flood:
            s.close()
        proc.stdin.close()
        proc.wait(timeout=30)
