"""One session's life: the driver that runs the machine's steps, and the way out.

The machine (engine/session/machine.py, declared in ``[machine]``) drives: each live
state names its step as ``on_enter`` — ``await_start`` (submit, then wait
for a node), ``await_server`` (wait for vLLM), ``connect`` (open and verify
the tunnel), ``serve`` (stream logs, watch job and tunnel). A step does its
state's work through the session's parts, fires the next trigger when the
state is done and returns; the queued machine then enters the next state and
runs its step. The parts, each its own module:

- ``start_up.StartUp``: submit, wait for a node, wait for vLLM (with the
  states' timeouts judged on the cluster's clock);
- ``tunnel_keeper.TunnelKeeper``: open, verify, announce, reopen the tunnel;
- ``log_stream.LogStream``: vLLM's log lines and the job's news;
- ``job_control.JobControl``: cancel and confirm with the scheduler, and
  what the job's end means (it needs no machine: `stop` uses it alone);
- ``looks``: what `logs` and `status` read (no machine, nothing saved).

``Runner.drive`` enters the machine (``submit`` for a new session,
``resume`` for one picked up again) and turns every way out into what it
means for the job (``OUTCOMES``, one table from error class to outcome):
detached, released to another client, the network lost (job kept), or
``cleanup`` (scancel, confirmed; tunnel and connection closed; state
``cleaned``).

No terminal here: no printing (the observer, engine/observer.py, hears
every event and a front renders it), no prompts (passphrases go through the
observer's ``ask``), no signal handlers (the terminal front owns them,
fronts/signals.py, and passes a ``shield`` for cleanup), no module-level
state. So a front can run many sessions in threads of one process and stop
each with ``request_stop``; each Runner has its own machine, connection,
log reader thread and stop switch."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING

from alvis_fsm.cluster import slurm
from alvis_fsm.cluster.agent import Agent, JobNews
from alvis_fsm.cluster.protocol import Reply
from alvis_fsm.cluster.ssh import Connection
from alvis_fsm.cluster.tunnel import Tunnel, Verified
from alvis_fsm.engine.observer import Observer
from alvis_fsm.engine.session.job_control import JobControl
from alvis_fsm.engine.session.link import Link, Shield, open_link, record_entry
from alvis_fsm.engine.session.log_stream import LogStream
from alvis_fsm.engine.session.machine import BEHAVIOURS, SessionModel, Trigger, build_machine
from alvis_fsm.engine.session.start_up import StartUp, TimedOut
from alvis_fsm.engine.session.states import LIVE_STATES, State
from alvis_fsm.engine.session.store import Driver, SessionRecord, Store
from alvis_fsm.engine.session.tunnel_keeper import GiveUp, TunnelKeeper, reopen_or_give_up
from alvis_fsm.errors import (
    AlvisError,
    ConnectionLost,
    Interrupted,
    LocalPortBusy,
    SchedulerError,
    SessionError,
    StopRequested,
)

if TYPE_CHECKING:  # settings imports pydantic; the Runner only reads it
    from alvis_fsm.engine.settings.model import Settings


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
    tunnel (``JobControl.confirm_end``), else leaves it to `status`."""


class LimitReached(Exception):
    """The job ended at its time limit: the normal end of a session."""


class Outcome(Enum):
    """What a way out of the driver means for the job."""

    LIMIT_REACHED = "the time limit: cleaned up, a normal end"
    DETACHED = "detached: job and tunnel kept, the client returns"
    LET_GO = "let go: job, tunnel and state left to `stop`, `resume`, `status`"
    KEEP_JOB = "the network lost, or a job's port taken: job and state kept for `resume`"
    INTERRUPTED = "Ctrl+C: cleaned up"
    STOPPED = "a stop requested: cleaned up"
    TIMED_OUT = "a state's timeout: `timeout`, cleaned up"
    FAILED = "an error: `fail`, cleaned up"
    INTERNAL = "a bug: cleaned up"


# The first row whose class the error is an instance of gives the outcome.
OUTCOMES: tuple[tuple[type[BaseException], Outcome], ...] = (
    (LimitReached, Outcome.LIMIT_REACHED),
    (Detached, Outcome.DETACHED),
    (Release, Outcome.LET_GO),
    (ConnectionLost, Outcome.KEEP_JOB),
    (KeyboardInterrupt, Outcome.INTERRUPTED),
    (StopRequested, Outcome.STOPPED),
    (TimedOut, Outcome.TIMED_OUT),
    (AlvisError, Outcome.FAILED),
    (BaseException, Outcome.INTERNAL),
)

# A supervisor never ends a job: asked to stop, or failing, it lets go, and
# `stop`, `resume` and `status` decide. Its rows come first.
SUPERVISOR_OUTCOMES: tuple[tuple[type[BaseException], Outcome], ...] = (
    (ConnectionLost, Outcome.KEEP_JOB),
    (StopRequested, Outcome.LET_GO),
    (TimedOut, Outcome.LET_GO),
    (AlvisError, Outcome.LET_GO),
    *OUTCOMES,
)


# A job that was there before this client came (a resumed session) or has
# served is the user's work: its local port held by another program is this
# laptop's problem, never a reason to end it. Its rows come first. (Before
# the first serving of a job this client submitted, `start` cleans up: it
# leaves nothing half-done.)
KEPT_JOB_OUTCOMES: tuple[tuple[type[BaseException], Outcome], ...] = (
    (LocalPortBusy, Outcome.KEEP_JOB),
    *OUTCOMES,
)


def outcome_of(exc: BaseException, supervised: bool = False, kept: bool = False) -> Outcome:
    """The outcome of ``exc``: by the supervisor's table, the table of a job
    that is the user's work (``kept``), or the plain one."""
    table = SUPERVISOR_OUTCOMES if supervised else KEPT_JOB_OUTCOMES if kept else OUTCOMES
    return next(outcome for cls, outcome in table if isinstance(exc, cls))


class Runner:
    def __init__(
        self,
        settings: Settings,
        record: SessionRecord,
        store: Store,
        ui: Observer,
        *,
        detach: bool = False,
        conn: Connection | None = None,
        agent: Agent | None = None,
        tunnel_factory: Callable[..., Tunnel] | None = None,
        verifier: Callable[..., Verified] | None = None,
        driver: Driver = Driver.CLIENT,
        job_script: Callable[[str], str] | None = None,
        sbatch_args: Sequence[str] = (),
        shield: Shield = contextlib.nullcontext,
    ) -> None:
        # A foreground client (``detach``: hands over once tunneled) or a detached
        # session's supervisor: the same loop, but it lets go (Release) instead of
        # cancelling; `stop`, `resume`, `status` decide (see ownership.py).
        if driver not in (Driver.CLIENT, Driver.SUPERVISOR):
            raise ValueError(f"a session is driven by a client or a supervisor, not {driver}")
        self.driver = driver
        self.detach = detach
        self.picked_up = State(record.state) is not State.IDLE  # resumed, or a supervisor's
        self.link: Link = open_link(
            settings, record, store, ui, conn=conn, agent=agent, shield=shield
        )
        # The session's parts by their usual names (the same objects as the link's).
        self.settings, self.record, self.conn, self.agent = (
            settings,
            record,
            self.link.conn,
            self.link.agent,
        )
        self.tunnels = TunnelKeeper(self.link, tunnel_factory, verifier)
        self.stream = LogStream(self.link)
        self.model = SessionModel()
        self.model.on_change = self._on_change
        self.jobs = JobControl(
            self.link,
            tunnels=self.tunnels,
            stream=self.stream,
            clean=lambda: self.model.fire(Trigger.CLEAN),
        )
        self.start_up = StartUp(self.link, self.model, self.jobs, self.tunnels)
        # The behaviour of each state, attached to the machine (``on_enter``
        # in [machine]); see engine/session/machine.py.
        self.machine = build_machine(
            self.model,
            settings.machine,
            settings.timeouts.model_dump(),
            initial=record.state,
            steps={step: getattr(self, step) for step in BEHAVIOURS},
        )
        self.model.entered_at.update(record.entered_at)
        # The job to submit: the job script for an (absolute) run directory,
        # and extra sbatch arguments. Only a session still idle needs them.
        self.render = job_script or _no_job_script
        self.sbatch_args = list(sbatch_args)

    @property
    def ui(self) -> Observer:
        return self.link.ui

    @ui.setter
    def ui(self, ui: Observer) -> None:
        self.link.ui = ui  # for every part at once

    @property
    def tunnel(self) -> Tunnel | None:
        return self.tunnels.tunnel

    @property
    def supervised(self) -> bool:
        return self.driver is Driver.SUPERVISOR

    @property
    def state(self) -> State:
        return State(self.model.state)

    def _on_change(self, state: State) -> None:
        record_entry(self.link.record, state)
        self.link.save()

    # -- the loop -------------------------------------------------------------
    def drive(self) -> None:
        """Run the session from its current state. Cleans up on any failure or
        signal; returns normally only when detached or stopped by the user.
        A lost network never cleans up: the job is kept for `resume`."""
        self.record.drive_as(self.driver, os.getpid())
        self.link.save()
        # The front's stop signals stay turned into exceptions until the
        # handler below has shielded itself: no window where a signal's
        # default action could end the process between a failure and its scancel.
        try:
            self._run_steps()
        except BaseException as exc:
            with self.link.shield():
                self._finish(exc)

    def _run_steps(self) -> None:
        """Enter the machine: the states' steps do the rest (queued: each
        step fires the next trigger and returns, the machine runs the next)."""
        self.conn.open()
        state = self.state
        if state is State.IDLE:
            self.model.fire(Trigger.SUBMIT)
        elif state is State.TUNNELED and not (self.supervised and self.tunnels.adopt()):
            # Picked up by resume: the tunnel is not ours until it is
            # found (or reopened) and verified again.
            self.model.fire(Trigger.DISCONNECT)
        elif state in LIVE_STATES:
            self.model.fire(Trigger.RESUME)

    def request_stop(self, reason: str = "stopped") -> None:
        """Ask a session driven in another thread to stop and clean up, as
        Ctrl+C does in a terminal: its step notices within a second or so
        (the current scheduler query or log poll ends first)."""
        self.link.stop.request(reason)

    # -- steps ----------------------------------------------------------------
    def await_start(self) -> None:
        """Step of `submitted`: submit (a session entering it from idle in
        this process), then wait for a node."""
        if self.model.came_from == State.IDLE and not self.record.job_id:
            self.start_up.submit(self.render, self.sbatch_args)
        self.start_up.wait_for_node()
        self.model.fire(Trigger.START)

    def await_server(self) -> None:
        """Step of `running`: wait for vLLM's address, then for it to be ready."""
        if self.model.came_from == State.SUBMITTED:
            self.start_up.announce_node()
        self.stream.mark = self.start_up.wait_for_server()
        self.model.fire(Trigger.READY)

    def connect(self) -> None:
        """Step of `serving`: open the tunnel and verify the server through it;
        after a drop (from `tunneled`), the same with retries. The banner is
        shown by `serve`, once `tunneled` is saved."""
        self.link.stop.check()
        if self.stream.proc is None and self.stream.mark is None:
            # Picked up served (resume, a supervisor): the stream starts where
            # the logs stand now, before the ready block (see log_stream.py).
            # A lost connection here is one as in any step (the job is kept).
            self.stream.mark = self.agent.mark(self.record.run_dir)
        self.tunnels.bring_up()
        self.model.fire(Trigger.CONNECT)

    def serve(self) -> None:
        """Step of `tunneled`: stream logs, keep an eye on job and tunnel.
        A dropped tunnel fires `disconnect` (back to `serving`, whose step
        reopens it); the log stream carries on across it."""
        self.tunnels.announce()
        if self.detach:
            raise Detached()
        self.stream.tell_once()
        while True:
            self.link.stop.check()
            self.jobs.warn_before_end()
            self.stream.keep(reopen=lambda: reopen_or_give_up(self.link))
            self._job_news(self.stream.next_event(timeout=0.5))
            if not self.tunnels.alive():
                self.tunnels.dropped()
                self.model.fire(Trigger.DISCONNECT)
                return

    def _job_news(self, news: JobNews | None) -> None:
        """What the stream's news about the job mean while serving."""
        if news is None:
            return
        if not news.ends_job:
            self.jobs.unanswered(
                slurm.JobInfo(source="unknown", state=slurm.JobState.UNKNOWN, reason=news.detail)
            )
            return
        if self.supervised:
            raise Release(news.kind)  # the job is ending: confirmed and recorded in _finish
        if news.at_time_limit:
            raise LimitReached()
        if news.kind == Reply.GONE:
            raise SchedulerError(news.says(self.record.job_id))
        raise self.jobs.crash(news.says(self.record.job_id))

    # -- the way out ------------------------------------------------------------
    def _finish(self, exc: BaseException) -> None:
        """What each way out of the loop means for the job (``OUTCOMES``)."""
        handlers: dict[Outcome, Callable[[], None]] = {
            Outcome.LIMIT_REACHED: self.jobs.limit_reached,
            Outcome.DETACHED: self._detached,
            Outcome.LET_GO: lambda: self._let_go(exc),
            Outcome.KEEP_JOB: lambda: self._keep_job(exc),
            Outcome.INTERRUPTED: self._interrupted,
            Outcome.STOPPED: lambda: self._stopped(exc),
            Outcome.TIMED_OUT: lambda: self._failed(exc, Trigger.TIMEOUT),
            Outcome.FAILED: lambda: self._failed(exc, Trigger.FAIL),
            Outcome.INTERNAL: lambda: self._internal(exc),
        }
        handlers[outcome_of(exc, self.supervised, kept=self._users_work())]()

    def _users_work(self) -> bool:
        """Whether the job is the user's work rather than this command's
        half-done step: there before this client came, or it has served."""
        return self.picked_up or State.TUNNELED in self.record.entered_at

    def _detached(self) -> None:
        self.record.drive_as(Driver.HANDING_OVER)
        self.link.save()

    def _let_go(self, exc: BaseException) -> None:
        self.stream.stop()
        if isinstance(exc, Release) and exc.args and self.jobs.confirm_end(END_CONFIRM_S):
            return  # ended, recorded, tunnel and connection closed
        self.record.let_go()
        self.link.save()

    def _keep_job(self, exc: BaseException) -> None:
        """The network is gone, or the local port is another program's, not
        the job: keep job and state so that `resume` can reattach. Nothing
        remote can be done now anyway."""
        assert isinstance(exc, ConnectionLost | LocalPortBusy)
        r = self.record
        if self.state is State.IDLE:
            self._failed(exc, Trigger.FAIL)  # nothing submitted: a plain error
            return
        self.stream.stop()
        if self.tunnels.tunnel is not None:
            self.tunnels.tunnel.close()
        # The master too (a local step, no network needed): a client that
        # gives up leaves no ssh behind; `resume` logs in again.
        self.link.conn.close()
        if not self.supervised:  # a supervisor still holds it, and tries again
            r.let_go()
        self.link.save()
        if isinstance(exc, GiveUp):
            raise exc
        if isinstance(exc, LocalPortBusy):
            raise LocalPortBusy(
                f"{exc.message}; job {r.job_id or r.job_name} is kept ({self.state})",
                hint=f"Find what holds it with `lsof -nP -iTCP:{r.local_port} -sTCP:LISTEN` "
                f"and stop it; then `alvis-fsm resume {r.name}` reconnects. "
                f"`alvis-fsm stop {r.name}` cancels the job.",
                details=exc.details,
            ) from exc
        raise GiveUp(
            f"{exc.message}; job {r.job_id or r.job_name} is kept ({self.state})",
            hint=f"`alvis-fsm resume {r.name}` reconnects once the network is back; "
            f"`alvis-fsm stop {r.name}` cancels the job.",
            details=exc.details,
        ) from exc

    def _interrupted(self) -> None:
        self.ui.interrupted()
        # Ctrl+C once the session is served here is how it normally ends
        # (exit 0); before that it interrupts the start-up (exit 130).
        if self.model.has_been(State.TUNNELED) and not self.detach:
            self.jobs.cleanup("stopped with Ctrl+C")
            return
        self.jobs.cleanup("interrupted")
        raise Interrupted(f"Interrupted; cleaned up job {self.record.job_id or '(none)'}") from None

    def _stopped(self, exc: BaseException) -> None:
        assert isinstance(exc, StopRequested)
        self.jobs.cleanup(exc.reason)
        raise Interrupted(
            f"Stopped by {exc.reason}; cleaned up job {self.record.job_id or '(none)'}"
        ) from None

    def _failed(self, exc: BaseException, trigger: Trigger) -> None:
        error = exc.error if isinstance(exc, TimedOut) else exc
        assert isinstance(error, AlvisError)
        if self.state not in (State.FAILED, State.CLEANED):
            # Even if saving the new state fails, cleanup must still run.
            with contextlib.suppress(Exception):
                self.model.fire(trigger)
        self.record.end_reason = error.message
        self.jobs.cleanup(error.message)
        raise error

    def _internal(self, exc: BaseException) -> None:
        self.jobs.cleanup("internal error")
        raise exc

    # -- for resume (service.py): job control's, through the driver ---------------
    def still_alive(self) -> bool:
        return self.jobs.still_alive()

    def cleanup(self, why: str) -> None:
        self.jobs.cleanup(why)


def _no_job_script(run_dir: str) -> str:
    raise SessionError("This session has no job to submit (it was not created by `start`)")
