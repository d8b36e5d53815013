"""Terminal output. The CLI layer (this module and ``commands/``) is the only
code that prints; the engine reports through the ``Reporter`` methods below.

Plain ``[INFO]`` lines are the requirements' format. A live spinner line is
drawn only on a terminal with colour allowed (not when piped, not with
NO_COLOR), and rich is imported only then."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from typing import IO, Any

from alvis_fsm.errors import AlvisError


def elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Status:
    """The spinner line, re-rendered by rich at every refresh so the clock runs."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.spinner: Any = None

    def __rich__(self) -> Any:
        from rich.spinner import Spinner

        r = self.reporter
        text = f"{r._status_text} ({elapsed(time.time() - r._status_since)})"
        if self.spinner is None:
            self.spinner = Spinner("dots", text=text)
        else:
            self.spinner.update(text=text)
        return self.spinner


class Verbosity(IntEnum):
    QUIET = 0
    NORMAL = 1
    VERBOSE = 2


def _fancy(stream: IO[str]) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class Reporter:
    """What the engine may say. Thread-safe: log lines arrive from a reader thread."""

    def __init__(self, verbosity: Verbosity = Verbosity.NORMAL, out: IO[str] | None = None) -> None:
        self.verbosity = verbosity
        self._lock = threading.RLock()
        # Called with the session record when the ready block is shown (the
        # commands hook desktop notifications here).
        self.on_ready: Callable[[Any], None] | None = None
        # ``out=sys.stderr`` in JSON mode: stdout then carries only the JSON.
        self._out = out or sys.stdout
        self._err = sys.stderr
        self._live: Any = None
        self._status_text = ""
        self._status_since = 0.0  # epoch seconds
        self._plain_gist = ""
        self._plain_at = 0.0

    # -- lines ------------------------------------------------------------
    def _write(self, text: str, stream: IO[str] | None = None) -> None:
        from alvis_fsm.text import inert

        # Model paths, scheduler reasons, vLLM's lines: other people's text,
        # never allowed to move the cursor or recolour the terminal.
        text = inert(text)
        # A terminal that went away (SIGHUP, closed pipe) does not raise
        # here: the command line's streams are steady (fronts/output.py).
        with self._lock:
            target = stream or self._out
            if self._live is not None and target.isatty():
                # The spinner's terminal: print above it, not through it.
                self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                target.write(text + "\n")
                target.flush()

    def info(self, message: str) -> None:
        # Progress goes to stderr, results to stdout (as gh, uv and kubectl do).
        if self.verbosity >= Verbosity.NORMAL:
            self._write(f"[INFO] {message}", self._err)

    def warn(self, message: str) -> None:
        self._write(f"[WARN] {message}", self._err)

    def result(self, message: str) -> None:
        """Lines that are the point of the command; printed even with --quiet."""
        self._write(message)

    def command(self, text: str) -> None:
        """An ssh or SLURM command being run (shown with --verbose)."""
        if self.verbosity >= Verbosity.VERBOSE:
            self._write(f"[CMD] {text}", self._err)

    def log_line(self, stream: str, line: str) -> None:
        tag = "[VLLM OUT]" if stream == "out" else "[VLLM ERR]"
        self._write(f"{tag} {line}")  # cleaned there

    # -- waiting ----------------------------------------------------------
    def waiting(self, text: str, since: float | None = None) -> None:
        """Update the live status line: what we wait for, and for how long
        (``since``: epoch seconds; the spinner keeps the clock running).

        On a terminal: a spinner line redrawn in place. Otherwise (piped,
        NO_COLOR, TERM=dumb): a plain [INFO] line when what we wait for
        changes, and at most once a minute while it does not."""
        from alvis_fsm.text import inert_line as clean

        text = clean(text)
        with self._lock:
            self._status_since = since if since is not None else self._status_since or time.time()
            if text == self._status_text:
                return
            self._status_text = text
            if self.verbosity < Verbosity.NORMAL:
                return
            if self._live is None and _fancy(self._err):
                self._start_live()
            if self._live is not None:
                return  # the renderable reads the new text at its next refresh
            now = time.monotonic()
            if text != self._plain_gist or now - self._plain_at >= 60:
                self._plain_gist, self._plain_at = text, now
                self._write(
                    f"[INFO] {text} ({elapsed(time.time() - self._status_since)})", self._err
                )

    def interrupted(self) -> None:
        """After ^C the terminal shows '^C' with no newline: start a fresh line."""
        self.done_waiting()
        if self._err.isatty():
            self._write("", self._err)

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._live = Live(
            _Status(self),
            console=Console(file=self._err),
            refresh_per_second=8,
            transient=True,
            # stdout carries results (maybe piped); never route it to stderr.
            redirect_stdout=False,
        )
        self._live.start()

    def done_waiting(self) -> None:
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
            self._status_text = ""

    def connected(self, record: Any, models: list[str], first_token_s: float | None = None) -> None:
        """The ready block: what to paste to use the server. Printed only
        once a 1-token completion came back through the tunnel."""
        if self.on_ready is not None:
            self.on_ready(record)
        base = f"{record.url}/v1"
        key = record.api_key or "EMPTY"
        name = record.served_name if record.served_name in models else None
        name = name or (models[0] if models else record.served_name)
        self.result(f"✓ Connection successful! Server available at {record.url}")
        if self.verbosity < Verbosity.NORMAL:
            return
        latency = []
        if first_token_s is not None:
            took = (
                f"{first_token_s * 1000:.0f} ms" if first_token_s < 1 else f"{first_token_s:.2f} s"
            )
            latency = [f"  First token: {took} (a 1-token completion, through the tunnel)"]
        self.result(
            "\n".join(
                [
                    f"  Model:    {name}",
                    f"  Base URL: {base}",
                    *latency,
                    "",
                    '  # paste into your shell (or: eval "$(alvis-fsm env ' + record.name + ')")',
                    f"  export OPENAI_BASE_URL={base}",
                    f"  export OPENAI_API_KEY={key}",
                    "",
                    f'  curl -s {base}/models -H "Authorization: Bearer $OPENAI_API_KEY"',
                    "",
                    "  from openai import OpenAI  # reads OPENAI_BASE_URL and OPENAI_API_KEY",
                    f'  r = OpenAI().chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Hi"}}])',
                    "  print(r.choices[0].message.content)",
                    "",
                ]
            )
        )

    # -- questions ----------------------------------------------------------
    def interactive(self) -> bool:
        return sys.stdin.isatty()

    def ask(self, prompt: str, secret: bool = False) -> str:
        """Ask the user (an ssh passphrase, a host-key question)."""
        self.done_waiting()
        with self._lock:
            if secret:
                import getpass

                return getpass.getpass(prompt)
            self._err.write(prompt)
            self._err.flush()
            return sys.stdin.readline().rstrip("\n")


def show_error(exc: AlvisError) -> None:
    from alvis_fsm.text import inert_line as clean

    # Details are another program's words (sbatch, ssh, vLLM): no escapes.
    err = sys.stderr
    err.write(f"[ERROR] {clean(exc.message)}\n")
    if exc.details:
        for line in exc.details.rstrip("\n").splitlines():
            err.write(f"    {clean(line)}\n")
    if exc.hint:
        for line in exc.hint.splitlines():
            err.write(f"[HINT] {clean(line)}\n")
    err.flush()
