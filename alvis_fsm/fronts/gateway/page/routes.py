"""The gateway's page in the browser (``GET /``), its data, its buttons,
and ``GET /metrics``; their access check, as Jupyter's:

- ``/?token=T`` with a one-time login token, used within
  ``gateway.login_link_life`` of its making (the gateway prints the link;
  ``POST /gateway/login-link`` with the gateway key makes another) sets a
  session cookie, ``HttpOnly; SameSite=Strict``, named after the port
  (cookies are not kept apart by port), and redirects to ``/``;
- without that cookie the page and its data answer 401, showing nothing;
- a button (POST) also needs the page's CSRF token in ``X-CSRF-Token`` (a
  custom header: a page of another origin cannot send it without a CORS
  preflight, which is never granted) and, if sent, a same-origin ``Origin``;
- ``Host`` must name this machine's loopback and this port (a DNS
  rebinding page has another ``Host``);
- ``/metrics`` takes the gateway key (``Authorization: Bearer``) or the
  cookie.

Everything the page needs ships in the package (``static/``): the page
works with no internet. Server-rendered HTML, one script, one stylesheet,
no build step; see docs/guides/gateway.md for why."""

from __future__ import annotations

import asyncio
import contextlib
import html
import importlib.resources
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from alvis_fsm.fronts.gateway.keys import matches
from alvis_fsm.fronts.gateway.observe.batchview import BatchSource, CancelRefused, NoBatches
from alvis_fsm.fronts.gateway.observe.metrics import CONTENT_TYPE, Metrics
from alvis_fsm.fronts.gateway.observe.requestlog import RequestLog
from alvis_fsm.fronts.gateway.observe.rows import ModelRow, Totals, fine
from alvis_fsm.fronts.gateway.observe.watch import Watch
from alvis_fsm.paths import packaged_default

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.slot.models import Models

LOGIN_TOKENS = 16  # unused login links kept at most (the oldest go first)
SWEEP_S = 5.0  # how often the charts' points and the start times are taken
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
SIGNED_IN = (
    '<!doctype html><meta charset=utf-8><meta http-equiv="refresh" content="0;url=/">'
    '<title>alvis-fsm gateway</title><p>Signed in: <a href="/">open the page</a>.</p>'
)
LOOPBACK = {"localhost", "127.0.0.1", "[::1]"}
# The page loads only what it ships; nothing may frame it (its buttons).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class Host(Protocol):
    """What the page reads of the gateway it is part of (server.py's
    ``Gateway``; the page does not import the app)."""

    key: str
    models: Models

    @property
    def held(self) -> int: ...


def _static(name: str) -> bytes:
    return (
        importlib.resources.files("alvis_fsm.fronts.gateway.page")
        .joinpath("static", name)
        .read_bytes()
    )


class Page:
    def __init__(
        self,
        gateway: Host,
        log: RequestLog | None = None,
        batches: BatchSource | None = None,
        stop_timeout: float = 180.0,
        login_life: float | None = None,
    ) -> None:
        self.gateway = gateway
        # How long a login link stays valid: seconds from its making.
        self.login_life = float(login_life or packaged_default("gateway.login_link_life"))
        self.batches: BatchSource = batches or NoBatches()
        self.metrics = Metrics(gateway.models, self.batches)
        self.watch = Watch(gateway.models, log, self.metrics)
        self.stop_timeout = stop_timeout
        self._logins: dict[str, float] = {}  # one-time login token -> when made
        self._sessions: dict[str, str] = {}  # cookie value -> its CSRF token
        self._sweeper: asyncio.Task[None] | None = None
        self._assets = {name: _static(name) for name in STATIC}

    # -- registration ------------------------------------------------------------------
    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/gateway/page/state", self.state)
        r.add_post("/gateway/page/models/{name}/stop", self.stop_model)
        r.add_post("/gateway/page/batches/{id}/cancel", self.cancel_batch)
        r.add_get("/gateway/static/{name}", self.static)
        r.add_get("/metrics", self.prometheus)
        r.add_post("/gateway/login-link", self.login_link)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    @staticmethod
    def owns(path: str) -> bool:
        """The paths whose access this page checks itself (the server's key
        check lets them through)."""
        return path in ("/", "/metrics", "/gateway/login-link") or path.startswith(
            ("/gateway/page/", "/gateway/static/")
        )

    async def _start(self, app: web.Application) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def _stop(self, app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.watch.log is not None:
            self.watch.log.close()

    async def _sweep(self) -> None:
        while True:
            self.watch.sweep()
            await asyncio.sleep(SWEEP_S)

    # -- access --------------------------------------------------------------------------
    def new_login_token(self) -> str:
        token = secrets.token_urlsafe(24)
        now = time.time()  # the wall clock: a link left over a laptop's sleep has aged too
        for old in [t for t, made in self._logins.items() if now - made > self.login_life]:
            del self._logins[old]
        self._logins[token] = now
        while len(self._logins) > LOGIN_TOKENS:
            del self._logins[min(self._logins, key=self._logins.__getitem__)]
        return token

    @staticmethod
    def _port(request: web.Request) -> int:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        return int(sock[1]) if sock else 0

    def _host_ok(self, request: web.Request) -> bool:
        host = request.headers.get("Host", "")
        name, _, port = host.rpartition(":")
        return name in LOOPBACK and port == str(self._port(request))

    def _cookie_name(self, request: web.Request) -> str:
        return f"alvis_fsm_gateway_{self._port(request)}"

    def _session(self, request: web.Request) -> str | None:
        """The CSRF token of the request's page session, or None."""
        value = request.cookies.get(self._cookie_name(request), "")
        for known, csrf in self._sessions.items():
            if value and matches(value, known):
                return csrf
        return None

    def _has_key(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and matches(token.strip(), self.gateway.key)

    @staticmethod
    def _refused(status: int, message: str, page: bool = False) -> web.Response:
        if page:
            text = (
                f"<!doctype html><meta charset=utf-8><title>alvis-fsm gateway</title>"
                f"<p>{html.escape(message)}</p>"
            )
            return web.Response(
                status=status, text=text, content_type="text/html", headers=SECURITY_HEADERS
            )
        return web.json_response(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": status,
                }
            },
            status=status,
            headers=SECURITY_HEADERS,
        )

    def _check(self, request: web.Request, page: bool = False) -> web.Response | str:
        """The request's CSRF token if it may see the page, else the refusal."""
        if not self._host_ok(request):
            return self._refused(
                403,
                "This gateway answers only to http://localhost:PORT"
                " (the Host header names another host)",
                page,
            )
        csrf = self._session(request)
        if csrf is None:
            return self._refused(
                401,
                "Not signed in: open the link `alvis-fsm gateway` printed,"
                " or run `alvis-fsm gateway open` for a new one",
                page,
            )
        return csrf

    def _check_action(self, request: web.Request) -> web.Response | None:
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.headers.get('Host', '')}":
            return self._refused(403, f"A request from another origin ({origin}) cannot act here")
        given = request.headers.get("X-CSRF-Token", "")
        if not given or not matches(given, checked):
            return self._refused(403, "Missing or wrong CSRF token: use the page's buttons")
        return None

    # -- routes ----------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        token = request.query.get("token")
        if token is not None:
            if not self._host_ok(request):
                return self._refused(
                    403, "This gateway answers only to http://localhost:PORT", page=True
                )
            known = next((t for t in self._logins if matches(token, t)), None)
            if known is None:
                return self._refused(
                    401,
                    "This link was used already or is not this gateway's:"
                    " run `alvis-fsm gateway open` for a new one",
                    page=True,
                )
            made = self._logins.pop(known)  # one time
            if time.time() - made > self.login_life:
                return self._refused(
                    401,
                    f"This link has expired: a login link is valid for"
                    f" {self.login_life:g} s after it is made; run"
                    " `alvis-fsm gateway open` for a new one",
                    page=True,
                )
            cookie = secrets.token_urlsafe(32)
            self._sessions[cookie] = secrets.token_urlsafe(32)
            if request.headers.get("Sec-Fetch-Site", "none") in ("none", "same-origin"):
                resp = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": "/"})
            else:
                # Sent here from another site (``gateway --open``'s file:// page):
                # a redirect would go on without the SameSite=Strict cookie,
                # so this page moves on to / itself, a same-site navigation.
                resp = web.Response(
                    status=200, text=SIGNED_IN, content_type="text/html", headers=SECURITY_HEADERS
                )
            resp.set_cookie(
                self._cookie_name(request), cookie, httponly=True, samesite="Strict", path="/"
            )
            return resp
        checked = self._check(request, page=True)
        if isinstance(checked, web.Response):
            return checked
        text = _static("index.html").decode().replace("{{csrf}}", html.escape(checked))
        return web.Response(text=text, content_type="text/html", headers=SECURITY_HEADERS)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._assets:
            return self._refused(404, f"No file {name}")
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        return web.Response(
            body=self._assets[name], content_type=STATIC[name], headers=SECURITY_HEADERS
        )

    async def state(self, request: web.Request) -> web.Response:
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        return web.json_response(snapshot(self), headers=SECURITY_HEADERS)

    async def prometheus(self, request: web.Request) -> web.Response:
        if not self._has_key(request):
            checked = self._check(request)
            if isinstance(checked, web.Response):
                return checked
        self.watch.sweep()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def login_link(self, request: web.Request) -> web.Response:
        if not self._has_key(request):
            return self._refused(401, "Send the gateway's key as 'Authorization: Bearer KEY'")
        port = self._port(request)
        return web.json_response(
            {"url": f"http://localhost:{port}/?token={self.new_login_token()}"}
        )

    async def stop_model(self, request: web.Request) -> web.Response:
        """Stop a model's sessions now; answers once each has ended (its job's
        cancel confirmed by the scheduler, as `alvis-fsm stop`), or with the
        reason it could not be confirmed."""
        refused = self._check_action(request)
        if refused is not None:
            return refused
        slot = self.gateway.models.slots.get(request.match_info["name"])
        if slot is None:
            return self._refused(404, f"No model {request.match_info['name']!r} on this gateway")
        runs = slot.runs()
        if not runs:
            return web.json_response(
                {"model": slot.name, "stopped": [], "message": f"{slot.name} was not running"},
                headers=SECURITY_HEADERS,
            )
        jobs = [r.job_id for r in runs if r.job_id]
        slot.stop("stopped from the gateway's page")
        deadline = time.monotonic() + self.stop_timeout
        while any(r in slot.runs() for r in runs):
            if time.monotonic() >= deadline:
                return self._refused(
                    504,
                    f"{slot.name}: the cancel of job(s) {', '.join(jobs)}"
                    f" is not confirmed after {self.stop_timeout:.0f} s;"
                    " `alvis-fsm status` shows them",
                )
            await slot.changed(0.25)
        if slot.run is None and slot.error:
            return self._refused(502, f"{slot.name}: {slot.error}")
        jobs_text = f"job {', '.join(jobs)}" if jobs else "its session (no job yet)"
        return web.json_response(
            {
                "model": slot.name,
                "stopped": jobs,
                "message": f"{slot.name} stopped: {jobs_text} cancelled,"
                " confirmed by the scheduler",
            },
            headers=SECURITY_HEADERS,
        )

    async def cancel_batch(self, request: web.Request) -> web.Response:
        refused = self._check_action(request)
        if refused is not None:
            return refused
        try:
            batch = await self.batches.cancel(request.match_info["id"])
        except CancelRefused as exc:
            return self._refused(409, str(exc))
        return web.json_response(
            {"batch": batch.to_json(), "message": f"batch {batch.id}: {batch.status.value}"},
            headers=SECURITY_HEADERS,
        )


def snapshot(page: Page) -> dict[str, Any]:
    """The page's data (``GET /gateway/page/state``): each model's row, the batches, the latest requests."""
    page.watch.advance()
    now = time.time()
    models = page.gateway.models
    rows = [
        _shown(ModelRow.of(slot, now, models.load_time), page.watch)
        for slot in models.slots.values()
    ]
    totals = Totals.of(models)
    return {
        "now": now,
        "started": page.watch.started,
        "models": rows,
        "held": page.gateway.held,
        "gpu_hours_used": totals.gpu_hours_used,
        "gpu_hours_saved": totals.gpu_hours_saved,
        "batches": [b.to_json() for b in page.batches.list()],
        "recent": list(page.watch.recent)[-30:][::-1],
        "errors": list(page.watch.errors)[-20:][::-1],
    }


def _shown(row: ModelRow, watch: Watch) -> dict[str, Any]:
    """A model's row as the page shows it, with its requests' figures."""
    figures = watch.figures[row.name]
    p50, p95 = figures.percentile(0.5), figures.percentile(0.95)
    shown: dict[str, Any] = {
        "name": row.name,
        "served": row.served,
        "state": row.state,
        "job_id": row.job_id,
        "node": row.node,
        "gpus": row.gpus,
        "time_left": row.time_left,
        "in_flight": row.in_flight,
        "served_requests": row.served_requests,
        "requests": figures.requests,
        "errors": figures.errors,
        "prompt_tokens": figures.prompt_tokens,
        "completion_tokens": figures.completion_tokens,
        "p50_s": fine(p50) if p50 is not None else None,
        "p95_s": fine(p95) if p95 is not None else None,
        "gpu_hours_used": row.gpu_hours_used,
        "gpu_hours_saved": row.gpu_hours_saved,
        "idle_stops": row.idle_stops,
        "error": row.error,
        "status": row.status,
        "per_minute": list(figures.per_minute)[-180:],
        "gpu_hours_series": [fine(x) for x in list(figures.gpu_hours)[-180:]],
    }
    if row.queued:
        shown["queue_reason"] = row.queue_reason
        shown["expected_start"] = row.expected_start
    if row.loading:
        shown["loading_for_s"] = row.loading_for_s
        shown["expected_load_s"] = row.expected_load_s
    return shown
