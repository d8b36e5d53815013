"""The session's job, with the scheduler: cancel and confirm, learn how it ended.

Needs no driver: `stop` (``stop_job``) and `status` run it on their own
(the end then goes through a machine of its own), the driver
(``runner.py``) hands it its machine's ``clean`` trigger. Only the
scheduler's word counts: an unconfirmed cancel keeps the session (`stop`
retries), no answer means "still there", and the end it confirms is
recorded (state ``cleaned``, how it ended). Also what the job's news mean to
the user: a crash explained from the tail of ``vllm.err``, the time limit
ahead and reached, a scheduler that does not answer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from alvis_fsm.cluster import slurm
from alvis_fsm.cluster.agent import CancelReply
from alvis_fsm.cluster.durations import fmt_duration
from alvis_fsm.engine.session.link import Link, Shield, open_link, record_entry
from alvis_fsm.engine.session.log_stream import LogStream
from alvis_fsm.engine.session.machine import SessionModel, Trigger, build_machine
from alvis_fsm.engine.session.states import State
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.engine.session.tunnel_keeper import TunnelKeeper
from alvis_fsm.errors import AlvisError, CancelUnconfirmed, ServerError
from alvis_fsm.text import inert_line

if TYPE_CHECKING:
    from alvis_fsm.engine.observer import Observer
    from alvis_fsm.engine.settings.model import Settings

# Time left is short relative to the job when at most this share of its
# time limit is left: no warning comes sooner (never at the start of a job
# that got exactly the time it asked for).
SHORT_SHARE = 0.25


def warning_leads(leads: list[float], limit_s: float) -> list[float]:
    """The leads (seconds before the limit) that apply to a job of
    ``limit_s``: those at most ``SHORT_SHARE`` of it; if none is, one
    warning at that share (a one-minute job is warned 15 s before its end)."""
    short = limit_s * SHORT_SHARE
    kept = [lead for lead in leads if lead <= short]
    return kept or ([short] if leads else [])


class JobControl:
    def __init__(
        self,
        link: Link,
        *,
        tunnels: TunnelKeeper | None = None,
        stream: LogStream | None = None,
        clean: Callable[[], object] | None = None,
    ) -> None:
        """The driver hands in its tunnel keeper, its log stream and its
        machine's ``clean`` trigger; on its own (`stop`, `status`), the
        tunnel a detached client left is closed by its socket and the end
        goes through a machine of its own (``_clean_through_machine``)."""
        self.link = link
        self.tunnels = tunnels or TunnelKeeper(link)
        self.stream = stream
        self._clean = clean or self._clean_through_machine
        self._last_unknown_note = 0.0
        self._warned: set[float] = set()

    def _clean_through_machine(self) -> None:
        """The machine's ``clean`` from the record's state (no driver, no
        steps): the state written is the one the machine enters, never one
        set behind its back."""
        record, settings = self.link.record, self.link.settings
        model = SessionModel()
        model.on_change = lambda state: record_entry(record, state)
        build_machine(model, settings.machine, settings.timeouts.model_dump(), record.state)
        model.fire(Trigger.CLEAN)

    def _enter_cleaned(self) -> None:
        if self.link.record.state != State.CLEANED:
            self._clean()

    # -- the end -------------------------------------------------------------
    def still_alive(self) -> bool:
        """Ask the scheduler; if it says the job has ended, say how and mark the
        session cleaned (nothing to cancel). No answer means "still there":
        only an authoritative terminal state ends a session."""
        r, ui = self.link.record, self.link.ui
        job = self.link.agent.jobinfo(r.job_id)
        if not job.ended:
            if job.unanswered:
                ui.warn(
                    f"The scheduler did not answer about job {r.job_id} ({job.unanswered}); "
                    "treating it as still there"
                )
            return True
        code = job.exit_code if job.exit_code not in ("", "0:0") else ""
        how = f"{job.state}" + (f", exit code {code}" if code else "")
        if job.state is slurm.JobState.TIMEOUT:
            how = f"TIMEOUT: reached its time limit ({self.limit_text()})"
        ui.info(f"Job {r.job_id} has ended ({how}); nothing to cancel")
        self.close_local()
        r.end_reason = f"job ended: {how}"
        r.final_job_state = str(job.state)
        self._enter_cleaned()
        r.let_go()
        self.link.save()
        return False

    def confirm_end(self, seconds: float) -> bool:
        """A supervisor saw its job end (vLLM exited, the job stopped or is
        gone: a scancel elsewhere, the time limit, a node failure): once the
        scheduler confirms it, the end is recorded and the tunnel and the
        connection closed, as a foreground client would; nobody has to run
        `status` to free the port. Asked for ``seconds`` at most; no
        confirmation leaves the session to `status`."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if not self.still_alive():
                    return True
            except AlvisError:
                pass
            if time.monotonic() >= deadline or self.link.stop.pause(1.0):
                return False  # or `stop`/`resume` took over meanwhile

    def stop(self) -> None:
        """The user's stop: nothing to cancel if the job has ended, else cleanup."""
        r = self.link.record
        self.link.conn.open()
        if r.job_id and not self.still_alive():
            return
        self.cleanup("stopped by the user")

    def cleanup(self, why: str) -> None:
        """scancel and confirm, close tunnel and connection, state cleaned.
        Idempotent, and shielded from further signals so a second Ctrl+C
        cannot skip it. If the scheduler does not confirm the cancel, the
        session is *not* cleaned: it stays as it is, so `stop` can retry."""
        link = self.link
        r = link.record
        with link.shield():
            link.ui.done_waiting()
            if self.stream is not None:
                self.stream.stop()
            # By name too: an sbatch cut off mid-way may have queued a job whose
            # id we never saw (the session entered `submitted` before sbatch).
            if r.job_id or (r.job_name and str(State.SUBMITTED) in r.entered_at):
                self._cancel(why)
            self.close_local()
            if r.state != State.CLEANED:
                r.end_reason = r.end_reason or why
                self._clean()
            r.let_go()
            link.save()
            link.ui.info(f"Cleaned up job {r.job_id or '(none submitted)'} successfully")

    def _cancel(self, why: str) -> None:
        link = self.link
        r = link.record
        job = r.job_id or r.job_name
        link.ui.info(f"Cancelling job {job}...")
        try:
            link.conn.open()
            reply = link.agent.cancel(r.job_id, r.job_name, link.settings.timeouts.cancel_confirm)
        except AlvisError as exc:
            reply = CancelReply(False, exc.message + (f" ({exc.details})" if exc.details else ""))
        if reply.confirmed:
            return
        left = reply.why
        r.end_reason = r.end_reason or why
        r.let_go()
        link.save()
        self.close_local()
        raise CancelUnconfirmed(
            f"Could not confirm that job {job} was cancelled: {left}",
            hint=f"The job may still be running; session '{r.name}' is kept. "
            f"`alvis-fsm stop {r.name}` tries again"
            + (f" (or run `scancel {r.job_id}` on the login node)." if r.job_id else "."),
        )

    def close_local(self) -> None:
        """Close the tunnel and the connection."""
        self.tunnels.close()
        self.link.conn.close()

    # -- what the job's news mean ------------------------------------------------
    def limit_text(self) -> str:
        r = self.link.record
        return fmt_duration(r.time_limit_s) if r.time_limit_s else (r.time_limit or "?")

    def limit_reached(self) -> None:
        """The job ended at its time limit: the normal end of a session."""
        r = self.link.record
        self.link.ui.result(f"Job {r.job_id} reached its time limit ({self.limit_text()})")
        r.end_reason = f"time limit ({self.limit_text()})"
        self.cleanup(r.end_reason)

    def warn_before_end(self) -> None:
        """The warnings before the time limit (``warning_leads``), each
        once; leads passed together are one warning."""
        r = self.link.record
        left = r.time_left()
        if left is None:
            return
        leads = warning_leads(self.link.settings.session.warn_before_end, r.time_limit_s)
        due = [lead for lead in leads if left <= lead and lead not in self._warned]
        if due:
            self._warned.update(due)
            self.link.ui.warn(
                f"Job {r.job_id} reaches its time limit ({self.limit_text()}) in {fmt_duration(left)}; "
                "a running job cannot be extended: `alvis-fsm start --new` starts another"
            )

    def unanswered(self, job: slurm.JobInfo | None) -> str:
        """Text for a scheduler that gave no state; also told once a minute as
        a warning, so a user knows why nothing moves and that the job is kept."""
        why = job.unanswered if job is not None else ""
        if why and time.monotonic() - self._last_unknown_note > 60:
            self._last_unknown_note = time.monotonic()
            self.link.ui.warn(
                f"The scheduler did not answer about job {self.link.record.job_id} ({why}); "
                "the job is kept, asking again"
            )
        return why

    def tail_err(self, n: int) -> list[str]:
        try:
            return [
                inert_line(t)
                for s, t in self.link.agent.tail(self.link.record.run_dir, n)
                if s == "err"
            ]
        except AlvisError:
            return []

    def crash(self, message: str) -> ServerError:
        """vLLM or its job ended: the error, with the cause from ``vllm.err``."""
        r = self.link.record
        cause = slurm.root_cause(self.tail_err(60))
        return ServerError(
            message,
            hint=f"Full logs: `alvis-fsm logs {r.name}` or {r.run_dir}/vllm.err on the login node.",
            details="\n".join(cause) or None,
        )


def stop_job(
    settings: Settings,
    store: Store,
    name: str,
    ui: Observer,
    *,
    shield: Shield | None = None,
    **handles: Any,
) -> SessionRecord | None:
    """`stop`, once whoever drove the session has let go: under its lock,
    cancel its job (confirmed by the scheduler), close its tunnel, state
    cleaned. None when this stopped it; the record when it was stopped
    already."""
    with store.lock(name):
        record = store.load(name)
        if record.state == State.CLEANED:
            return record
        link = open_link(
            settings, record, store, ui, shield=shield or contextlib.nullcontext, **handles
        )
        JobControl(link).stop()
    return None
