"""No web page can use the server (issue 22, finding 1), in a real browser.

Headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) opens a
page served from another local origin. The page tries ``start``'s port and
the gateway the way a hostile page would: simple requests (no preflight:
``text/plain`` POSTs, a GET of ``/metrics``), preflighted ones (JSON, an
``Authorization`` guess), and ``no-cors`` ones whose answer it cannot read
but which could still make the server work; on ``/invocations`` (which vLLM
runs without its key) and under ``/v1``. It reports what it got to its own
origin. It must get nothing usable, and the server must have done no work
for it, while the openai client with the key works on both."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_gateway_cli import detach, gateway_tool, stop_gateway
from tool import Tool, ctrl_c_leaves_nothing, free_port

__all__ = ["gateway_tool"]  # the fixture, used by name below

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

PAGE = """<!doctype html><meta charset="utf-8"><title>a page on the web</title><script>
const targets = TARGETS;
const body = JSON.stringify({model: MODEL, prompt: "hi", max_tokens: 1,
                             messages: [{role: "user", content: "hi"}]});
async function attempt(name, url, init) {
  try {
    const r = await fetch(url, init);
    let text = "";
    try { text = await r.text(); } catch (e) { text = "unreadable: " + e; }
    return {name, url, type: r.type, status: r.status, text: text.slice(0, 300)};
  } catch (e) {
    return {name, url, error: String(e)};
  }
}
(async () => {
  const results = [];
  for (const [who, base] of Object.entries(targets)) {
    const plain = {"Content-Type": "text/plain"};
    const json = {"Content-Type": "application/json"};
    results.push(await attempt(who + " simple GET /metrics", base + "/metrics", {}));
    results.push(await attempt(who + " simple GET /v1/models", base + "/v1/models", {}));
    results.push(await attempt(who + " simple POST /invocations", base + "/invocations",
                               {method: "POST", headers: plain, body}));
    results.push(await attempt(who + " simple POST /v1/chat/completions",
                               base + "/v1/chat/completions", {method: "POST", headers: plain, body}));
    results.push(await attempt(who + " preflighted POST /invocations", base + "/invocations",
                               {method: "POST", headers: json, body}));
    results.push(await attempt(who + " preflighted POST /v1/chat/completions",
                               base + "/v1/chat/completions",
                               {method: "POST", headers: {...json, "Authorization": "Bearer guess"}, body}));
    results.push(await attempt(who + " no-cors POST /invocations", base + "/invocations",
                               {method: "POST", mode: "no-cors", headers: plain, body}));
    results.push(await attempt(who + " no-cors POST /v1/completions", base + "/v1/completions",
                               {method: "POST", mode: "no-cors", headers: plain, body}));
  }
  await fetch("/report", {method: "POST", body: JSON.stringify(results)});
  document.title = "done";
})();
</script>
"""


class PageServer:
    """Another local origin: serves the page, takes its report."""

    def __init__(self, page: str) -> None:
        self.reports: list[list[dict[str, Any]]] = []
        self.arrived = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = page.encode()
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                outer.reports.append(json.loads(self.rfile.read(n)))
                outer.arrived.set()
                self.send_response(204)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def browse(url: str, tmp_path: Path, page: PageServer, timeout: float = 60) -> list[dict[str, Any]]:
    """Open ``url`` in headless Chromium until the page reports; then stop it
    (its own process group, which we started)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Debian's chromium is needed for this test: apt-get install chromium (.ci/run does)"
        )
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with open(tmp_path / "chromium.log", "wb") as log:
        proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        arrived = page.arrived.wait(timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert arrived, "the page never reported: " + (tmp_path / "chromium.log").read_text()[-2000:]
    return page.reports[0]


def served_requests(port: int, key: str) -> float:
    """Completions the server has run (its own /metrics, asked with the key)."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        text = client.get(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {key}"}
        ).text
    m = re.search(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M)
    assert m, text
    return float(m.group(1))


@pytest.fixture
def page_server() -> Iterator[list[PageServer]]:
    made: list[PageServer] = []
    yield made
    for server in made:
        server.close()


def test_no_web_page_can_use_start_or_the_gateway(
    lab: Any, gateway_tool: Tool, tmp_path: Path, page_server: list[PageServer]
) -> None:
    from openai import OpenAI

    tool = gateway_tool
    port = free_port()
    child = tool.spawn("start", "-m", "lab-ok", "--port", str(port), timeout=90)
    child.expect_exact(CONNECTED + str(port))
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact("[INFO] Streaming logs")
    served = json.loads((tool.state_dir / "sessions" / "lab-ok.json").read_text())["served_name"]
    gw_base, gw_key, _ = detach(tool)
    gw_origin = gw_base.removesuffix("/v1")

    before = served_requests(port, key)
    jobs = lab.jobs()
    targets = {
        "start": f"http://127.0.0.1:{port}",
        "start-localhost": f"http://localhost:{port}",
        "gateway": gw_origin,
    }
    page = PageServer(
        PAGE.replace("TARGETS", json.dumps(targets)).replace("MODEL", json.dumps(served))
    )
    page_server.append(page)
    results = browse(page.url, tmp_path, page)

    assert len(results) == 8 * len(targets), results
    usable = [
        r for r in results if "error" not in r and (r["type"] != "opaque" or r["status"] != 0)
    ]
    assert usable == [], json.dumps(usable, indent=1)
    # Nothing the page could read, and no work done for it either (no-cors
    # requests are sent even though their answer stays opaque).
    assert served_requests(port, key) == before
    assert lab.jobs() == jobs  # the gateway started nothing for the page

    # The openai client with the key works on both.
    direct = OpenAI(base_url=f"http://localhost:{port}/v1", api_key=key, max_retries=0, timeout=60)
    reply = direct.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    assert served_requests(port, key) == before + 1
    gateway = OpenAI(base_url=gw_base, api_key=gw_key, max_retries=0, timeout=60)
    assert "lab-ok" in [m.id for m in gateway.models.list().data]

    stop_gateway(tool)
    ctrl_c_leaves_nothing(child, lab, tool)


@pytest.mark.parametrize("guarded", [False, True], ids=["as-vllm", "guarded"])
def test_the_page_against_the_standin(
    tmp_path: Path, page_server: list[PageServer], guarded: bool
) -> None:
    """Without the lab: the same page against the vLLM stand-in on a TCP
    port. As vLLM 0.11 (no guard) the page reads /metrics and gets
    completions from /invocations (what the test above would see without the
    guard); with the job script's --middleware it gets nothing, and the
    server runs nothing for it."""
    from test_private import _model, _spawn, _stop, _wait_accepting

    from alvis_fsm.cluster.remote import guard

    shipped = tmp_path / "guard"
    shipped.mkdir()
    (shipped / f"{guard.MODULE}.py").write_text(guard.source())
    port = free_port()
    middleware = ("--middleware", guard.MIDDLEWARE) if guarded else ()
    proc = _spawn(_model(tmp_path, "ok"), "--port", str(port), *middleware, pythonpath=str(shipped))
    try:
        _wait_accepting(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close())
        page = PageServer(
            PAGE.replace("TARGETS", json.dumps({"vllm": f"http://127.0.0.1:{port}"})).replace(
                "MODEL", '"m"'
            )
        )
        page_server.append(page)
        results = browse(page.url, tmp_path, page)
        work = served_requests(port, "sekret")
    finally:
        _stop(proc)
    readable = [r for r in results if r.get("status") == 200]
    if guarded:
        assert [r for r in results if "error" not in r and r["type"] != "opaque"] == [], results
        assert work == 0
    else:
        names = {r["name"] for r in readable}
        assert {
            "vllm simple GET /metrics",
            "vllm simple POST /invocations",
            "vllm preflighted POST /invocations",
        } <= names, results
        assert any('"choices"' in r["text"] for r in readable)  # a completion, read by the page
        assert work >= 3  # the no-cors POST ran too, though its answer stayed opaque
