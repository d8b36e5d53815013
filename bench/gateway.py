#!/usr/bin/env python3
"""Benchmark `alvis-fsm gateway` on the lab cluster (tests/lab), issue 14.

    python bench/gateway.py [--smoke] [--out bench/results-gateway.md]

One run, with the lab lock held throughout (tests and other benchmarks wait):

  1. `alvis-fsm start -m lab-ok` once, timed to "Connection successful" as
     bench/run.py does (its own code), for the cold-start comparison
  2. a gateway (`alvis-fsm gateway --port P`) as a subprocess; its idle
     footprint with no model started
  3. cold start: the first request to `lab-ok` (cold) until its answer
  4. added latency: N small non-streaming requests through the gateway and
     directly to the session's tunnel (from its session record), interleaved
  5. streaming throughput, gateway vs direct, alternating rounds
  6. 100 concurrent streaming requests across `lab-ok` and `gpt-oss-20b`
     (the second model cold, so half of them are held while it starts)
  7. its idle footprint with both models ready
  8. Ctrl+C (SIGINT): the gateway must cancel both jobs and exit 0
  9. rollover (a second gateway with a short job time limit): a continuous
     request stream across the job change, only when the gateway has the
     `gateway.rollover_lead` setting (and not with --smoke)

It prints a table and writes it, with the details, to
bench/results-gateway.md (bench/results-gateway-smoke.md with --smoke).
Exit status: 0 when the gateway worked (missed goals are reported, not
fatal), 1 when it failed (no answer, a request error under load, a job or
ssh process left, a wrong exit status), 2 when the benchmark could not run,
130 when interrupted (after cleaning up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import pwd
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))

import probes  # noqa: E402
import run as session_bench  # noqa: E402  (bench/run.py: `start`, timed its way)
from conftest import Lab, bring_up_lab, lab_lock  # noqa: E402
from report import Plan, Row, render_table  # noqa: E402
from tool import free_port, tool_argv  # noqa: E402

MODEL = "lab-ok"
SECOND = "gpt-oss-20b"  # another catalog model that loads on the lab (a 13.8 GB A40 fit)
START_TIMEOUT = 60  # s, for the gateway to print its exports and serve
COLD_TIMEOUT = 180  # s, a cold lab model answers in well under 20 s
EXIT_TIMEOUT = 90  # s, for the gateway to cancel its jobs and exit after Ctrl+C
PROMPT = [{"role": "user", "content": "Hello"}]
ANSWER = "Hello from the alvis-lab stand-in"  # what the lab's vLLM stand-in says

# Goals from issue 14.
GOAL_ADDED_P50 = 0.002  # s
GOAL_THROUGHPUT = 0.95  # × direct
GOAL_COLD_OVER_START = 1.0  # s
# Ours: a small answer through the tunnel costs no delayed ACK (~40 ms) on
# the node's sshd (cluster/tunnel.HOLD).
GOAL_TUNNEL_P50 = 0.005  # s


@dataclass
class Setup:
    smoke: bool
    requests: int  # added latency: pairs of requests
    rounds: int  # streaming throughput: rounds of (direct, gateway)
    round_s: float
    concurrent: int
    idle_s: float

    @classmethod
    def make(cls, smoke: bool) -> Setup:
        if smoke:
            return cls(True, requests=40, rounds=1, round_s=2, concurrent=100, idle_s=3)
        return cls(False, requests=200, rounds=3, round_s=5, concurrent=100, idle_s=10)


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(x: float | None) -> str:
    return "—" if x is None else f"{1000 * x:.2f} ms"


# ================================================================ the direct client
def direct_target(record: Any) -> tuple[str, dict[str, str], str | None]:
    """Where a gateway session's tunnel ends, from its session record: (base
    URL, auth headers, unix socket or None). A record with a ``local_socket``
    (a tunnel ending in a unix socket) is reached through it, else through
    ``local_port`` on loopback."""
    headers = {"Authorization": f"Bearer {record.api_key}"} if record.api_key else {}
    socket_path = str(getattr(record, "local_socket", "") or "")
    if socket_path:
        return "http://localhost", headers, socket_path
    return f"http://127.0.0.1:{record.local_port}", headers, None


def direct_client(record: Any, timeout: float = 30) -> httpx.Client:
    base, headers, uds = direct_target(record)
    transport = httpx.HTTPTransport(uds=uds) if uds else None
    return httpx.Client(
        base_url=base, headers=headers, transport=transport, trust_env=False, timeout=timeout
    )


# ================================================================ the gateway process
class GatewayProc:
    """`alvis-fsm gateway --port P` as a subprocess, with its own HOME and
    state dir: the exports read from its stdout, progress from its stderr."""

    def __init__(self, lab: Lab, root: Path, **extra_env: str) -> None:
        self.lab = lab
        self.root = root
        self.home = root / "home"
        self.state = root / "state"  # short: the sessions' ssh control sockets live below
        self.home.mkdir(parents=True)
        self.state.mkdir()
        self.port = free_port()
        self.err_path = root / "gateway.err"
        self.env = {
            **lab.env,
            "HOME": str(self.home),
            "ALVIS_FSM_SESSION__STATE_DIR": str(self.state),
            "TERM": "dumb",
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.key = ""
        self.exit_status: int | None = None

    def start(self) -> None:
        argv = [*tool_argv(), "gateway", "--port", str(self.port)]
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                # Ctrl+C as in a terminal, even when the bench runs in the
                # background of a shell without job control (SIGINT ignored).
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        exports = self._read_exports()
        self.base, self.key = exports.get("OPENAI_BASE_URL", ""), exports.get("OPENAI_API_KEY", "")
        if not self.base or not self.key:
            raise RuntimeError(f"the gateway printed no exports\n{self.tail()}")
        if not probes.wait_until(
            lambda: "Gateway on " in self.stderr() or not self.alive(), START_TIMEOUT
        ):
            raise RuntimeError(f"the gateway did not say it serves\n{self.tail()}")
        if not self.alive():
            raise RuntimeError(f"the gateway exited at once\n{self.tail()}")

    def _read_exports(self) -> dict[str, str]:
        assert self.proc is not None and self.proc.stdout is not None
        found: dict[str, str] = {}
        buf = b""
        deadline = time.monotonic() + START_TIMEOUT
        while len(found) < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if not ready:
                if self.proc.poll() is not None:
                    break
                continue
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                name, sep, value = line.removeprefix("export ").partition("=")
                if sep and name in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
                    found[name] = value.strip().strip("'\"")
        return found

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.base,
            trust_env=False,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.key}"},
        )

    def async_client(self, timeout: float = 30) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base,
            trust_env=False,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.key}"},
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=400),
        )

    def models(self) -> dict[str, dict[str, Any]]:
        with self.client() as c:
            return {m["id"]: m for m in c.get("/models").json()["data"]}

    def record(self, model: str) -> Any:
        """The model's session record, as the gateway's session service saved it."""
        from alvis_fsm.engine.session.store import Store
        from alvis_fsm.fronts.gateway.slot.sessions import session_name

        return Store(self.state).load(session_name(model))

    def interrupt(self) -> bool:
        """Ctrl+C (SIGINT); True when it then exited."""
        if self.proc is None:
            return True
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
        try:
            self.exit_status = self.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.kill()
            self.exit_status = self.proc.wait(10)


# ================================================================ results
@dataclass
class Results:
    setup: Setup
    started: str = ""
    duration_s: float = 0.0
    start_connected: float | None = None  # `start`: spawn -> "Connection successful"
    cold: float | None = None  # gateway: first request to a cold model -> its answer
    gw_times: list[float] = field(default_factory=list)
    direct_times: list[float] = field(default_factory=list)
    added: list[float] = field(default_factory=list)  # gateway - direct, per pair
    latency_errors: int = 0
    direct_via: str = ""
    stream: dict[str, list[tuple[int, int, int, float]]] = field(default_factory=dict)
    stream_note: str = ""
    stream_times: dict[str, list[float]] = field(default_factory=dict)  # per stream, s
    concurrent_n: int = 0
    concurrent_errors: list[str] = field(default_factory=list)
    concurrent_s: float | None = None
    idle_cold: tuple[float, float] | None = None  # (max RSS MB, CPU %), no model started
    idle_ready: tuple[float, float] | None = None  # both models ready
    helpers_ready: tuple[float, float] | None = None  # its ssh processes, both models ready
    rollover: str = "not measured (not implemented)"
    rollover_failed: int | None = None
    rollover_requests: int = 0
    shutdown: str = ""
    shutdown_ok: bool | None = None
    failures: list[str] = field(default_factory=list)


# ================================================================ the bench
class GatewayBench:
    def __init__(self, lab: Lab, setup: Setup, tmp: Path) -> None:
        self.lab = lab
        self.setup = setup
        self.tmp = tmp  # every ssh we cause names a dir below it
        self.results = Results(setup, started=dt.datetime.now().isoformat(timespec="seconds"))
        self.jobs_seen: set[str] = set()
        self.runs_root = Path(pwd.getpwnam(lab.user).pw_dir) / ".alvis-vllm" / "runs"
        self.runs_before = set(self._runs())

    def fail(self, what: str) -> None:
        print(f"  !! {what}", flush=True)
        self.results.failures.append(what)

    def _runs(self) -> list[Path]:
        try:
            return [p for p in self.runs_root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    # -- 1. `start`'s time to connected ----------------------------------------
    def measure_start(self) -> None:
        root = self.tmp / "start"
        root.mkdir()
        bench = session_bench.Bench(self.lab, Plan.make(True, 1), root)
        res = bench.session("jump")
        self.jobs_seen |= bench.jobs_seen
        self.results.start_connected = res.time_to_connected
        print(
            f"  start -m {MODEL}: connected after {ms_or_s(res.time_to_connected)}, "
            f"exit {res.exit_status}",
            flush=True,
        )
        if res.problem:
            self.fail(f"start: {res.problem}")

    # -- 3. cold start -------------------------------------------------------------
    def measure_cold(self, gw: GatewayProc) -> None:
        with gw.client(timeout=COLD_TIMEOUT) as c:
            t0 = time.perf_counter()
            resp = c.post("/chat/completions", json={"model": MODEL, "messages": PROMPT})
            took = time.perf_counter() - t0
        text = ""
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            text = resp.json()["choices"][0]["message"]["content"]
        if resp.status_code != 200 or text != ANSWER:
            raise ToolFailure(
                f"cold request to {MODEL}: {resp.status_code} {resp.text[:300]}\n{gw.tail()}"
            )
        self.results.cold = took
        print(f"  first request to cold {MODEL}: answered after {took:.2f} s", flush=True)

    # -- 4. added latency ------------------------------------------------------------
    def measure_latency(self, gw: GatewayProc) -> None:
        record = gw.record(MODEL)
        base, _, uds = direct_target(record)
        self.results.direct_via = f"unix socket {uds}" if uds else f"tunnel port {base}"
        direct_body = {"model": record.served_name, "messages": PROMPT, "max_tokens": 16}
        gw_body = {"model": MODEL, "messages": PROMPT, "max_tokens": 16}
        r = self.results
        warm = 10
        with gw.client() as g, direct_client(record) as d:

            def one(client: httpx.Client, path: str, body: dict[str, Any]) -> float | None:
                t0 = time.perf_counter()
                try:
                    resp = client.post(path, json=body)
                    ok = resp.status_code == 200 and bool(resp.json()["choices"])
                except (httpx.HTTPError, ValueError, KeyError):
                    ok = False
                took = time.perf_counter() - t0
                return took if ok else None

            for i in range(warm + self.setup.requests):
                # Alternate which goes first, so drift and caching cancel out.
                legs = [
                    ("gw", g, "/chat/completions", gw_body),
                    ("direct", d, "/v1/chat/completions", direct_body),
                ]
                if i % 2:
                    legs.reverse()
                took = {name: one(client, path, body) for name, client, path, body in legs}
                if i < warm:
                    continue
                if took["gw"] is None or took["direct"] is None:
                    r.latency_errors += 1
                    continue
                r.gw_times.append(took["gw"])
                r.direct_times.append(took["direct"])
                r.added.append(took["gw"] - took["direct"])
        if r.latency_errors:
            self.fail(f"added latency: {r.latency_errors} of {self.setup.requests} pairs failed")
        if r.added:
            print(
                f"  added latency over {len(r.added)} pairs ({r.direct_via}): "
                f"p50 {ms(quantile(r.added, 0.5))}, p99 {ms(quantile(r.added, 0.99))} "
                f"(gateway p50 {ms(quantile(r.gw_times, 0.5))}, "
                f"direct p50 {ms(quantile(r.direct_times, 0.5))})",
                flush=True,
            )

    # -- 5. streaming throughput -------------------------------------------------------
    def measure_streaming(self, gw: GatewayProc) -> None:
        record = gw.record(MODEL)
        r = self.results
        r.stream = {"gw": [], "direct": []}
        r.stream_times = {"gw": [], "direct": []}
        with gw.client() as g, direct_client(record) as d:
            legs = {
                "direct": (d, "/v1/chat/completions", record.served_name),
                "gw": (g, "/chat/completions", MODEL),
            }
            for _ in range(self.setup.rounds):
                for name, (client, path, model) in legs.items():
                    r.stream[name].append(
                        self._stream_round(client, path, model, r.stream_times[name])
                    )
        db, de, dn, dt_ = totals(r.stream["direct"])
        gb, _, gn, gt = totals(r.stream["gw"])
        per_stream = de / dn if dn else 0
        if per_stream < 20:
            r.stream_note = (
                f"The lab's vLLM stand-in streams a fixed short answer ({per_stream:.0f} SSE "
                f"events, {db / max(dn, 1):.0f} bytes, in one write) and shortens but never "
                "lengthens it for max_tokens, so this is bytes/s over back-to-back streams "
                f"(one at a time, {self.setup.round_s:g} s rounds, direct and gateway "
                "alternating), not one long stream's token rate."
            )
        else:
            r.stream_note = (
                f"One stream is {per_stream:.0f} SSE events ({db / max(dn, 1):,.0f} bytes; vLLM's "
                "ignore_eos with max_tokens 4096, each token an event of its own chunk), read "
                f"back to back in {self.setup.round_s:g} s rounds, direct and gateway alternating;"
                " the direct client is httpx, as the gateway's own clients may be."
            )
        slow = {k: sum(t > 0.02 for t in v) / max(len(v), 1) for k, v in r.stream_times.items()}
        # Only short streams are dominated by a stall; a long one takes longer anyway.
        if per_stream < 20 and (slow["gw"] > 0.05 or slow["direct"] > 0.05):
            r.stream_note += (
                f" Per-stream times are bimodal: a few ms, or about 40–50 ms (a stall of the "
                f"size of a delayed TCP ACK) for {100 * slow['direct']:.0f} % of direct and "
                f"{100 * slow['gw']:.0f} % of gateway streams; the totals follow how many stall."
            )
        print(
            f"  streaming: direct {db / dt_:,.0f} B/s ({dn} streams), gateway "
            f"{gb / gt:,.0f} B/s ({gn} streams): {(gb / gt) / (db / dt_):.3f}×",
            flush=True,
        )
        if r.stream_note:
            print(f"  ({r.stream_note})", flush=True)

    def _stream_round(
        self, client: httpx.Client, path: str, model: str, times: list[float]
    ) -> tuple[int, int, int, float]:
        """(bytes, SSE data events, streams, seconds) of back-to-back streams."""
        # ignore_eos (a vLLM sampling parameter): exactly max_tokens tokens, one
        # stream long enough to measure a rate, not a per-request stall.
        body = {
            "model": model,
            "messages": PROMPT,
            "stream": True,
            "max_tokens": 4096,
            "ignore_eos": True,
        }
        nbytes = events = streams = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.setup.round_s:
            t1 = time.perf_counter()
            with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    raise ToolFailure(f"stream to {path}: {resp.status_code} {resp.read()[:300]!r}")
                data = b"".join(resp.iter_raw())
            if not data.rstrip().endswith(b"data: [DONE]"):
                raise ToolFailure(f"stream to {path} did not end with [DONE]: {data[-200:]!r}")
            times.append(time.perf_counter() - t1)
            nbytes += len(data)
            events += data.count(b"data: ")
            streams += 1
        return nbytes, events, streams, time.perf_counter() - t0

    # -- 6. concurrent streams across two models ------------------------------------------
    def measure_concurrent(self, gw: GatewayProc) -> None:
        n = self.setup.concurrent
        r = self.results
        r.concurrent_n = n
        t0 = time.perf_counter()
        r.concurrent_errors = asyncio.run(self._concurrent(gw, n))
        r.concurrent_s = time.perf_counter() - t0
        print(
            f"  {n} concurrent streams ({MODEL} ready, {SECOND} cold): "
            f"{len(r.concurrent_errors)} errors in {r.concurrent_s:.1f} s",
            flush=True,
        )
        for e in r.concurrent_errors[:5]:
            print(f"    {e}", flush=True)
        if r.concurrent_errors:
            self.fail(
                f"{len(r.concurrent_errors)} of {n} concurrent streams failed: "
                f"{r.concurrent_errors[0]}"
            )

    async def _concurrent(self, gw: GatewayProc, n: int) -> list[str]:
        async with gw.async_client(timeout=COLD_TIMEOUT) as c:

            async def one(i: int) -> str | None:
                model = (MODEL, SECOND)[i % 2]
                body = {"model": model, "messages": PROMPT, "stream": True}
                try:
                    async with c.stream("POST", "/chat/completions", json=body) as resp:
                        if resp.status_code != 200:
                            return f"#{i} {model}: status {resp.status_code}"
                        lines = [x async for x in resp.aiter_lines() if x]
                except httpx.HTTPError as exc:
                    return f"#{i} {model}: {type(exc).__name__}: {exc}"
                data = [x for x in lines if x.startswith("data: ")]
                if not data or data[-1] != "data: [DONE]":
                    return f"#{i} {model}: no [DONE]: {lines[-3:]}"
                text = ""
                for x in data[:-1]:
                    event = json.loads(x[6:])
                    if "error" in event:
                        return f"#{i} {model}: error event {event['error']}"
                    text += event["choices"][0]["delta"].get("content") or ""
                return None if text == ANSWER else f"#{i} {model}: answer {text!r}"

            outcomes = await asyncio.gather(*(one(i) for i in range(n)))
        return [o for o in outcomes if o]

    # -- 2./7. idle footprint ----------------------------------------------------------------
    def idle(self, gw: GatewayProc, what: str) -> tuple[tuple[float, float], tuple[float, float]]:
        """((max RSS MB, CPU %) of the gateway, the same of its ssh processes)
        over setup.idle_s with nothing asked of it."""
        marker = str(gw.state)
        first = probes.rss_and_cpu(gw.pid)
        helpers0 = {pid: probes.rss_and_cpu(pid) for pid in probes.ssh_pids(marker)}
        t0 = time.monotonic()
        max_rss = first[0] if first else 0.0
        helpers_rss = 0.0
        last = first
        while time.monotonic() - t0 < self.setup.idle_s:
            time.sleep(1.0)
            now = probes.rss_and_cpu(gw.pid)
            if now is None:
                break
            last, max_rss = now, max(max_rss, now[0])
            helpers_rss = max(
                helpers_rss,
                sum(s[0] for p in probes.ssh_pids(marker) if (s := probes.rss_and_cpu(p))),
            )
        took = time.monotonic() - t0
        cpu = 100 * (last[1] - first[1]) / took if first and last and took else 0.0
        used = sum(e[1] - s[1] for p, s in helpers0.items() if s and (e := probes.rss_and_cpu(p)))
        helpers = (helpers_rss, 100 * used / took if took else 0.0)
        print(
            f"  idle, {what}: RSS {max_rss:.1f} MB, CPU {cpu:.2f} % over {took:.0f} s"
            + (
                f" (its ssh processes: {helpers[0]:.1f} MB, {helpers[1]:.2f} %)" if helpers0 else ""
            ),
            flush=True,
        )
        return (max_rss, cpu), helpers

    # -- 8. Ctrl+C ------------------------------------------------------------------------
    def stop(self, gw: GatewayProc, jobs: set[str]) -> tuple[str, bool]:
        """SIGINT, then: exit 0, "nothing left running", no job, no ssh left."""
        self.jobs_seen |= jobs
        if not gw.interrupt():
            self.fail(f"gateway ignored Ctrl+C for {EXIT_TIMEOUT} s\n{gw.tail()}")
            gw.kill()
        said = "nothing left running" in gw.stderr()
        left_jobs = [j for j in jobs if j in self.lab.jobs()] if jobs else []
        if left_jobs and probes.wait_until(
            lambda: not [j for j in jobs if j in self.lab.jobs()], 20
        ):
            left_jobs = []
        marker = str(gw.state)
        probes.wait_until(lambda: not probes.ssh_pids(marker), 5)
        left_ssh = probes.ssh_pids(marker)
        if gw.exit_status != 0 or not said:
            self.fail(
                f"gateway: exit {gw.exit_status}, "
                f"{'said' if said else 'did not say'} 'nothing left running'\n{gw.tail()}"
            )
        if left_jobs:
            self.fail(f"gateway: jobs left in squeue after Ctrl+C: {left_jobs}")
        if left_ssh:
            self.fail(f"gateway: ssh processes left after Ctrl+C: {left_ssh}")
            probes.kill_pids(left_ssh)
        verdict = (
            f"exit {gw.exit_status}; jobs {', '.join(sorted(jobs)) or '—'} "
            + ("gone from squeue" if not left_jobs else f"LEFT: {left_jobs}")
            + ("; no ssh left" if not left_ssh else f"; ssh LEFT: {left_ssh}")
        )
        print(f"  Ctrl+C: {verdict}", flush=True)
        ok = gw.exit_status == 0 and said and not left_jobs and not left_ssh
        return verdict, ok

    # -- 9. rollover ------------------------------------------------------------------------
    def measure_rollover(self) -> None:
        r = self.results
        if not rollover_supported():
            r.rollover = "not measured (not implemented)"
            print(f"  rollover: {r.rollover}", flush=True)
            return
        if self.setup.smoke:
            r.rollover = "not measured (--smoke)"
            print(f"  rollover: {r.rollover}", flush=True)
            return
        # A 2-minute job handed over 60 s before its end: the new job starts
        # about a minute after the first is ready.
        limit_s, lead_s = 120, 60
        root = self.tmp / "roll"
        root.mkdir()
        gw = GatewayProc(
            self.lab,
            root,
            ALVIS_FSM_SLURM__TIME="0:02:00",
            ALVIS_FSM_GATEWAY__ROLLOVER_LEAD=str(lead_s),
        )
        jobs: set[str] = set()
        try:
            gw.start()
            failed = sent = 0
            first_job = ""
            t_change: float | None = None
            deadline = time.monotonic() + limit_s + 60
            with gw.client(timeout=COLD_TIMEOUT) as c:
                while time.monotonic() < deadline:
                    body: dict[str, Any] = {"model": MODEL, "messages": PROMPT}
                    try:
                        resp = c.post("/chat/completions", json=body)
                        ok = (
                            resp.status_code == 200
                            and resp.json()["choices"][0]["message"]["content"] == ANSWER
                        )
                    except (httpx.HTTPError, ValueError, KeyError, IndexError):
                        ok = False
                    sent += 1
                    failed += not ok
                    job = str(gw.models()[MODEL].get("job_id") or "")
                    if job:
                        jobs.add(job)
                        first_job = first_job or job
                    if t_change is None and job and job != first_job:
                        t_change = time.monotonic()
                    if t_change is not None and time.monotonic() - t_change > 10:
                        break  # 10 s of requests to the new job
                    time.sleep(0.05)
            r.rollover_failed, r.rollover_requests = failed, sent
            if t_change is None:
                r.rollover = (
                    f"no job change seen within {limit_s + 60} s ({sent} requests, {failed} failed)"
                )
                self.fail(f"rollover: {r.rollover}")
            else:
                r.rollover = (
                    f"{failed} failed of {sent} requests across the change "
                    f"from job {first_job} to {', '.join(sorted(jobs - {first_job}))}"
                )
            print(f"  rollover: {r.rollover}", flush=True)
        finally:
            self.stop(gw, jobs)

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> Results:
        t0 = time.monotonic()
        r = self.results
        try:
            print(f"== `start -m {MODEL}`, timed as bench/run.py does", flush=True)
            self.measure_start()
            print("== gateway", flush=True)
            gw = GatewayProc(self.lab, self.tmp / "gw")
            jobs: set[str] = set()
            try:
                gw.start()
                print(f"  serving on {gw.base} (pid {gw.pid})", flush=True)
                r.idle_cold, _ = self.idle(gw, "no model started")
                self.measure_cold(gw)
                jobs |= self._jobs(gw)
                self.measure_latency(gw)
                self.measure_streaming(gw)
                self.measure_concurrent(gw)
                jobs |= self._jobs(gw)
                time.sleep(1)
                r.idle_ready, r.helpers_ready = self.idle(gw, "two models ready")
            except ToolFailure as exc:
                self.fail(str(exc))
            finally:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    jobs |= self._jobs(gw)
                r.shutdown, r.shutdown_ok = self.stop(gw, jobs)
            print("== rollover", flush=True)
            try:
                self.measure_rollover()
            except ToolFailure as exc:
                self.fail(str(exc))
        finally:
            self.sweep()
            r.duration_s = time.monotonic() - t0
        return r

    def _jobs(self, gw: GatewayProc) -> set[str]:
        if not gw.alive():
            return set()
        return {str(m["job_id"]) for m in gw.models().values() if m.get("job_id")}

    def sweep(self) -> None:
        """Whatever happened: no job or ssh process of ours left, no run dir."""
        left = [j for j in self.lab.jobs() if j in self.jobs_seen]
        if left:
            self.fail(f"jobs left behind: {left} (cancelled now)")
            self.lab.run(["scancel", *left], check=False)
        pids = probes.ssh_pids(str(self.tmp))
        if pids:
            self.fail(f"ssh processes left behind: {pids} (killed now)")
            probes.kill_pids(pids)
        # The tool keeps each session's run dir; the benchmark's are only noise.
        for path in set(self._runs()) - self.runs_before:
            shutil.rmtree(path, ignore_errors=True)


class ToolFailure(Exception):
    """The gateway did not do what it must (not a missed goal)."""


def spread_ms(values: list[float]) -> str:
    if not values:
        return "—"
    qs = ", ".join(f"p{round(100 * q)} {ms(quantile(values, q))}" for q in (0.1, 0.5, 0.9, 0.99))
    return f"{qs}, max {ms(max(values))}"


def ms_or_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def totals(rounds: list[tuple[int, int, int, float]]) -> tuple[int, int, int, float]:
    return (
        sum(x[0] for x in rounds),
        sum(x[1] for x in rounds),
        sum(x[2] for x in rounds),
        sum(x[3] for x in rounds) or 1e-9,
    )


def rollover_supported() -> bool:
    """Whether this checkout's gateway hands a model over before its job's
    time limit: it then has a ``gateway.rollover_lead`` setting."""
    with open(REPO / "config" / "default.toml", "rb") as f:
        return "rollover_lead" in tomllib.load(f).get("gateway", {})


# ================================================================ the report
def rows(r: Results) -> list[Row]:
    out: list[Row] = []
    if r.added:
        p50, p99 = quantile(r.added, 0.5), quantile(r.added, 0.99)
        out.append(
            Row(
                "Added latency per request, p50 (gateway − direct)",
                ms(p50),
                f"≤ {GOAL_ADDED_P50 * 1000:g} ms",
                p50 <= GOAL_ADDED_P50,
            )
        )
        out.append(Row("Added latency per request, p99", ms(p99)))
        direct = quantile(r.direct_times, 0.5)
        out.append(
            Row(
                "A request through the model's tunnel, p50 (direct)",
                ms(direct),
                f"≤ {GOAL_TUNNEL_P50 * 1000:g} ms",
                direct <= GOAL_TUNNEL_P50,
            )
        )
    else:
        out.append(
            Row(
                "Added latency per request, p50 (gateway − direct)",
                "—",
                f"≤ {GOAL_ADDED_P50 * 1000:g} ms",
            )
        )
    if r.stream.get("gw") and r.stream.get("direct"):
        db, _, _, dtt = totals(r.stream["direct"])
        gb, _, _, gtt = totals(r.stream["gw"])
        ratio = (gb / gtt) / (db / dtt)
        out.append(
            Row(
                "Streaming throughput, gateway ÷ direct",
                f"{ratio:.3f}× ({gb / gtt / 1000:,.0f} kB/s / {db / dtt / 1000:,.0f} kB/s)",
                f"≥ {GOAL_THROUGHPUT:g}×",
                ratio >= GOAL_THROUGHPUT,
            )
        )
    else:
        out.append(Row("Streaming throughput, gateway ÷ direct", "—", f"≥ {GOAL_THROUGHPUT:g}×"))
    if r.cold is not None and r.start_connected is not None:
        over = r.cold - r.start_connected
        out.append(
            Row(
                "Cold model: first request → answer, vs `start` → connected",
                f"{r.cold:.2f} s vs {r.start_connected:.2f} s ({over:+.2f} s)",
                f"≤ +{GOAL_COLD_OVER_START:g} s",
                over <= GOAL_COLD_OVER_START,
            )
        )
    else:
        out.append(
            Row(
                "Cold model: first request → answer, vs `start` → connected",
                f"{ms_or_s(r.cold)} vs {ms_or_s(r.start_connected)}",
                f"≤ +{GOAL_COLD_OVER_START:g} s",
            )
        )
    if r.concurrent_n:
        out.append(
            Row(
                f"{r.concurrent_n} concurrent streams, {MODEL} + {SECOND} (cold)",
                f"{len(r.concurrent_errors)} errors ({r.concurrent_s:.1f} s)",
                "0 errors",
                not r.concurrent_errors,
            )
        )
    else:
        out.append(Row("100 concurrent streams across two models", "—", "0 errors"))
    met = None if r.rollover_failed is None else r.rollover_failed == 0
    out.append(Row("Continuous requests across a rollover", r.rollover, "0 failed", met))
    for what, fp in (("no model started", r.idle_cold), ("two models ready", r.idle_ready)):
        value = f"RSS {fp[0]:.1f} MB, CPU {fp[1]:.2f} %" if fp else "—"
        out.append(Row(f"Gateway process while idle, {what}", value))
    if r.helpers_ready:
        rss, cpu = r.helpers_ready
        out.append(
            Row("… its ssh processes, two models ready", f"RSS {rss:.1f} MB, CPU {cpu:.2f} %")
        )
    out.append(
        Row(
            "Ctrl+C: jobs cancelled, nothing left",
            r.shutdown or "—",
            "exit 0, nothing left",
            r.shutdown_ok,
        )
    )
    return out


METHOD = """\
## Method

- **Direct**: the same request sent to the model's session tunnel, found in
  the gateway's session record (`gw-lab-ok.json` in its state dir: the tunnel's
  local port or unix socket and the session's vLLM key), with the served model
  name. Both clients are httpx with keep-alive, in one process, one request
  at a time; gateway and direct requests alternate, and which goes first
  alternates too, so drift cancels. Added latency is gateway − direct per
  pair (nearest-rank p50/p99), after 10 warm-up pairs.
- **Cold start**: the gateway already serving, a non-streaming request to a
  model with no job, until its full answer. `start` is timed as in
  bench/run.py (spawn → "Connection successful", route jump), in the same run,
  with its own fresh state dir.
- **Concurrent**: all requests at once (asyncio, one connection each),
  alternating the two models; the second model has no job yet, so its half is
  held with keep-alive comments while it starts. An error is a non-200, a
  transport error, an `error` event, no `[DONE]` or a wrong answer.
- **Idle**: the gateway's own process, sampled every 1 s: RSS from `ps -o rss=`,
  CPU from utime+stime in /proc. Its ssh processes (the sessions' masters and
  tunnels) are shown apart. No goal in issue 14; `start`'s client is held to
  ≤ 80 MB and ≤ 1 % (bench/results.md).
- **Rollover**: measured only when the gateway has `gateway.rollover_lead`: a
  second gateway with a 2-minute job time limit and a 60 s lead, one
  non-streaming request after another until 10 s after `/v1/models` shows the
  new job; a failure is anything but a 200 with the answer.
"""


def render_markdown(r: Results, table: list[Row]) -> str:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        text=True,
        capture_output=True,
        check=False,
    ).stdout.strip()
    s = r.setup
    command = "python bench/gateway.py" + (" --smoke" if s.smoke else "")
    lines = [
        "# alvis-fsm gateway benchmark (lab cluster)",
        "",
        f"Generated by `{command}` on {r.started} (commit {commit or '?'}, "
        f"host {os.uname().nodename}); the run took {r.duration_s:.0f} s. "
        "Do not edit by hand: rerun the benchmark.",
        "",
        f"Plan: {s.requests} request pairs for added latency, {s.rounds} round(s) of "
        f"{s.round_s:g} s per side for streaming, {s.concurrent} concurrent streams, "
        f"idle sampled over {s.idle_s:g} s; model `{MODEL}` (and `{SECOND}`).",
        "",
        "## Goals",
        "",
        render_table(table),
        "",
    ]
    if r.failures:
        lines += ["## Gateway failures", "", *[f"- {f}" for f in r.failures], ""]
    lines += ["## Details", ""]
    if r.added:
        lines.append(
            f"- Per request ({len(r.added)} pairs, direct via {r.direct_via}): gateway "
            f"p50 {ms(quantile(r.gw_times, 0.5))} / p99 {ms(quantile(r.gw_times, 0.99))}; "
            f"direct p50 {ms(quantile(r.direct_times, 0.5))} / p99 "
            f"{ms(quantile(r.direct_times, 0.99))}; gateway − direct mean "
            f"{ms(statistics.fmean(r.added))}."
        )
    for name in ("direct", "gw"):
        if r.stream.get(name):
            b, e, n, t = totals(r.stream[name])
            lines.append(
                f"- Streaming, {'gateway' if name == 'gw' else 'direct'}: {n} streams, "
                f"{b:,} bytes, {e:,} events in {t:.1f} s = {n / t:.0f} streams/s, "
                f"{e / t:,.0f} events/s; per stream {spread_ms(r.stream_times[name])}."
            )
    if r.stream_note:
        lines.append(f"- {r.stream_note.strip()}")
    for err in r.concurrent_errors[:10]:
        lines.append(f"- concurrent error: {err}")
    return "\n".join([*lines, "", METHOD])


# ================================================================ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="short run for CI (40 pairs, 3 s idle)")
    ap.add_argument(
        "--out", type=Path, help="report file (default bench/results-gateway.md, or -smoke.md)"
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/gateway.py needs root (the lab cluster does)", file=sys.stderr)
        return 2
    setup = Setup.make(args.smoke)
    out = args.out or BENCH / ("results-gateway-smoke.md" if args.smoke else "results-gateway.md")
    tmp = Path(tempfile.mkdtemp(prefix="afsm-gwb-", dir="/tmp"))  # short: ssh control sockets
    tmp.chmod(0o711)
    try:
        with session_bench.signals_as_interrupt():
            lab = bring_up_lab()
            with lab_lock(lab.root):
                print(f"lab lock held; tool: {' '.join(tool_argv())}; temp {tmp}", flush=True)
                session_bench.clear_stale_jobs(lab)
                results = GatewayBench(lab, setup, tmp).run()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up; no report written", file=sys.stderr)
        return 130
    except Exception as exc:  # the benchmark (or the lab), not the gateway
        traceback.print_exc()
        print(f"bench/gateway.py could not run: {exc!r}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = rows(results)
    print("\n" + render_table(table))
    out.write_text(render_markdown(results, table) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if results.failures:
        print("gateway failures:\n  " + "\n  ".join(results.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
