"""Driving one session through the machine: submit, wait, tunnel, stream, clean.

``Runner.drive`` looks up the step for the current state (``STEPS``) and runs
it until the session is tunneled (and, unless detached, streams logs until
the user stops it) or has failed. ``start`` and ``resume`` are the same
loop entered at different states. Any exception, Ctrl+C, SIGTERM or SIGHUP
ends in ``cleanup``: scancel, close the tunnel and the shared connection,
state ``cleaned``. Nothing here prints: the reporter does."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alvis_fsm import rundir, slurm
from alvis_fsm.errors import (
    AlvisError,
    Interrupted,
    SchedulerError,
    ServerError,
    SessionError,
    SSHError,
)
from alvis_fsm.machine import Session, State, build_machine
from alvis_fsm.remote import Agent, parse_log_line
from alvis_fsm.ssh import Connection, SSHOptions, control_path
from alvis_fsm.store import SessionRecord, Store
from alvis_fsm.tunnel import Tunnel, parse_address, verify

if TYPE_CHECKING:  # settings imports pydantic; the Runner only reads it
    from alvis_fsm.settings import Settings


class Reporter(Protocol):
    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def result(self, message: str) -> None: ...
    def command(self, text: str) -> None: ...
    def log_line(self, stream: str, line: str) -> None: ...
    def waiting(self, text: str, since: float | None = None) -> None: ...
    def interrupted(self) -> None: ...
    def done_waiting(self) -> None: ...
    def interactive(self) -> bool: ...
    def ask(self, prompt: str, secret: bool = False) -> str: ...
    def connected(
        self, record: SessionRecord, models: list[str], first_token_s: float | None = None
    ) -> None: ...


# Route login needs vLLM on a TCP port of the node, where vLLM's key guards
# only /v1: say so before anything is submitted.
LOGIN_ROUTE_WARNING = (
    "Route login: vLLM listens on a TCP port of the compute node; its paths outside /v1 "
    "(/invocations, /tokenize, /metrics) answer any cluster user without the API key "
    "(route jump does not expose them)."
)


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def ssh_options(settings: Settings) -> SSHOptions:
    s = settings.ssh
    return SSHOptions(
        host=s.host,
        user=s.user,
        config_file=s.config_file,
        connect_timeout=int(s.connect_timeout),
        keepalive_interval=int(s.keepalive_interval),
        keepalive_count=int(s.keepalive_count),
        reconnect_window=float(s.reconnect_window),
    )


def new_api_key() -> str:
    return "afsm-" + secrets.token_urlsafe(32)


# -- signals ------------------------------------------------------------------
class _Signalled(BaseException):
    """SIGTERM/SIGHUP turned into an exception in the main thread."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signal(signum: int, frame: Any) -> None:
    raise _Signalled(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (terminal closed) stop the session like Ctrl+C does."""
    old = {s: signal.signal(s, _raise_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def shielded() -> Iterator[list[int]]:
    """While cleaning up, a second Ctrl+C (or SIGTERM) must not skip the scancel:
    signals are noted, not acted on."""
    seen: list[int] = []

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield seen
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class Detached(Exception):
    """Not an error: ``--detach`` returns once the session is tunneled."""


class Runner:
    def __init__(
        self,
        settings: Settings,
        record: SessionRecord,
        store: Store,
        ui: Reporter,
        *,
        detach: bool = False,
        readonly: bool = False,
    ) -> None:
        self.readonly = readonly
        self.settings = settings
        self.record = record
        self.store = store
        self.ui = ui
        self.detach = detach
        store.ensure()
        if not record.control_path:
            record.control_path = str(
                control_path(store.dir, f"{store.dir.resolve()}|{record.name}@{settings.ssh.host}")
            )
            record.tunnel_control_path = record.control_path + ".t"
        self.conn = Connection(ssh_options(settings), Path(record.control_path), ui)
        self.agent = Agent(self.conn)
        self.model = Session()
        self.model.on_change = self._on_change
        timeouts = settings.timeouts.model_dump()
        spent = 0.0
        if record.state in record.entered_at:
            spent = max(0.0, time.time() - record.entered_at[record.state])
        self.machine = build_machine(
            self.model, settings.machine, timeouts, initial=record.state, already_spent=spent
        )
        self.model.entered_at.update(record.entered_at)
        self.tunnel: Tunnel | None = None
        self._stream: subprocess.Popen[bytes] | None = None
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()
        self._reader: threading.Thread | None = None
        self.sbatch_args = []
        self._streaming = False

    # -- state --------------------------------------------------------------
    @property
    def state(self) -> State:
        return State(self.model.state)

    def _on_change(self, state: State) -> None:
        self.record.state = str(state)
        self.record.history.append([str(state), now_iso()])
        self.record.entered_at[str(state)] = time.time()
        self._save()

    def _save(self) -> None:
        if not self.readonly:
            self.store.save(self.record)

    def _fire(self, trigger: str) -> None:
        getattr(self.model, trigger)()

    def _remaining(self) -> float:
        """Seconds left before the current state's timeout (inf if none)."""
        name = str(self.state)
        sdef = self.settings.machine.states.get(name)
        if sdef is None or not sdef.timeout:
            return float("inf")
        limit = float(getattr(self.settings.timeouts, sdef.timeout))
        entered = self.model.entered_at.get(name, time.time())
        return limit - (time.time() - entered)

    def _timed_out(self) -> bool:
        # The Timeout feature's timer (timeout_pending) or, for a state
        # restored by resume, the time since it was first entered.
        return self.model.timeout_pending() or self._remaining() <= 0

    # -- the loop -------------------------------------------------------------
    def drive(self) -> None:
        """Run the session from its current state. Cleans up on any failure or
        signal; returns normally only when detached or stopped by the user."""
        steps: dict[State, Callable[[], None]] = {
            State.IDLE: self.submit,
            State.SUBMITTED: self.wait_running,
            State.RUNNING: self.wait_ready,
            State.SERVING: self.connect,
            State.TUNNELED: self.serve,
        }
        try:
            self.record.client_pid = os.getpid()
            self._save()
            with stop_signals():
                self.conn.open()
                if self.state is State.TUNNELED:
                    # Picked up by resume: the tunnel is not ours until it is
                    # found (or reopened) and verified again.
                    self._fire("disconnect")
                while self.state in steps:
                    steps[self.state]()
        except Detached:
            self.record.detached = True
            self.record.client_pid = 0
            self._save()
            return
        except _GiveUp:
            # The network is gone, not the job: keep it, so `resume` can reattach.
            self._stop_stream()
            if self.tunnel is not None:
                self.tunnel.close()
            self.record.client_pid = 0
            self._save()
            raise
        except KeyboardInterrupt:
            self.ui.interrupted()
            # Ctrl+C while streaming is how a session normally ends (exit 0);
            # before that it interrupts the start-up (exit 130).
            was_serving = self._streaming
            self.cleanup("stopped with Ctrl+C" if was_serving else "interrupted")
            if was_serving:
                return
            raise Interrupted(
                f"Interrupted; cleaned up job {self.record.job_id or '(none)'}"
            ) from None
        except _Signalled as sig:
            self.cleanup(f"signal {signal.Signals(sig.signum).name}")
            raise Interrupted(
                f"Stopped by {signal.Signals(sig.signum).name}; cleaned up job {self.record.job_id or '(none)'}"
            ) from None
        except AlvisError as exc:
            if self.state not in (State.FAILED, State.CLEANED):
                # Even if saving the new state fails, cleanup must still run.
                with contextlib.suppress(Exception):
                    self._fire("fail")
            self.record.end_reason = exc.message
            self.cleanup(exc.message)
            raise
        except BaseException:
            self.cleanup("internal error")
            raise

    # -- steps ----------------------------------------------------------------
    # Set by the caller (start): render(absolute run dir) -> job script text.
    render: Callable[[str], str]
    sbatch_args: list[str]

    def submit(self) -> None:
        r = self.record
        if r.route == "login":
            self.ui.warn(LOGIN_ROUTE_WARNING)
        self.ui.info(f"Submitting job (duration: {r.time_limit})...")
        # The job script expands a "~/" run dir itself, on the cluster.
        script = self.render(r.run_dir)
        key = r.api_key or None
        self._fire("submit")  # from here on, cleanup cancels by job name too
        try:
            r.run_dir, r.job_id = self.agent.submit(r.run_dir, key, script, self.sbatch_args)
        except SSHError:
            # The connection broke during sbatch: the job may or may not be
            # queued. Look for it by its unique name before trying again, so a
            # session never owns two jobs.
            self.conn.reopen()
            found = self.agent.find(r.job_name)
            if found:
                r.job_id = found
            else:
                r.run_dir, r.job_id = self.agent.submit(r.run_dir, key, script, self.sbatch_args)
        self._save()
        self.ui.result(f"Job submitted: {r.job_id}")
        self.ui.info("Waiting for job to start...")

    def _slice(self, since: float) -> float:
        p = self.settings.polling
        interval = p.scheduler_interval
        if time.monotonic() - since > p.scheduler_backoff_after:
            interval = p.scheduler_backoff_interval
        return max(0.2, min(interval, self._remaining()))

    def wait_running(self) -> None:
        r = self.record
        since = time.monotonic()
        entered = self.model.entered_at.get("submitted", time.time())
        while True:
            if self._timed_out():
                self._fire("timeout")
                limit = self._limit("submitted")
                raise SchedulerError(
                    f"Job {r.job_id} did not start within {limit:.0f} s",
                    hint="The queue is busy: try a shorter -t, fewer GPUs, or raise timeouts.job_start.",
                )
            ev = self.agent.wait_start(
                r.run_dir, r.job_id, self._slice(since), self.settings.polling.file_interval
            )
            if ev.kind == "STARTED":
                host = ev.value.split()[0] if ev.value.split() else ""
                r.node = host
                r.running_since = time.time()
                self.ui.done_waiting()
                self._fire("start")
                self.ui.info(f"Job is running on node: {host}")
                self.ui.info("Waiting for server address...")
                return
            job = ev.job
            if job is not None and job.known and job.state.ended:
                self.ui.done_waiting()
                raise SchedulerError(
                    f"Job {r.job_id} ended before it started: {job.state}"
                    + (f" ({job.reason})" if job.reason else ""),
                    hint=f"See {r.run_dir}/{rundir.SLURM_OUTPUT.replace('%j', r.job_id)} on the login node.",
                )
            if job is not None and job.source == "none" and time.time() - entered > 30:
                raise SchedulerError(f"Job {r.job_id} is unknown to the scheduler")
            text = f"Waiting for job {r.job_id} to start"
            if job is not None and job.state is slurm.JobState.PENDING:
                text += " — " + slurm.describe_reason(job.reason, self.settings.slurm.gpus)
                if job.start:
                    text += f", expected start {job.start.replace('T', ' ')[:16]} (cluster time)"
            self.ui.waiting(text, since=entered)

    def _limit(self, state: str) -> float:
        sdef = self.settings.machine.states.get(state)
        return (
            float(getattr(self.settings.timeouts, sdef.timeout)) if sdef and sdef.timeout else 0.0
        )

    def wait_ready(self) -> None:
        r = self.record
        entered = self.model.entered_at.get("running", time.time())
        while True:
            if self._timed_out():
                self._fire("timeout")
                raise ServerError(
                    f"vLLM did not start within {self._limit('running'):.0f} s",
                    hint="Raise timeouts.server_ready for a large model, or check the log above.",
                    details="\n".join(self._tail_err(20)) or None,
                )
            ev = self.agent.wait_ready(
                r.run_dir,
                r.job_id,
                min(5.0, max(0.2, self._remaining())),
                self.settings.polling.file_interval,
                address_known=bool(r.port or r.remote_socket),
            )
            if ev.kind in ("ADDRESS", "READY") and not (r.port or r.remote_socket):
                address = parse_address(ev.value)
                r.node = address.host or r.node
                r.port, r.remote_socket = address.port, address.socket
                self._save()
                self.ui.done_waiting()
                self.ui.info(f"Server address: {ev.value}")
            if ev.kind in ("ADDRESS", "READY") and self.tunnel is None:
                # Open the tunnel while vLLM is still loading: the node's
                # login and the forward are then off the critical path.
                self._open_tunnel()
            if ev.kind == "READY":
                self.ui.done_waiting()
                self._fire("ready")
                return
            if ev.kind == "ADDRESS":
                continue
            if ev.kind == "EXITED":
                self.ui.done_waiting()
                raise self._crash(f"vLLM exited with status {ev.value} before it was ready")
            if ev.kind == "ENDED":
                self.ui.done_waiting()
                raise self._crash(f"The job stopped before vLLM was ready ({ev.value})")
            if ev.job is not None and ev.job.known and ev.job.state.ended:
                self.ui.done_waiting()
                raise self._crash(f"Job {r.job_id} ended ({ev.job.state}) before vLLM was ready")
            self.ui.waiting(f"Waiting for vLLM to load {r.model} on {r.node}", since=entered)

    def _tail_err(self, n: int) -> list[str]:
        try:
            return [
                slurm.strip_ansi(t)
                for s, t in self.agent.tail(self.record.run_dir, n)
                if s == "err"
            ]
        except AlvisError:
            return []

    def _crash(self, message: str) -> ServerError:
        lines = self._tail_err(60)
        cause = slurm.root_cause(lines)
        return ServerError(
            message,
            hint=f"Full logs: `alvis-fsm logs {self.record.name}` or {self.record.run_dir}/vllm.err on the login node.",
            details="\n".join(cause) or None,
        )

    def _open_tunnel(self) -> None:
        r = self.record
        self.tunnel = Tunnel(
            conn=self.conn,
            route=r.route,
            bind=r.bind,
            local_port=r.local_port,
            node=r.node,
            remote_port=r.port,
            control=Path(r.tunnel_control_path),
            remote_socket=r.remote_socket,
        )
        # A tunnel left by a detached or killed client may still be up.
        if not self.tunnel.up():
            self.ui.info(f"Establishing SSH tunnel (local port {r.local_port})...")
            said = self.tunnel.open()
            if "Permanently added" in said:
                self.ui.info(
                    f"Accepted the host key of {r.node} (first connection) and recorded it"
                )

    def connect(self) -> None:
        r = self.record
        if self.tunnel is None:
            self._open_tunnel()
        self.ui.info("Testing connection...")
        seen = verify(
            r.local_port, r.api_key or None, self.settings.timeouts.connection_test, r.served_name
        )
        self._fire("connect")
        self.ui.connected(r, seen.models, seen.first_token_s)

    def serve(self) -> None:
        """Tunneled: stream logs, keep the tunnel up, notice a crash."""
        r = self.record
        if self.detach:
            raise Detached()
        self.ui.info("Streaming logs (Ctrl+C to stop and cleanup)...")
        # From here Ctrl+C is the normal way out, even mid-reconnect.
        self._streaming = True
        lines = 50
        failures = 0
        backoff = 0.5
        while True:
            if self._stream is None or self._stream.poll() is not None:
                if self._stream is not None and not self.conn.alive():
                    # The shared connection dropped (the stream was a channel
                    # on it): reopen it; the job is untouched.
                    self.ui.warn("Lost the connection to the login node; reconnecting...")
                    self._reopen_or_give_up()
                self._start_stream(lines)
                lines = 0  # after a reconnect, only what is new
            try:
                kind, value = self._events.get(timeout=0.5)
            except queue.Empty:
                kind, value = "", ""
            if kind == "EXITED":
                raise self._crash(f"vLLM exited with status {value}")
            if kind == "ENDED":
                raise self._crash(f"The job stopped ({value})")
            if kind == "GONE":
                raise SchedulerError(f"Job {r.job_id} is no longer running ({value})")
            assert self.tunnel is not None
            if not self.tunnel.alive():
                self._fire("disconnect")
                self.ui.warn("The tunnel dropped; reconnecting (the job is untouched)...")
                while True:
                    if not self.conn.alive():
                        # The shared connection (the tunnel's jump) is gone too:
                        # wait for the login node as long as ssh.reconnect_window
                        # says, as everywhere else, not max_reconnects tries.
                        self._reopen_or_give_up()
                    try:
                        self.tunnel.open()
                        verify(
                            r.local_port,
                            r.api_key or None,
                            self.settings.timeouts.connection_test,
                            r.served_name,
                        )
                        break
                    except AlvisError as exc:
                        failures += 1
                        if failures >= self.settings.tunnel.max_reconnects:
                            raise self._give_up(
                                f"Could not reopen the tunnel after {failures} tries", exc.message
                            ) from exc
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 10)
                self._fire("connect")
                self.ui.info(f"Tunnel back up: http://localhost:{r.local_port}")
                failures, backoff = 0, 0.5

    def _reopen_or_give_up(self) -> None:
        """Reopen the shared connection (within ssh.reconnect_window); if the
        login node stays unreachable, stop the client but keep the job."""
        try:
            self.conn.reopen()
        except SSHError as exc:
            raise self._give_up(
                f"Could not reach {self.conn.opts.host} again", exc.details
            ) from exc

    def _give_up(self, what: str, details: str | None) -> _GiveUp:
        r = self.record
        return _GiveUp(
            f"{what}; job {r.job_id} is still running",
            hint=f"`alvis-fsm resume {r.name}` reconnects; `alvis-fsm stop {r.name}` cancels it.",
            details=details,
        )

    def _start_stream(self, lines: int) -> None:
        self._stop_stream()
        proc = self.agent.stream(self.record.run_dir, self.record.job_id, lines)
        self._stream = proc

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line[:2] in ("O|", "E|"):
                    stream, text = parse_log_line(line)
                    self.ui.log_line(stream, slurm.strip_ansi(text))
                elif "|" in line:
                    head, _, rest = line.partition("|")
                    if head in ("EXITED", "ENDED", "GONE"):
                        self._events.put((head, rest))

        self._reader = threading.Thread(target=read, name="log-reader", daemon=True)
        self._reader.start()

    def _stop_stream(self) -> None:
        proc = self._stream
        self._stream = None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()  # the remote side stops on EOF
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)

    # -- for resume, stop, logs, status -------------------------------------------
    def still_alive(self) -> bool:
        """Ask the scheduler; if the job is gone, say how it ended and mark the
        session cleaned (nothing to cancel)."""
        r = self.record
        job = self.agent.jobinfo(r.job_id)
        if job.known and not job.state.ended:
            return True
        code = job.exit_code if job.exit_code not in ("", "0:0") else ""
        how = f"{job.state}" + (f", exit code {code}" if code else "")
        if not job.known:
            how = "no longer known to the scheduler"
        self.ui.info(f"Job {r.job_id} has ended ({how}); nothing to cancel")
        self._close_local()
        r.end_reason = f"job ended: {how}"
        if self.state is not State.CLEANED:
            self._fire("clean")
        r.client_pid = 0
        self._save()
        self.model_stop()
        return False

    def stop(self) -> None:
        r = self.record
        self.conn.open()
        if r.job_id and not self.still_alive():
            return
        self.cleanup("stopped by the user")

    def show_logs(self, lines: int, follow: bool) -> None:
        r = self.record
        if not r.run_dir or r.state == "idle":
            raise SessionError(f"Session '{r.name}' has no job yet, so no logs")
        opened = not self.conn.alive()
        self.conn.open()
        try:
            if not follow:
                for stream, text in self.agent.tail(r.run_dir, lines):
                    self.ui.log_line(stream, slurm.strip_ansi(text))
                return
            self._start_stream(lines)
            while True:
                try:
                    kind, value = self._events.get(timeout=0.5)
                except queue.Empty:
                    if self._stream is not None and self._stream.poll() is not None:
                        break
                    continue
                self.ui.info(
                    {
                        "EXITED": f"vLLM exited with status {value}",
                        "ENDED": f"The job stopped ({value})",
                        "GONE": f"Job {r.job_id} is no longer running ({value})",
                    }.get(kind, kind)
                )
                break
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_stream()
            if opened:
                self.conn.close()

    # -- cleanup --------------------------------------------------------------
    def cleanup(self, why: str) -> None:
        """scancel, close tunnel and connection, state cleaned. Idempotent, and
        shielded from further signals so a second Ctrl+C cannot skip it."""
        r = self.record
        with shielded():
            self.ui.done_waiting()
            self._stop_stream()
            if r.job_id or (r.job_name and self.state is not State.IDLE):
                self.ui.info(f"Cancelling job {r.job_id or r.job_name}...")
                try:
                    self.conn.open()
                    self.agent.cancel(r.job_id, r.job_name)
                except AlvisError as exc:
                    r.end_reason = why
                    self._save()
                    self._close_local()
                    raise SessionError(
                        f"Could not cancel job {r.job_id or r.job_name}: {exc.message}",
                        hint=f"The job may still be running: `alvis-fsm stop {r.name}` retries, "
                        "or run scancel on the login node.",
                        details=exc.details,
                    ) from exc
            self._close_local()
            if self.state is not State.CLEANED:
                r.end_reason = r.end_reason or why
                self._fire("clean")
            self.model_stop()
            r.client_pid = 0
            self._save()
            self.ui.info(f"Cleaned up job {r.job_id or '(none submitted)'} successfully")

    def model_stop(self) -> None:
        stop = getattr(self.model, "stop_timers", None) or getattr(
            self.machine, "stop_timers", None
        )
        if callable(stop):
            stop()

    def _close_local(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        elif self.record.tunnel_control_path:
            from alvis_fsm.tunnel import close_tunnel_socket

            close_tunnel_socket(self.conn, Path(self.record.tunnel_control_path), self.record.node)
        self.conn.close()


class _GiveUp(SSHError):
    """Tunnel could not be reopened: keep the job (not a failure of the job)."""
