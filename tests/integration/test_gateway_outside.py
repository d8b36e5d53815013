"""The gateway against what comes from outside (issue 31, items 8-12), a
real `alvis-fsm gateway` on the lab: a body that never arrives is a 408 on
every route that reads one (files and batches too), bad uploads and
bodies are 4xx in OpenAI's shape, never aiohttp's plain 500; a client's
path reaches neither the terminal (`gateway log`) nor `/metrics` as text,
and `/metrics` keeps a fixed set of routes; a login link works once and
for a short while, and the browser is opened with a private file that
leads to it, never the token on a command line (headless Chromium)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import stat
import time
from pathlib import Path

import httpx
import pexpect
from tool import Tool, exit_status, free_port, interrupt

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# OSC 52 (writes the clipboard), percent-encoded in a path.
CLIPBOARD = "/v1/%1b%5d52%3bc%3bcHduZWQ%3d%07"


def _gateway(tool: Tool, *args: str, **env: str) -> tuple[pexpect.spawn, int, str]:
    """A gateway on a free port: (its process, port, key)."""
    port = free_port()
    child = tool.spawn("gateway", "--port", str(port), *args, timeout=90, **env)
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact(f"Gateway on http://localhost:{port}/v1")
    return child, port, key


def _stop(child: pexpect.spawn) -> None:
    interrupt(child)
    child.expect_exact("Gateway stopped; nothing left running", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0


async def _raw(
    port: int, data: bytes, wait: float, closes: bool = False
) -> tuple[bytes, float, bool]:
    """Send ``data``, read one answer (or until ``wait``): its bytes, the
    seconds it took, and, with ``closes``, whether the gateway then closed
    the connection (without, a kept-alive connection is not waited on)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    started = time.monotonic()
    out, closed = b"", False
    try:
        async with asyncio.timeout(wait):
            while not _complete(out):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
            took = time.monotonic() - started
            closed = closes and await reader.read(1) == b""
    except TimeoutError:
        took = time.monotonic() - started
    writer.close()
    return out, took, closed


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if sep and line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _head(path: str, key: str, kind: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:200]
    assert b"application/json" in head, raw[:300]
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def test_a_body_that_stops_coming_is_a_408_on_every_route(lab, tool: Tool) -> None:
    """Headers and one byte of a promised 1000, then nothing: each route
    answers 408 once gateway.body_timeout (here 1 s) has passed, and closes
    the connection (before: files and batches held it for good)."""
    child, port, key = _gateway(tool, ALVIS_FSM_GATEWAY__BODY_TIMEOUT="1")
    routes = [
        ("/v1/files", "multipart/form-data; boundary=B"),
        ("/v1/batches", "application/json"),
        ("/v1/chat/completions", "application/json"),
    ]

    async def slow(path: str, kind: str) -> tuple[bytes, float, bool]:
        return await _raw(port, _head(path, key, kind, 1000) + b"-", wait=15, closes=True)

    async def all_routes() -> list[tuple[bytes, float, bool]]:
        return await asyncio.gather(*(slow(path, kind) for path, kind in routes))

    for (path, _), (raw, took, closed) in zip(routes, asyncio.run(all_routes()), strict=True):
        assert raw, f"{path}: no answer in 15 s"
        status, err = _error(raw)
        assert (status, err["code"]) == (408, "request_timeout"), (path, err)
        assert closed and b"Connection: close" in raw, path
        assert 0.9 <= took < 5, (path, took)
    _stop(child)


def _multipart(disposition: bytes) -> bytes:
    return (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; '
        + disposition
        + b'\r\nContent-Type: application/octet-stream\r\n\r\n{"custom_id": "a"}\n\r\n--B--\r\n'
    )


def test_bad_uploads_and_bodies_are_4xx_in_openai_shape(lab, tool: Tool) -> None:
    child, port, key = _gateway(tool)
    form = "multipart/form-data; boundary=B"
    cases = {
        "a NUL in the file name": ("/v1/files", form, _multipart(b'filename="a\x00b.jsonl"')),
        "an encoded NUL in the file name": (
            "/v1/files",
            form,
            _multipart(b"filename*=utf-8''a%00b.jsonl"),
        ),
        "an escape in the file name": (
            "/v1/files",
            form,
            _multipart(b"filename*=utf-8''a%1b%5d52%3bc%3bx%07"),
        ),
        "a 100 KB file name": (
            "/v1/files",
            form,
            _multipart(b'filename="' + b"x" * 100_000 + b'"'),
        ),
        "a 300-character file name": (
            "/v1/files",
            form,
            _multipart(b'filename="' + b"x" * 300 + b'"'),
        ),
        "200 000 [ to /v1/batches": ("/v1/batches", "application/json", b"[" * 200_000),
        "not JSON to /v1/batches": ("/v1/batches", "application/json", b"{nope"),
    }
    for what, (path, kind, body) in cases.items():
        raw, _, _ = asyncio.run(_raw(port, _head(path, key, kind, len(body)) + body, wait=15))
        assert raw.startswith(b"HTTP/1.1 4"), f"{what}: {raw[:300]!r}"
        _, err = _error(raw)
        assert err["type"] == "invalid_request_error" and isinstance(err["message"], str), (
            what,
            err,
        )
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}/v1",
        trust_env=False,
        timeout=10,
        headers={"Authorization": f"Bearer {key}"},
    ) as http:
        listed = http.get("/files").json()["data"]
        assert listed == []  # none of them was kept
        # A plain name still uploads.
        ok = http.post(
            "/files",
            files={"file": ("in put.jsonl", b'{"custom_id": "a"}\n')},
            data={"purpose": "batch"},
        )
        assert ok.status_code == 200 and ok.json()["filename"] == "in put.jsonl", ok.text
    _stop(child)


ASK = {
    "model": "nope",
    "messages": [{"role": "user", "content": "x"}],
}  # no job: 404 model_not_found
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_a_clients_path_reaches_neither_the_terminal_nor_metrics(lab, tool: Tool) -> None:
    """OSC 52 in a path: `gateway log` prints no control character, and
    /metrics has none in its labels."""
    child, port, key = _gateway(tool)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
        resp = http.post(CLIPBOARD, headers=auth, json=ASK)
        assert resp.status_code == 404, resp.text
        metrics = http.get("/metrics", headers=auth).text
    code, out = tool.run("gateway", "log")
    assert code == 0, out
    assert len(out.strip().splitlines()) == 1 and " 404 " in out, out
    assert not CONTROLS.search(out.replace("\r\n", "\n")), repr(out)
    assert not CONTROLS.search(metrics), [
        line for line in metrics.splitlines() if CONTROLS.search(line)
    ]
    _stop(child)


def test_metrics_keep_a_fixed_set_of_routes(lab, tool: Tool) -> None:
    """40 made-up paths add no series: they count as one route, "other"."""
    child, port, key = _gateway(tool)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
        for n in range(40):
            assert http.post(f"/v1/made-up-{n}", headers=auth, json=ASK).status_code == 404
        assert http.post("/v1/chat/completions", headers=auth, json=ASK).status_code == 404
        metrics = http.get("/metrics", headers=auth).text
    series = [line for line in metrics.splitlines() if line.startswith("alvis_fsm_requests_total{")]
    assert len(series) == 2, series
    routes = {re.search(r'route="([^"]*)"', line).group(1) for line in series}  # type: ignore[union-attr]
    assert routes == {"other", "/v1/chat/completions"}, series
    assert 'route="other",status="404"} 40.0' in metrics
    code, out = tool.run("gateway", "log", "-n", "100")
    assert code == 0 and len(out.strip().splitlines()) == 41, out
    _stop(child)


def test_a_login_link_works_once_and_for_a_short_while(lab, tool: Tool) -> None:
    """gateway.login_link_life (here 8 s): a link used in time signs in,
    once; a link used later is refused, in words (before: never expired).
    8 s, not less: the second `gateway open` (a Python start) comes between
    the first link and its use, and the other test stream shares the CPU."""
    child, port, _ = _gateway(tool, ALVIS_FSM_GATEWAY__LOGIN_LINK_LIFE="8")
    code, out = tool.run("gateway", "open", "--no-browser")
    assert code == 0, out
    fresh = re.search(r"Page: (http://localhost:\d+/\?token=\S+)", out)
    code, out = tool.run("gateway", "open", "--no-browser")
    assert code == 0 and fresh, out
    late = re.search(r"Page: (http://localhost:\d+/\?token=\S+)", out)
    assert late, out
    with httpx.Client(trust_env=False, timeout=10) as http:
        signed = http.get(fresh.group(1))
        assert (
            signed.status_code == 303
            and f"alvis_fsm_gateway_{port}" in signed.headers["set-cookie"]
        )
        again = http.get(fresh.group(1))
        assert again.status_code == 401 and "used already" in again.text
        time.sleep(9)
        expired = http.get(late.group(1))
        assert expired.status_code == 401 and "expired" in expired.text, expired.text
        assert "set-cookie" not in expired.headers
    _stop(child)


BROWSER = """#!/bin/sh
# A stand-in for the desktop's browser command (Python's webbrowser runs
# $BROWSER with the URL): records what it was started with.
printf '%s\\n' "$@" >> {argv}
"""


def test_the_browser_is_opened_with_a_private_file_not_the_token(
    lab, tool: Tool, tmp_path: Path
) -> None:
    """`gateway --open` and `gateway open` start the browser with a file://
    URL of a 0600 file in the state dir that leads to the link (as
    Jupyter's): no token on a command line, where another local user could
    read it. Followed by a real Chromium, it signs the browser in."""
    from playwright.sync_api import sync_playwright

    argv = tmp_path / "browser-argv.txt"
    script = tmp_path / "browser"
    script.write_text(BROWSER.format(argv=argv))
    script.chmod(0o700)

    def opened() -> str:
        """The one argument the browser was last started with."""
        deadline = time.monotonic() + 10
        while not argv.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        given = argv.read_text().splitlines()
        argv.unlink()
        assert len(given) == 1 and given[0].startswith("file:///"), given
        assert "token" not in given[0], given
        path = Path(given[0].removeprefix("file://"))
        assert path.parent == tool.state_dir and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "/?token=" in path.read_text()
        return given[0]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            child, port, _ = _gateway(tool, "--open", BROWSER=str(script))
            page_url = f"http://localhost:{port}/"
            for link in (opened(), None):
                if link is None:  # and a new link from the running gateway
                    code, out = tool.run("gateway", "open", BROWSER=str(script))
                    assert code == 0, out
                    link = opened()
                page = browser.new_context().new_page()
                page.goto(link)  # the file sends the browser on; the link signs it in
                page.wait_for_url(page_url, timeout=10_000)
                page.locator('#models tr[data-model="lab-ok"]').wait_for(
                    state="attached", timeout=10_000
                )
        finally:
            browser.close()
    _stop(child)
