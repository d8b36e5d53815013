"""What every command shares about its output: one JSON shape, text made
safe for a terminal, and a stdout that may be closed or full.

Text from outside is made safe with ``alvis_fsm.text.inert`` (the one
sanitizer, for every layer).

JSON (``--json``): exactly one JSON object on stdout, indented, ending in a
newline. On success its keys depend on the command (documented in
docs/reference/json-output.md); on failure it is ``{"error": {"message", "hint", "details",
"exit_code"}}`` and the exit code is the same as without ``--json``.

Writing never interrupts the work (``steady_streams``): a terminal that
went away (SIGHUP, then EIO on every write), a closed pipe or a full disk
makes a write a no-op, never an exception in the middle of a cleanup. The
first failure is kept: ``main`` reports a lost stdout at the end (exit
OUTPUT), and a command that follows something forever stops when its
reader is gone (``lost``).

Imported by every command, so it imports nothing heavy."""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import IO, Any


class Steady:
    """``sys.stdout`` or ``sys.stderr`` whose writes cannot raise.

    Shutdown must never depend on the terminal: once a write or flush
    fails, the descriptor is pointed at /dev/null, so that every later
    write (print, logging, rich's refresh thread, click, the exit-time
    flush, a child process that inherits it) goes nowhere without an
    error, and what would have been shown is dropped. Everything else is
    the wrapped stream's; its ``buffer`` (binary writes, as click's
    completion makes) is steady too, and shares the failure."""

    def __init__(self, stream: IO[Any], owner: Steady | None = None) -> None:
        self._stream = stream
        self._owner = owner
        self._buffer: Steady | None = None
        self.failure: OSError | None = None

    def write(self, text: Any) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as exc:  # ValueError: a closed file
            self._lost(exc)
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self._lost(exc)

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            if self._buffer is None:
                self._buffer = Steady(self._stream.buffer, owner=self)  # type: ignore[attr-defined]
            return self._buffer
        return getattr(self._stream, name)

    def _lost(self, exc: OSError | ValueError) -> None:
        if self._owner is not None:
            self._owner._lost(exc)
            return
        if self.failure is not None:
            return
        self.failure = exc if isinstance(exc, OSError) else OSError(errno.EBADF, str(exc))
        try:
            fd = self._stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError):  # not a file (a test's capture): dropping is enough
            return
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
        finally:
            os.close(devnull)


def steady_streams() -> None:
    """Make sys.stdout and sys.stderr ``Steady`` (the command line's, once:
    a library never replaces its host's streams)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, Steady):
            setattr(sys, name, Steady(stream))


def lost(stream: Any = None) -> OSError | None:
    """Why ``stream`` (stdout by default) could not be written, if it could not."""
    stream = sys.stdout if stream is None else stream
    return stream.failure if isinstance(stream, Steady) else None


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def error_json(message: str, hint: str | None, details: str | None, exit_code: int) -> None:
    emit_json(
        {"error": {"message": message, "hint": hint, "details": details, "exit_code": exit_code}}
    )


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for JSON (``--json`` before any ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False
