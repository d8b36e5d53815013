"""A session's start-up: submit, wait for a node, wait for vLLM.

The steps of `submitted` and `running`, run by the driver (``runner.py``),
which fires the next trigger when one returns. Each asks the agent on the
login node first and judges after: what happened on the cluster while this
client was away (asleep, suspended, offline) counts, not its clock. A
state's timeout (``[machine]``, a key of ``[timeouts]``) is judged by the
state's age on the cluster's clock (``StateClock``); a state that outlasts
it raises ``TimedOut`` (the driver fires ``timeout``, not ``fail``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from alvis_fsm.cluster import rundir, slurm
from alvis_fsm.cluster.agent import Event, Mark
from alvis_fsm.cluster.durations import in_words
from alvis_fsm.cluster.protocol import Reply
from alvis_fsm.cluster.tunnel import parse_address
from alvis_fsm.engine.fit import loadtimes
from alvis_fsm.engine.session.job_control import JobControl
from alvis_fsm.engine.session.link import Link
from alvis_fsm.engine.session.machine import SessionModel
from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.tunnel_keeper import TunnelKeeper
from alvis_fsm.errors import AlvisError, SchedulerError, ServerError, SessionError, SSHError

# Route login needs vLLM on a TCP port of the node that every cluster user
# can connect to; only the key (the guard asks for it on every path, see
# cluster/remote/guard.py) keeps them out: say so before anything is submitted.
LOGIN_ROUTE_WARNING = (
    "Route login: vLLM listens on a TCP port of the compute node that any cluster user can "
    "connect to; only the API key keeps them out (asked on every path, /invocations, /tokenize "
    "and /metrics included; route jump opens no port)."
)


class TimedOut(Exception):
    """A state lasted longer than its timeout: ``error`` says which."""

    def __init__(self, error: AlvisError) -> None:
        super().__init__(error.message)
        self.error = error


class StateClock:
    """How long the current state has lasted, judged by the cluster."""

    def __init__(self, link: Link, model: SessionModel) -> None:
        self.link = link
        self.model = model
        # The newest age of the current state on the cluster's clock, and
        # when (client monotonic time) we learnt it.
        self._age: tuple[str, float, float] | None = None

    def limit(self, state: str) -> float:
        sdef = self.link.settings.machine.states.get(state)
        timeouts = self.link.settings.timeouts
        return float(getattr(timeouts, sdef.timeout)) if sdef and sdef.timeout else 0.0

    def note(self, ev: Event) -> None:
        if ev.age is not None:
            self._age = (self.model.state, ev.age, time.monotonic())

    def age(self) -> float:
        """The agent's AGE (from the run directory's files, on the login
        node's clock) plus the time since we heard it. Before the first AGE,
        the wall-clock time since the state was entered (kept in the record)."""
        name = self.model.state
        if self._age is not None and self._age[0] == name:
            return self._age[1] + (time.monotonic() - self._age[2])
        return time.time() - self.model.entered_at.get(name, time.time())

    def remaining(self) -> float:
        """Seconds left before the current state's timeout (inf if none)."""
        limit = self.limit(self.model.state)
        return limit - self.age() if limit else float("inf")

    def timed_out(self, ev: Event) -> bool:
        """Judged by the cluster's facts only, and only after asking it: a
        client that slept or was suspended learns first what happened while
        it was away, so its absence never counts against the job."""
        limit = self.limit(self.model.state)
        if not limit:
            return False
        if ev.age is not None:
            return ev.age >= limit
        # The agent could not date the state (its file is missing): fall back
        # to the time recorded when the state was entered, so a wait still ends.
        return self.age() >= limit


class StartUp:
    def __init__(
        self, link: Link, model: SessionModel, jobs: JobControl, tunnels: TunnelKeeper
    ) -> None:
        self.link = link
        self.model = model
        self.clock = StateClock(link, model)
        self.jobs = jobs
        self.tunnels = tunnels
        self._load_times = loadtimes.LoadTimes(link.store.dir)

    # -- submitted ---------------------------------------------------------------
    def submit(self, render: Callable[[str], str], sbatch_args: list[str]) -> None:
        """sbatch, in state `submitted` already: from here on, cleanup cancels
        by job name too (an sbatch cut off mid-way may have queued a job)."""
        link = self.link
        r = link.record
        if r.route == "login":
            link.ui.warn(LOGIN_ROUTE_WARNING)
        asked = f" = {in_words(r.time_limit_s)}" if r.time_limit_s else ""
        link.ui.info(f"Submitting job (duration: {r.time_limit}{asked})...")
        # The job script expands a "~/" run dir itself, on the cluster.
        script = render(r.run_dir)
        key = r.api_key or None
        try:
            r.run_dir, r.job_id = link.agent.submit(r.run_dir, key, script, sbatch_args)
        except SSHError:
            # The connection broke during sbatch: the job may or may not be
            # queued. Look for it by its unique name before trying again, so a
            # session never owns two jobs.
            link.conn.reopen()
            found = link.agent.find(r.job_name)
            if found:
                r.job_id = found
            else:
                r.run_dir, r.job_id = link.agent.submit(r.run_dir, key, script, sbatch_args)
        link.save()
        link.ui.result(f"Job submitted: {r.job_id}")
        link.ui.info("Waiting for job to start...")

    def _slice(self, since: float) -> float:
        p = self.link.settings.polling
        interval = p.scheduler_interval
        if time.monotonic() - since > p.scheduler_backoff_after:
            interval = p.scheduler_backoff_interval
        return max(0.2, min(interval, self.clock.remaining()))

    def wait_for_node(self) -> None:
        """Step of `submitted` (after ``submit`` for a new session): wait
        until the job runs on a node."""
        link = self.link
        r = link.record
        if not r.job_id:
            # Picked up without a job id (sbatch was cut off): never submit
            # twice; look for the job by its unique name.
            r.job_id = link.agent.find(r.job_name) or ""
            if not r.job_id:
                raise SessionError(f"Session '{r.name}' has no job on the cluster")
            link.save()
        since = time.monotonic()
        entered = self.model.entered_at.get(State.SUBMITTED, time.time())
        while True:
            link.stop.check()
            ev = link.agent.wait_start(
                r.run_dir, r.job_id, self._slice(since), link.settings.polling.file_interval
            )
            self.clock.note(ev)
            if ev.kind == Reply.STARTED:
                self._started(ev)
                return
            self._not_started(ev)
            link.ui.waiting(self._queue_text(ev.job), since=entered)

    def _started(self, ev: Event) -> None:
        """The job runs: ``HOST JOBID EPOCH``, the start on the cluster's
        clock, for the time left (a client that slept must not misjudge it)."""
        r = self.link.record
        words = ev.value.split()
        r.node = words[0] if words else ""
        r.queue_reason = r.expected_start = ""
        r.running_since = time.time()
        if len(words) >= 3 and words[2].isdigit():
            r.running_since = float(words[2])
        self.link.ui.done_waiting()

    def _not_started(self, ev: Event) -> None:
        r = self.link.record
        job = ev.job
        if job is not None and job.ended:
            self.link.ui.done_waiting()
            raise SchedulerError(
                f"Job {r.job_id} ended before it started: {job.state}"
                + (f" ({job.reason})" if job.reason else ""),
                hint=f"See {r.run_dir}/{rundir.SLURM_OUTPUT.replace('%j', r.job_id)} on the login node.",
            )
        if self.clock.timed_out(ev):
            limit = self.clock.limit(State.SUBMITTED)
            raise TimedOut(
                SchedulerError(
                    f"Job {r.job_id} did not start within {limit:.0f} s",
                    hint="The queue is busy: try a shorter -t, fewer GPUs, or raise timeouts.job_start.",
                )
            )

    def _queue_text(self, job: slurm.JobInfo | None) -> str:
        r = self.link.record
        text = f"Waiting for job {r.job_id} to start"
        why = self.jobs.unanswered(job)
        if why:
            text += f" — the scheduler is not answering ({why}); retrying"
        elif job is not None and job.state is slurm.JobState.PENDING:
            # Kept on the record (saved with its next change) for those who
            # show the queue without printing: the gateway's models.
            r.queue_reason = slurm.describe_reason(job.reason, self.link.settings.slurm.gpus)
            r.expected_start = job.start.replace("T", " ")[:16] if job.start else ""
            text += " — " + r.queue_reason
            if r.expected_start:
                text += f", expected start {r.expected_start} (cluster time)"
        return text

    # -- running -------------------------------------------------------------------
    def announce_node(self) -> None:
        """Said by `running`'s step once the machine has entered (and saved)
        it, when it came from `submitted`: what the user reads is what
        `status` shows."""
        r = self.link.record
        self.link.ui.info(f"Job is running on node: {r.node}")
        self.link.ui.info("Waiting for server address...")

    def wait_for_server(self) -> Mark | None:
        """Step of `running`: wait for vLLM's address, then for it to be
        ready. Returns where its logs stood then (the log stream's mark)."""
        link = self.link
        r = link.record
        entered = self.model.entered_at.get(State.RUNNING, time.time())
        while True:
            link.stop.check()
            ev = link.agent.wait_ready(
                r.run_dir,
                r.job_id,
                min(5.0, max(0.2, self.clock.remaining())),
                link.settings.polling.file_interval,
                address_known=bool(r.port or r.remote_socket),
            )
            self.clock.note(ev)
            if ev.kind in (Reply.ADDRESS, Reply.READY):
                self._address(ev)
            if ev.kind == Reply.READY:
                link.ui.done_waiting()
                if r.running_since:
                    # For the next start's estimate (and the gateway's rollover lead).
                    self._load_times.add(r.model, r.gpus, time.time() - r.running_since)
                return ev.mark
            if ev.kind == Reply.ADDRESS:
                continue
            self._not_ready(ev)
            self.jobs.unanswered(ev.job)
            eta = loadtimes.describe(self._load_times.expected(r.model, r.gpus))
            link.ui.waiting(
                f"Waiting for vLLM to load {r.model} on {r.node}" + (f" — {eta}" if eta else ""),
                since=entered,
            )

    def _address(self, ev: Event) -> None:
        link = self.link
        r = link.record
        if not (r.port or r.remote_socket):
            address = parse_address(ev.value)
            r.node = address.host or r.node
            r.port, r.remote_socket = address.port, address.socket
            link.save()
            link.ui.done_waiting()
            link.ui.info(f"Server address: {ev.value}")
        if self.tunnels.tunnel is None:
            # Open the tunnel while vLLM is still loading: the node's login
            # and the forward are then off the critical path.
            self.tunnels.open()

    def _not_ready(self, ev: Event) -> None:
        r = self.link.record
        crashed = ""
        if ev.news is not None:
            crashed = ev.news.says(r.job_id, before_ready=True)
        elif ev.job is not None and ev.job.ended:
            crashed = f"Job {r.job_id} ended ({ev.job.state}) before vLLM was ready"
        if crashed:
            self.link.ui.done_waiting()
            raise self.jobs.crash(crashed)
        if self.clock.timed_out(ev):
            raise TimedOut(
                ServerError(
                    f"vLLM did not start within {self.clock.limit(State.RUNNING):.0f} s",
                    hint="Raise timeouts.server_ready for a large model, or check the log above.",
                    details="\n".join(self.jobs.tail_err(20)) or None,
                )
            )
