"""One session's life: the steps the machine runs, and the way out.

The machine (engine/machine.py, declared in ``[machine]``) drives: each live
state names its step as ``on_enter`` — ``await_start`` (submit, then wait
for a node), ``await_server`` (wait for vLLM), ``connect`` (open and verify
the tunnel), ``serve`` (stream logs, watch job and tunnel). A step fires the
next trigger when its state is done and returns; the queued machine then
enters the next state and runs its step. ``Runner.drive`` enters the machine
(``submit`` for a new session, ``resume`` for one picked up again) and turns
every way out into what it means for the job (``_finish``): detached,
released to another client, the network lost (job kept), or ``cleanup``
(scancel, confirmed; tunnel and connection closed; state ``cleaned``).

No terminal here: no printing (the observer, engine/observer.py, hears
every event and a front renders it), no prompts (passphrases go through the
observer's ``ask``), no signal handlers (the terminal front owns them,
fronts/signals.py, and passes a ``shield`` for cleanup), no module-level
state. So a front can run many sessions in threads of one process and stop
each with ``request_stop``; each Runner has its own machine, connection,
log reader thread and stop event."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from alvis_fsm.cluster import rundir, slurm
from alvis_fsm.cluster.agent import Agent, Event, parse_log_line
from alvis_fsm.cluster.ssh import Connection, SSHOptions, control_path
from alvis_fsm.cluster.tunnel import Tunnel, TunnelDied, Verified, parse_address, verify
from alvis_fsm.engine import loadtimes
from alvis_fsm.engine.durations import fmt_duration
from alvis_fsm.engine.machine import Session, build_machine
from alvis_fsm.engine.observer import Observer
from alvis_fsm.engine.states import LIVE_STATES, State
from alvis_fsm.engine.store import SessionRecord, Store
from alvis_fsm.errors import (
    AlvisError,
    CancelUnconfirmed,
    ConnectionLost,
    Interrupted,
    SchedulerError,
    ServerError,
    SessionError,
    SSHError,
    StopRequested,
)
from alvis_fsm.retry import Backoff
from alvis_fsm.text import inert_line

if TYPE_CHECKING:  # settings imports pydantic; the Runner only reads it
    from alvis_fsm.engine.settings import Settings


# Route login needs vLLM on a TCP port of the node that every cluster user
# can connect to; only the key (the guard asks for it on every path, see
# cluster/guard.py) keeps them out: say so before anything is submitted.
LOGIN_ROUTE_WARNING = (
    "Route login: vLLM listens on a TCP port of the compute node that any cluster user can "
    "connect to; only the API key keeps them out (asked on every path, /invocations, /tokenize "
    "and /metrics included; route jump opens no port)."
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


class Detached(Exception):
    """Not an error: ``--detach`` returns once the session is tunneled."""


# How long a supervisor asks the scheduler to confirm that its job ended.
END_CONFIRM_S = 30.0


class Release(BaseException):
    """The client lets go of the session and leaves job, tunnel and state as
    they are: a background supervisor handing a detached session over (to
    `resume` or `stop`). Raised with the event's kind when its job ends: the
    supervisor then records the end the scheduler confirms and closes the
    tunnel (``_confirm_end``), else leaves it to `status`."""


class Runner:
    def __init__(
        self,
        settings: Settings,
        record: SessionRecord,
        store: Store,
        ui: Observer,
        *,
        detach: bool = False,
        readonly: bool = False,
        conn: Connection | None = None,
        agent: Agent | None = None,
        tunnel_factory: Callable[..., Tunnel] | None = None,
        verifier: Callable[..., Verified] | None = None,
        supervised: bool = False,
        job_script: Callable[[str], str] | None = None,
        sbatch_args: Sequence[str] = (),
        shield: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self.readonly = readonly
        # A background supervisor of a detached session (commands/supervise):
        # it keeps the tunnel up with the same loop as a foreground client,
        # but lets go (Release) instead of cancelling when the job ends or
        # when it is asked to stop: `stop`, `resume` and `status` decide.
        self.supervised = supervised
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
        # The cluster side can be handed in (unit tests drive the session with
        # a fake agent object); by default it is OpenSSH and agent.sh.
        self.conn = conn or self._connection(settings, record, store, ui)
        self.agent = agent or Agent(self.conn)
        self._tunnel_factory: Callable[..., Tunnel] = tunnel_factory or Tunnel
        self._verify = verifier or verify
        # The newest age of the current state on the cluster's clock, and when
        # (client monotonic time) we learnt it: see _cluster_age.
        self._age: tuple[str, float, float] | None = None
        self._stream_since = 0.0
        self._stream_dead = False
        self._load_times = loadtimes.LoadTimes(store.dir)
        self._last_unknown_note = 0.0
        self.model = Session()
        self.model.on_change = self._on_change
        # The behaviour of each state, attached to the machine (``on_enter``
        # in [machine]); see engine/machine.py.
        self.machine = build_machine(
            self.model,
            settings.machine,
            settings.timeouts.model_dump(),
            initial=record.state,
            steps={
                "await_start": self.await_start,
                "await_server": self.await_server,
                "connect": self.connect,
                "serve": self.serve,
            },
        )
        self.model.entered_at.update(record.entered_at)
        # A front holding many sessions stops one with request_stop (no signals).
        self._stop = threading.Event()
        self._stop_reason = ""
        # Which trigger an error means when it ends the session ("timeout" or
        # "fail"): an error raised inside a step clears the machine's queue,
        # so the trigger is fired by _finish.
        self._failure = "fail"
        self._new = False  # entered `submitted` from idle in this process: submit
        self._reconnecting = False
        self._back_up = False
        self._arrived = False
        self._verified: Verified | None = None
        self._announced = False
        self._said_streaming = False
        self._stream_lines = 50
        self._warned: set[float] = set()
        self._restarts = Backoff(first=0.5, most=60.0, immediate=True, healthy=30.0)
        self.tunnel: Tunnel | None = None
        self._stream: subprocess.Popen[bytes] | None = None
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()
        self._reader: threading.Thread | None = None
        # The job to submit: the job script for an (absolute) run directory,
        # and extra sbatch arguments. Only a session still idle needs them.
        self.render = job_script or _no_job_script
        self.sbatch_args = list(sbatch_args)
        # While cleaning up, the front may hold off its own stop signals
        # (a second Ctrl+C must not skip the scancel); the engine itself
        # never touches signals, so it can run in any thread.
        self._shield = shield
        self._streaming = False

    def _connection(
        self, settings: Settings, record: SessionRecord, store: Store, ui: Observer
    ) -> Connection:
        """The session's shared connection. A read-only look (status, logs)
        reuses it when it is up but never opens or closes it: another client
        may be driving the session through it, and closing a master we
        opened while that client reconnects would cut it off. When it is
        down, a look opens a private one of its own and closes that."""
        shared = Connection(ssh_options(settings), Path(record.control_path), ui)
        if not self.readonly or shared.alive():
            return shared
        private = control_path(
            store.dir, f"{store.dir.resolve()}|{record.name}@{settings.ssh.host}|look|{os.getpid()}"
        )
        return Connection(ssh_options(settings), private, ui)

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

    def _limit(self, state: str) -> float:
        sdef = self.settings.machine.states.get(state)
        return (
            float(getattr(self.settings.timeouts, sdef.timeout)) if sdef and sdef.timeout else 0.0
        )

    def _note_age(self, ev: Event) -> None:
        if ev.age is not None:
            self._age = (str(self.state), ev.age, time.monotonic())

    def _cluster_age(self) -> float:
        """How long the current state has lasted, judged by the cluster: the
        agent's AGE (from the run directory's files, on the login node's
        clock) plus the time since we heard it. Before the first AGE, the
        wall-clock time since the state was entered (kept in the record)."""
        name = str(self.state)
        if self._age is not None and self._age[0] == name:
            return self._age[1] + (time.monotonic() - self._age[2])
        return time.time() - self.model.entered_at.get(name, time.time())

    def _remaining(self) -> float:
        """Seconds left before the current state's timeout (inf if none)."""
        limit = self._limit(str(self.state))
        return limit - self._cluster_age() if limit else float("inf")

    def _timed_out(self, ev: Event) -> bool:
        """Judged by the cluster's facts only, and only after asking it: a
        client that slept or was suspended learns first what happened while
        it was away, so its absence never counts against the job."""
        limit = self._limit(str(self.state))
        if not limit:
            return False
        if ev.age is not None:
            return ev.age >= limit
        # The agent could not date the state (its file is missing): fall back
        # to the time recorded when the state was entered, so a wait still ends.
        return self._cluster_age() >= limit

    # -- the loop -------------------------------------------------------------
    def drive(self) -> None:
        """Run the session from its current state. Cleans up on any failure or
        signal; returns normally only when detached or stopped by the user.
        A lost network never cleans up: the job is kept for `resume`."""
        self.record.client_pid = os.getpid()
        self._save()
        # The front's stop signals stay turned into exceptions until the
        # handler below has shielded itself: no window where a signal's
        # default action could end the process between a failure and its scancel.
        try:
            self._run_steps()
        except BaseException as exc:
            with self._shield():
                self._finish(exc)

    def _run_steps(self) -> None:
        """Enter the machine: the states' steps do the rest (queued: each
        step fires the next trigger and returns, the machine runs the next)."""
        self.conn.open()
        state = self.state
        if state is State.IDLE:
            self._new = True
            self._fire("submit")
        elif state is State.TUNNELED and not (self.supervised and self._adopt_tunnel()):
            # Picked up by resume: the tunnel is not ours until it is
            # found (or reopened) and verified again.
            self._fire("disconnect")
        elif state in LIVE_STATES:
            self._fire("resume")

    def request_stop(self, reason: str = "stopped") -> None:
        """Ask a session driven in another thread to stop and clean up, as
        Ctrl+C does in a terminal: its step notices within a second or so
        (the current scheduler query or log poll ends first)."""
        self._stop_reason = reason
        self._stop.set()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise StopRequested(self._stop_reason or "stopped")

    def _pause(self, seconds: float) -> None:
        """Sleep, unless a stop is requested meanwhile."""
        if self._stop.wait(seconds):
            self._check_stop()

    def _timeout(self, exc: AlvisError) -> AlvisError:
        """The error of a state that lasted longer than its timeout."""
        self._failure = "timeout"
        return exc

    def _finish(self, exc: BaseException) -> None:
        """What each way out of the loop means for the job."""
        r = self.record
        if isinstance(exc, _LimitReached):
            self._limit_reached()
            return
        if isinstance(exc, Detached):
            self.record.detached = True
            self.record.client_pid = 0
            self._save()
            return
        if isinstance(exc, Release) or (
            # A supervisor never ends a job: asked to stop, or failing, it
            # lets go, and `stop`, `resume` and `status` decide.
            self.supervised and isinstance(exc, (StopRequested, AlvisError))
            and not isinstance(exc, ConnectionLost)
        ):
            self._stop_stream()
            if isinstance(exc, Release) and exc.args and self._confirm_end():
                return  # ended, recorded, tunnel and connection closed
            r.client_pid = 0
            self._save()
            return
        if isinstance(exc, ConnectionLost) and self.state is not State.IDLE:
            # The network is gone, not the job: keep job and state so that
            # `resume` can reattach. Nothing remote can be done now anyway.
            self._stop_stream()
            if self.tunnel is not None:
                self.tunnel.close()
            r.client_pid = 0
            self._save()
            if isinstance(exc, _GiveUp):
                raise exc
            raise _GiveUp(
                f"{exc.message}; job {r.job_id or r.job_name} is kept ({self.state})",
                hint=f"`alvis-fsm resume {r.name}` reconnects once the network is back; "
                f"`alvis-fsm stop {r.name}` cancels the job.",
                details=exc.details,
            ) from exc
        if isinstance(exc, KeyboardInterrupt):
            self.ui.interrupted()
            # Ctrl+C while streaming is how a session normally ends (exit 0);
            # before that it interrupts the start-up (exit 130).
            was_serving = self._streaming
            self.cleanup("stopped with Ctrl+C" if was_serving else "interrupted")
            if was_serving:
                return
            raise Interrupted(f"Interrupted; cleaned up job {r.job_id or '(none)'}") from None
        if isinstance(exc, StopRequested):
            self.cleanup(exc.reason)
            raise Interrupted(
                f"Stopped by {exc.reason}; cleaned up job {r.job_id or '(none)'}"
            ) from None
        if isinstance(exc, AlvisError):
            if self.state not in (State.FAILED, State.CLEANED):
                # Even if saving the new state fails, cleanup must still run.
                with contextlib.suppress(Exception):
                    self._fire(self._failure)
            r.end_reason = exc.message
            self.cleanup(exc.message)
            raise exc
        self.cleanup("internal error")
        raise exc

    # -- steps ----------------------------------------------------------------

    def _submit_job(self) -> None:
        """sbatch, in state `submitted` already: from here on, cleanup cancels
        by job name too (an sbatch cut off mid-way may have queued a job)."""
        r = self.record
        if r.route == "login":
            self.ui.warn(LOGIN_ROUTE_WARNING)
        self.ui.info(f"Submitting job (duration: {r.time_limit})...")
        # The job script expands a "~/" run dir itself, on the cluster.
        script = self.render(r.run_dir)
        key = r.api_key or None
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

    def _unanswered(self, job: slurm.JobInfo | None) -> str:
        """Text for a scheduler that gave no state; also told once a minute as
        a warning, so a user knows why nothing moves and that the job is kept."""
        why = job.unanswered if job is not None else ""
        if why and time.monotonic() - self._last_unknown_note > 60:
            self._last_unknown_note = time.monotonic()
            self.ui.warn(
                f"The scheduler did not answer about job {self.record.job_id} ({why}); "
                "the job is kept, asking again"
            )
        return why

    def await_start(self) -> None:
        """Step of `submitted`: submit (a new session), then wait for a node."""
        r = self.record
        if self._new and not r.job_id:
            self._submit_job()
        elif not r.job_id:
            # Picked up without a job id (sbatch was cut off): never submit
            # twice; look for the job by its unique name.
            r.job_id = self.agent.find(r.job_name) or ""
            if not r.job_id:
                raise SessionError(f"Session '{r.name}' has no job on the cluster")
            self._save()
        since = time.monotonic()
        entered = self.model.entered_at.get(State.SUBMITTED, time.time())
        while True:
            self._check_stop()
            # Ask first, judge after: what happened on the cluster while this
            # client was away (asleep, suspended, offline) counts, not our clock.
            ev = self.agent.wait_start(
                r.run_dir, r.job_id, self._slice(since), self.settings.polling.file_interval
            )
            self._note_age(ev)
            if ev.kind == "STARTED":
                # "HOST JOBID EPOCH": the start on the cluster's clock, for
                # the time left (a client that slept must not misjudge it).
                words = ev.value.split()
                r.node = words[0] if words else ""
                r.queue_reason = r.expected_start = ""
                r.running_since = time.time()
                if len(words) >= 3 and words[2].isdigit():
                    r.running_since = float(words[2])
                self.ui.done_waiting()
                self._arrived = True  # announced by the next state's step
                self._fire("start")
                return
            job = ev.job
            if job is not None and job.ended:
                self.ui.done_waiting()
                raise SchedulerError(
                    f"Job {r.job_id} ended before it started: {job.state}"
                    + (f" ({job.reason})" if job.reason else ""),
                    hint=f"See {r.run_dir}/{rundir.SLURM_OUTPUT.replace('%j', r.job_id)} on the login node.",
                )
            if self._timed_out(ev):
                limit = self._limit(State.SUBMITTED)
                raise self._timeout(SchedulerError(
                    f"Job {r.job_id} did not start within {limit:.0f} s",
                    hint="The queue is busy: try a shorter -t, fewer GPUs, or raise timeouts.job_start.",
                ))
            text = f"Waiting for job {r.job_id} to start"
            why = self._unanswered(job)
            if why:
                text += f" — the scheduler is not answering ({why}); retrying"
            elif job is not None and job.state is slurm.JobState.PENDING:
                # Kept on the record (saved with its next change) for those
                # who show the queue without printing: the gateway's models.
                r.queue_reason = slurm.describe_reason(job.reason, self.settings.slurm.gpus)
                r.expected_start = job.start.replace("T", " ")[:16] if job.start else ""
                text += " — " + r.queue_reason
                if r.expected_start:
                    text += f", expected start {r.expected_start} (cluster time)"
            self.ui.waiting(text, since=entered)

    def await_server(self) -> None:
        """Step of `running`: wait for vLLM's address, then for it to be ready."""
        r = self.record
        if self._arrived:
            # Each step announces its own state, once the machine has entered
            # (and saved) it: what the user reads is what `status` shows.
            self._arrived = False
            self.ui.info(f"Job is running on node: {r.node}")
            self.ui.info("Waiting for server address...")
        entered = self.model.entered_at.get(State.RUNNING, time.time())
        while True:
            self._check_stop()
            ev = self.agent.wait_ready(
                r.run_dir,
                r.job_id,
                min(5.0, max(0.2, self._remaining())),
                self.settings.polling.file_interval,
                address_known=bool(r.port or r.remote_socket),
            )
            self._note_age(ev)
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
                if r.running_since:
                    # For the next start's estimate (and the gateway's rollover lead).
                    self._load_times.add(r.model, r.gpus, time.time() - r.running_since)
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
            if ev.job is not None and ev.job.ended:
                self.ui.done_waiting()
                raise self._crash(f"Job {r.job_id} ended ({ev.job.state}) before vLLM was ready")
            if self._timed_out(ev):
                raise self._timeout(ServerError(
                    f"vLLM did not start within {self._limit(State.RUNNING):.0f} s",
                    hint="Raise timeouts.server_ready for a large model, or check the log above.",
                    details="\n".join(self._tail_err(20)) or None,
                ))
            self._unanswered(ev.job)
            eta = loadtimes.describe(self._load_times.expected(r.model, r.gpus))
            self.ui.waiting(
                f"Waiting for vLLM to load {r.model} on {r.node}" + (f" — {eta}" if eta else ""),
                since=entered,
            )

    def _tail_err(self, n: int) -> list[str]:
        try:
            return [
                inert_line(t)
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

    def _adopt_tunnel(self) -> bool:
        """A supervisor taking over a detached session keeps it `tunneled`
        when the tunnel its starter left is up: no needless re-verification
        while `status` may be looking."""
        self.tunnel = self._make_tunnel()
        return self.tunnel.up()

    def _make_tunnel(self) -> Tunnel:
        r = self.record
        return self._tunnel_factory(
            conn=self.conn,
            route=r.route,
            bind=r.bind,
            local_port=r.local_port,
            node=r.node,
            remote_port=r.port,
            control=Path(r.tunnel_control_path),
            remote_socket=r.remote_socket,
            local_socket=r.local_socket,
        )

    def _open_tunnel(self) -> None:
        r = self.record
        self.tunnel = self._make_tunnel()
        # A tunnel left by a detached or killed client may still be up.
        if not self.tunnel.up():
            where = f"local socket {r.local_socket}" if r.local_socket else f"local port {r.local_port}"
            self.ui.info(f"Establishing SSH tunnel ({where})...")
            said = self.tunnel.open()
            if "Permanently added" in said:
                self.ui.info(
                    f"Accepted the host key of {r.node} (first connection) and recorded it"
                )

    def connect(self) -> None:
        """Step of `serving`: open the tunnel and verify the server through it;
        after a drop (from `tunneled`), the same with retries. The banner is
        shown by `serve`, once `tunneled` is saved."""
        self._check_stop()
        r = self.record
        if self._reconnecting:
            self._reconnect()
            self._reconnecting = False
            self._back_up = True
            self._fire("connect")
            return
        if self.tunnel is None:
            self._open_tunnel()
        assert self.tunnel is not None
        self.ui.info("Testing connection...")
        self._verified = self._verify(
            r.local_port, r.api_key or None, self.settings.timeouts.connection_test, r.served_name,
            local_socket=r.local_socket, alive=self.tunnel.alive,
        )
        self._fire("connect")

    def _announce(self) -> None:
        """The ready banner, once per client; later verifications say less."""
        r = self.record
        seen, self._verified = self._verified, None
        if seen is None:
            return
        if self._announced:
            self.ui.info(f"Tunnel back up: {r.url}")
            return
        self._announced = True
        self.ui.connected(r, seen.models, seen.first_token_s)
        left = self.record.time_left()
        if left is not None:
            self.ui.info(
                f"Time left: {fmt_duration(left)} (job {r.job_id} ends at "
                f"{time.strftime('%H:%M', time.localtime(time.time() + left))})"
            )

    def _reconnect(self) -> None:
        """Reopen a dropped tunnel (and, if it went too, the shared connection),
        at most tunnel.max_reconnects tries, backing off between them."""
        r = self.record
        tries = Backoff(first=0.5, most=10.0)
        redropped = False
        while True:
            self._check_stop()
            if not self.conn.alive():
                # The shared connection (the tunnel's jump) is gone too:
                # wait for the login node as long as ssh.reconnect_window
                # says, as everywhere else, not max_reconnects tries.
                self._reopen_or_give_up()
            try:
                assert self.tunnel is not None
                self.tunnel.open()
                # The tunnel's own check too: if its new ssh dies while
                # the server is being checked, that is noticed at once and
                # the next try starts (not the connection test's deadline).
                self._verify(
                    r.local_port,
                    r.api_key or None,
                    self.settings.timeouts.connection_test,
                    r.served_name,
                    local_socket=r.local_socket,
                    alive=self.tunnel.alive,
                )
                return
            except AlvisError as exc:
                again = isinstance(exc, TunnelDied)
                if again:
                    # A drop during recovery is a drop: say so, and reopen.
                    self.ui.warn("The tunnel dropped again while it was being reopened; reopening...")
                if tries.failed() >= self.settings.tunnel.max_reconnects:
                    raise self._give_up(
                        f"Could not reopen the tunnel after {tries.failures} tries", exc.message
                    ) from exc
                if again and not redropped:
                    redropped = True  # at once the first time; a tunnel that keeps dying backs off
                    continue
                if not tries.wait(self._stop):
                    self._check_stop()

    def _warn_before_end(self) -> None:
        """The configured warnings before the time limit, each once."""
        left = self.record.time_left()
        if left is None:
            return
        warned = self._warned
        due = [lead for lead in self.settings.session.warn_before_end if left <= lead and lead not in warned]
        if due:
            warned.update(due)
            r = self.record
            self.ui.warn(
                f"Job {r.job_id} reaches its time limit ({self._limit_text()}) in {fmt_duration(left)}; "
                "a running job cannot be extended: `alvis-fsm start --new` starts another"
            )

    def _limit_text(self) -> str:
        r = self.record
        return fmt_duration(r.time_limit_s) if r.time_limit_s else (r.time_limit or "?")

    def _limit_reached(self) -> None:
        """The job ended at its time limit: the normal end of a session."""
        r = self.record
        self.ui.result(f"Job {r.job_id} reached its time limit ({self._limit_text()})")
        r.end_reason = f"time limit ({self._limit_text()})"
        self.cleanup(r.end_reason)

    def serve(self) -> None:
        """Step of `tunneled`: stream logs, keep an eye on job and tunnel.
        A dropped tunnel fires `disconnect` (back to `serving`, whose step
        reopens it); the log stream carries on across it."""
        r = self.record
        if not self.detach:
            # From the banner on, Ctrl+C is the normal way out (exit 0), even
            # mid-reconnect.
            self._streaming = True
        self._announce()
        if self._back_up:
            self._back_up = False
            self.ui.info(f"Tunnel back up: {r.url}")
        if self.detach:
            raise Detached()
        if not self._said_streaming:
            self._said_streaming = True
            # For a person at a terminal only (not the gateway's output,
            # not the Python API's log): nobody else has a Ctrl+C.
            if self.ui.interactive():
                self.ui.info("Streaming logs (Ctrl+C to stop and cleanup)...")
        restarts = self._restarts
        while True:
            self._check_stop()
            self._warn_before_end()
            proc = self._stream
            if proc is None:
                self._start_stream(self._stream_lines)
                self._stream_lines = 0  # after a restart, only what is new
            elif proc.poll() is not None:
                if not self.conn.alive():
                    # The shared connection dropped (the stream was a channel
                    # on it): reopen it; the job is untouched.
                    self.ui.warn("Lost the connection to the login node; reconnecting...")
                    self._reopen_or_give_up()
                    self._start_stream(0)
                else:
                    # The remote side ended the stream on its own: restart
                    # it, but back off (up to a minute) and say why, so a
                    # remote that keeps failing cannot make us spin.
                    if not self._stream_dead:
                        self._stream_dead = True
                        if restarts.failed(time.monotonic() - self._stream_since) >= 3:
                            said = _stderr_of(proc)
                            self.ui.warn(
                                "The log stream keeps stopping"
                                + (f" ({said})" if said else "")
                                + f"; retrying in {restarts.delay:.0f} s (the job is untouched)"
                            )
                    if restarts.due():
                        self._start_stream(0)
            try:
                kind, value = self._events.get(timeout=0.5)
            except queue.Empty:
                kind, value = "", ""
            if kind == "UNKNOWN":
                self._unanswered(slurm.JobInfo(source="unknown", state=slurm.JobState.UNKNOWN, reason=value))
            if self.supervised and kind in ("EXITED", "ENDED", "GONE"):
                raise Release(kind)  # the job is ending: confirmed and recorded in _finish
            if (kind == "ENDED" and value == "time limit") or (kind == "GONE" and value == "TIMEOUT"):
                raise _LimitReached()
            if kind == "EXITED":
                raise self._crash(f"vLLM exited with status {value}")
            if kind == "ENDED":
                raise self._crash(f"The job stopped ({value})")
            if kind == "GONE":
                raise SchedulerError(f"Job {r.job_id} is no longer running ({value})")
            assert self.tunnel is not None
            if not self.tunnel.alive():
                self.ui.warn("The tunnel dropped; reconnecting (the job is untouched)...")
                self._reconnecting = True
                self._fire("disconnect")
                return

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
        proc = self.agent.stream(
            self.record.run_dir,
            self.record.job_id,
            lines,
            check_every=self.settings.polling.job_check_interval,
        )
        self._stream = proc
        self._stream_since = time.monotonic()
        self._stream_dead = False

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line[:2] in ("O|", "E|"):
                    stream, text = parse_log_line(line)
                    self.ui.log_line(stream, inert_line(text))
                elif "|" in line:
                    head, _, rest = line.partition("|")
                    if head in ("EXITED", "ENDED", "GONE", "UNKNOWN"):
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
        """Ask the scheduler; if it says the job has ended, say how and mark the
        session cleaned (nothing to cancel). No answer means "still there":
        only an authoritative terminal state ends a session."""
        r = self.record
        job = self.agent.jobinfo(r.job_id)
        if not job.ended:
            if job.unanswered:
                self.ui.warn(
                    f"The scheduler did not answer about job {r.job_id} ({job.unanswered}); "
                    "treating it as still there"
                )
            return True
        code = job.exit_code if job.exit_code not in ("", "0:0") else ""
        how = f"{job.state}" + (f", exit code {code}" if code else "")
        if job.state is slurm.JobState.TIMEOUT:
            how = f"TIMEOUT: reached its time limit ({self._limit_text()})"
        self.ui.info(f"Job {r.job_id} has ended ({how}); nothing to cancel")
        self._close_local()
        r.end_reason = f"job ended: {how}"
        r.final_job_state = str(job.state)
        if self.state is not State.CLEANED:
            self._fire("clean")
        r.client_pid = 0
        self._save()
        return False

    def _confirm_end(self) -> bool:
        """A supervisor saw its job end (vLLM exited, the job stopped or is
        gone: a scancel elsewhere, the time limit, a node failure): once the
        scheduler confirms it, the end is recorded and the tunnel and the
        connection closed, as a foreground client would; nobody has to run
        `status` to free the port. Asked for ``END_CONFIRM_S`` at most; no
        confirmation leaves the session to `status`, as before."""
        deadline = time.monotonic() + END_CONFIRM_S
        while True:
            try:
                if not self.still_alive():
                    return True
            except AlvisError:
                pass
            if time.monotonic() >= deadline or self._stop.wait(1.0):
                return False  # or `stop`/`resume` took over meanwhile

    def stop(self) -> None:
        r = self.record
        self.conn.open()
        if r.job_id and not self.still_alive():
            return
        self.cleanup("stopped by the user")

    def show_logs(self, lines: int, follow: bool) -> None:
        r = self.record
        if not r.run_dir or r.state == State.IDLE:
            raise SessionError(f"Session '{r.name}' has no job yet, so no logs")
        opened = not self.conn.alive()
        self.conn.open()
        try:
            if not follow:
                for stream, text in self.agent.tail(r.run_dir, lines):
                    self.ui.log_line(stream, inert_line(text))
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
        """scancel and confirm, close tunnel and connection, state cleaned.
        Idempotent, and shielded from further signals so a second Ctrl+C
        cannot skip it. If the scheduler does not confirm the cancel, the
        session is *not* cleaned: it stays as it is, so `stop` can retry."""
        r = self.record
        with self._shield():
            self.ui.done_waiting()
            self._stop_stream()
            # By name too: an sbatch cut off mid-way may have queued a job whose
            # id we never saw (the session entered `submitted` before sbatch).
            if r.job_id or (r.job_name and str(State.SUBMITTED) in r.entered_at):
                job = r.job_id or r.job_name
                self.ui.info(f"Cancelling job {job}...")
                try:
                    self.conn.open()
                    left = self.agent.cancel(
                        r.job_id, r.job_name, self.settings.timeouts.cancel_confirm
                    )
                except AlvisError as exc:
                    left = exc.message + (f" ({exc.details})" if exc.details else "")
                if left:
                    r.end_reason = r.end_reason or why
                    r.client_pid = 0
                    self._save()
                    self._close_local()
                    raise CancelUnconfirmed(
                        f"Could not confirm that job {job} was cancelled: {left}",
                        hint=f"The job may still be running; session '{r.name}' is kept. "
                        f"`alvis-fsm stop {r.name}` tries again"
                        + (f" (or run `scancel {r.job_id}` on the login node)." if r.job_id else "."),
                    )
            self._close_local()
            if self.state is not State.CLEANED:
                r.end_reason = r.end_reason or why
                self._fire("clean")
            r.client_pid = 0
            self._save()
            self.ui.info(f"Cleaned up job {r.job_id or '(none submitted)'} successfully")

    def _close_local(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        elif self.record.tunnel_control_path:
            from alvis_fsm.cluster.tunnel import close_tunnel_socket

            close_tunnel_socket(self.conn, Path(self.record.tunnel_control_path), self.record.node)
        self.conn.close()


def _no_job_script(run_dir: str) -> str:
    raise SessionError("This session has no job to submit (it was not created by `start`)")


def _stderr_of(proc: subprocess.Popen[bytes]) -> str:
    """The last line an ended stream's ssh wrote on stderr (for a warning)."""
    try:
        data = proc.stderr.read(4096) if proc.stderr is not None else b""
    except (OSError, ValueError):
        return ""
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return inert_line(lines[-1])[:200] if lines else ""


class _LimitReached(Exception):
    """The job ended at its time limit: the normal end of a session."""


class _GiveUp(ConnectionLost):
    """Tunnel could not be reopened: keep the job (not a failure of the job)."""
