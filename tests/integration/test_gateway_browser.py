"""The gateway's page in a real browser (issue 25): headless Chromium (the
system's, driven by Playwright; nothing downloaded) against a gateway on the
lab cluster. The printed link signs the browser in; the page shows a cold
model, turns it ready and moves its counters as a request goes through the
openai client, without reloading; without the link nothing shows and the
data answers 401; a page of another origin can neither read the data nor
press a button; /metrics parses with Prometheus' own parser and counts what
was sent; the Stop button cancels the job, reported once confirmed. The
screenshots in docs/guides/ are written here."""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt

DOCS = Path(__file__).resolve().parents[2] / "docs" / "guides"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ASK = {"model": "lab-ok", "messages": [{"role": "user", "content": "Hello"}]}

# A page of another origin that tries the gateway's data and its Stop button
# (the gateway's port is filled in); it writes what happened into its title.
EVIL = """<!doctype html><title>running</title><script>
(async () => {
  const out = [];
  try { const r = await fetch("http://localhost:PORT/gateway/page/state", {credentials: "include"});
        out.push("read:" + r.status + ":" + (await r.text()).length); }
  catch (e) { out.push("read:blocked"); }
  try { await fetch("http://localhost:PORT/gateway/page/models/lab-ok/stop",
                    {method: "POST", credentials: "include", headers: {"X-CSRF-Token": "guess"}});
        out.push("stop:sent"); }
  catch (e) { out.push("stop:blocked"); }
  try { await fetch("http://localhost:PORT/gateway/page/models/lab-ok/stop",
                    {method: "POST", credentials: "include", mode: "no-cors"});
        out.push("simple:sent"); }
  catch (e) { out.push("simple:blocked"); }
  document.title = out.join(" ");
})();
</script>"""


@pytest.fixture
def evil_site(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A web server on another port (another origin), serving ``tmp_path``."""
    site = tmp_path / "evil"
    site.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args):  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _counts(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_page_in_a_browser(
    lab, tool: Tool, tmp_path: Path, evil_site: tuple[Path, int]
) -> None:
    from openai import OpenAI
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    child = tool.spawn("gateway", "--port", str(port), timeout=90)
    child.expect(r"export OPENAI_BASE_URL=(\S+)")
    base = child.match.group(1)
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect(r"Page: (http://localhost:\d+/\?token=\S+)")
    link = child.match.group(1)
    assert link.startswith(f"http://localhost:{port}/?token=")
    child.expect_exact(f"Gateway on http://localhost:{port}/v1")
    page_url = f"http://localhost:{port}/"

    # Without the link: the page shows nothing, its data answers 401.
    with httpx.Client(trust_env=False, timeout=10) as http:
        for path in ("", "gateway/page/state", "gateway/static/app.js", "metrics"):
            resp = http.get(page_url + path)
            assert resp.status_code == 401 and "lab-ok" not in resp.text, path

    site, evil_port = evil_site
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 900})
            page = ctx.new_page()
            page.on("dialog", lambda d: d.accept())  # the Stop button's confirmation
            resp = page.goto(page_url)
            assert resp is not None and resp.status == 401
            assert "lab-ok" not in page.content()

            page.goto(link)  # signs in, then lands on / without the token
            assert page.url == page_url
            cookies = [c for c in ctx.cookies() if c["name"] == f"alvis_fsm_gateway_{port}"]
            assert cookies and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
            row = page.locator('#models tr[data-model="lab-ok"]')
            expect(row).to_have_attribute("data-state", "cold", timeout=10_000)
            assert len(lab.jobs()) == 0
            page.evaluate("window.notReloaded = true")
            page.screenshot(path=str(DOCS / "gateway-page-cold.png"), full_page=True)

            client = OpenAI(base_url=base, api_key=key, timeout=120, max_retries=0)
            for _ in range(2):
                reply = client.chat.completions.create(**ASK)  # type: ignore[call-overload]
                assert reply.choices[0].message.content
            expect(row).to_have_attribute("data-state", "ready", timeout=10_000)
            expect(row.locator("td.served")).to_have_text("2", timeout=5_000)
            expect(row.locator("td.tokens")).not_to_have_text("0 / 0")
            expect(page.locator("#recent tbody tr")).to_have_count(2)
            assert page.evaluate("window.notReloaded") is True  # live updates, no reload
            job = row.locator("td").nth(2).inner_text()
            assert job in lab.jobs()
            page.screenshot(path=str(DOCS / "gateway-page.png"), full_page=True)

            # Another origin (same site: localhost on another port; and another
            # site: 127.0.0.1) in the signed-in browser: it reads nothing and
            # its button presses are refused.
            (site / "evil.html").write_text(EVIL.replace("PORT", str(port)))
            evil = ctx.new_page()
            for host in ("localhost", "127.0.0.1"):
                evil.goto(f"http://{host}:{evil_port}/evil.html")
                expect(evil).not_to_have_title("running", timeout=10_000)
                # A no-cors POST may go out (no custom header, so no CSRF
                # token): refused by the gateway (403 without the token, 401
                # without the cookie), checked below by the model still ready.
                assert evil.title().startswith("read:blocked stop:blocked simple:"), host
            evil.close()
            page.wait_for_timeout(1500)
            expect(row).to_have_attribute("data-state", "ready")
            assert job in lab.jobs()

            # /metrics: Prometheus' parser, counters as sent.
            with httpx.Client(trust_env=False, timeout=10) as http:
                metrics = http.get(page_url + "metrics", headers={"Authorization": f"Bearer {key}"})
            assert metrics.status_code == 200
            counts = _counts(metrics.text)
            route = ("route", "/v1/chat/completions")
            assert (
                counts[
                    ("alvis_fsm_requests_total", (("model", "lab-ok"), route, ("status", "200")))
                ]
                == 2
            )
            assert counts[("alvis_fsm_request_duration_seconds_count", (("model", "lab-ok"),))] == 2
            assert counts[("alvis_fsm_model_state", (("model", "lab-ok"), ("state", "ready")))] == 1
            assert counts[("alvis_fsm_prompt_tokens_total", (("model", "lab-ok"),))] > 0
            assert counts[("alvis_fsm_load_duration_seconds_count", (("model", "lab-ok"),))] == 1

            # The Stop button: done only once the scheduler confirms the cancel.
            row.locator("button").click()
            expect(page.locator("#notice")).to_contain_text(
                "confirmed by the scheduler", timeout=90_000
            )
            assert job not in lab.jobs()
            expect(row).to_have_attribute("data-state", "cold", timeout=5_000)
        finally:
            browser.close()

    # The request log: one line per request, no body, no key.
    code, out = tool.run("gateway", "log")
    assert code == 0, out
    lines = [line for line in out.splitlines() if "/v1/chat/completions" in line]
    assert len(lines) == 2 and all("lab-ok" in line and " 200 " in line for line in lines)
    logged = (tool.state_dir / "gateway-requests.jsonl").read_text()
    assert "Hello" not in logged and key not in logged

    interrupt(child)
    child.expect_exact("Gateway stopped; nothing left running", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0
    assert_nothing_left(lab, tool)
