"""The single error root. Every failure the user should see is an AlvisError;
`cli.main` turns it into a message, a hint and an exit code in one place."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """One exit code per failure class (documented in docs/reference/exit-codes.md)."""

    OK = 0
    OUTPUT = 1  # stdout closed or full: the output could not be written
    USAGE = 2  # bad flags or arguments (click uses 2 as well)
    CONFIG = 3  # settings, catalog or job script invalid
    SSH = 4  # cannot reach or log in to the login node / compute node
    SCHEDULER = 5  # sbatch refused, job failed or never started
    SERVER = 6  # vLLM crashed, never became ready, or the tunnel check failed
    SESSION = 7  # local session state: missing, locked, corrupt, port taken
    UNCONFIRMED = 8  # a cancel was sent (or not) but the scheduler did not confirm it
    INTERRUPTED = 130  # Ctrl+C / SIGTERM / SIGHUP (after cleanup)


class AlvisError(Exception):
    """Base of every user-facing error: a message, an optional hint, an exit code."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, hint: str | None = None, details: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # Verbatim text from another program (sbatch's stderr, ssh's warning,
        # vLLM's root-cause lines), printed as is below the message.
        self.details = details


class UsageError(AlvisError):
    exit_code = ExitCode.USAGE


class ConfigError(AlvisError):
    exit_code = ExitCode.CONFIG


class SSHError(AlvisError):
    exit_code = ExitCode.SSH


class ConnectionLost(SSHError):
    """The network (or the login node) is unreachable for now: a reason to
    stop the client, never one to give up a job."""


class SchedulerError(AlvisError):
    exit_code = ExitCode.SCHEDULER


class JobRefused(SchedulerError):
    """sbatch refused the job: nothing was queued. Its hint can then name
    the values sbatch was given (account, GPUs, time)."""


class ServerError(AlvisError):
    exit_code = ExitCode.SERVER


class SessionError(AlvisError):
    exit_code = ExitCode.SESSION


class LocalPortBusy(SessionError):
    """A local port the tool must listen on is held by another program: a
    fact about this laptop, nothing remote. Before a job is submitted it
    stops the command; a job that was there before (a resumed session) or has
    served is kept for `resume`, never cancelled for it."""


class CancelUnconfirmed(AlvisError):
    """The job may still be running: the session stays live so that `stop`
    can try again. Never reported as cleaned up."""

    exit_code = ExitCode.UNCONFIRMED


class Interrupted(AlvisError):
    """Raised when a signal asks us to stop; cleanup has run by the time it is shown."""

    exit_code = ExitCode.INTERRUPTED


class StopRequested(BaseException):
    """A front asks the session to stop and clean up: the terminal front
    raises it from its SIGTERM/SIGHUP handler (``fronts/signals.py``), a
    front holding many sessions calls ``Runner.request_stop`` instead. Like
    Ctrl+C it cancels the job; a BaseException so no ``except Exception``
    on the way swallows it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
