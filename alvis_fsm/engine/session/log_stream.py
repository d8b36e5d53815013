"""vLLM's log lines streamed from the login node, with the job's end news.

One ssh channel runs the agent's ``stream`` (engine side: a process and a
reader thread): its ``O|``/``E|`` lines go to the observer as they come,
its ``EXITED``/``ENDED``/``GONE``/``UNKNOWN`` records are queued, as
``JobNews``, for the driver (``next_event``). A stream the remote side ends
on its own is restarted with the one backoff policy (``keep``), the first
time at once; a stream that ended because the shared connection went is
restarted once the connection is back. The stream's own small state: the
process, when it started, whether its end was already counted, whether
the person at the terminal was told how to stop, and the ``mark`` its
first start begins at.

The mark is where vLLM's logs stood when it was found ready (the agent's
READY, or ``Agent.mark`` for a session picked up served): taken before the
ready block is printed, so a request sent the moment it shows has its line
streamed, however late the stream itself starts."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Callable

from alvis_fsm.cluster.agent import JobNews, Mark, parse_log_line
from alvis_fsm.engine.session.link import Link
from alvis_fsm.retry import Backoff
from alvis_fsm.text import inert_line


class LogStream:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: queue.Queue[JobNews] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._since = 0.0
        self._dead = False  # its end already counted against the restarts
        self._told = False  # "Streaming logs (Ctrl+C …)" said once per client
        self.mark: Mark | None = None  # where the first start begins (else: new lines only)
        self._restarts = Backoff(first=0.5, most=60.0, immediate=True, healthy=30.0)

    def tell_once(self) -> None:
        """For a person at a terminal only (not the gateway's output, not
        the Python API's log): nobody else has a Ctrl+C."""
        if not self._told:
            self._told = True
            if self.link.ui.interactive():
                self.link.ui.info("Streaming logs (Ctrl+C to stop and cleanup)...")

    def start(self, lines: int, since: Mark | None = None) -> None:
        """Follow the logs from ``since``, else from their last ``lines``."""
        self.stop()
        link = self.link
        # A stop signal may raise between any two of these steps (the front's
        # handler raises in this thread): the process is ours to stop as soon
        # as it exists, and ``_reader`` only ever names a reader that started,
        # so ``stop`` on the way out has nothing half made to trip over.
        self.proc = link.agent.stream(
            link.record.run_dir,
            link.record.job_id,
            lines,
            check_every=link.settings.polling.job_check_interval,
            since=since,
        )
        self._since = time.monotonic()
        self._dead = False
        reader = threading.Thread(
            target=self._read, args=(self.proc,), name="log-reader", daemon=True
        )
        reader.start()
        self._reader = reader

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line[:2] in ("O|", "E|"):
                stream, text = parse_log_line(line)
                self.link.ui.log_line(stream, inert_line(text))
            elif news := JobNews.parse(line):
                self.events.put(news)

    def ended(self) -> bool:
        """Started, and its process has ended."""
        return self.proc is not None and self.proc.poll() is not None

    def keep(self, reopen: Callable[[], None]) -> None:
        """Keep the stream going (called about twice a second): start it,
        or restart an ended one. ``reopen`` (a callable) brings the shared
        connection back when the stream ended with it."""
        proc = self.proc
        if proc is None:
            # The lines written since the mark (vLLM found ready, before the
            # ready block), not the load log: replayed after the block it
            # would scroll it away (`alvis-fsm logs` shows it).
            since, self.mark = self.mark, None
            self.start(0, since)
            return
        if proc.poll() is None:
            return
        if not self.link.conn.alive():
            # The shared connection dropped (the stream was a channel on it):
            # reopen it; the job is untouched.
            self.link.ui.warn("Lost the connection to the login node; reconnecting...")
            reopen()
            self.start(0)
            return
        # The remote side ended the stream on its own: restart it, but back
        # off (up to a minute) and say why, so a remote that keeps failing
        # cannot make us spin.
        restarts = self._restarts
        if not self._dead:
            self._dead = True
            if restarts.failed(time.monotonic() - self._since) >= 3:
                said = _stderr_of(proc)
                self.link.ui.warn(
                    "The log stream keeps stopping"
                    + (f" ({said})" if said else "")
                    + f"; retrying in {restarts.delay:.0f} s (the job is untouched)"
                )
        if restarts.due():
            self.start(0)

    def next_event(self, timeout: float) -> JobNews | None:
        """The next news about the job, or None after ``timeout`` s."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        proc = self.proc
        self.proc = None
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


def _stderr_of(proc: subprocess.Popen[bytes]) -> str:
    """The last line an ended stream's ssh wrote on stderr (for a warning)."""
    try:
        data = proc.stderr.read(4096) if proc.stderr is not None else b""
    except (OSError, ValueError):
        return ""
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return inert_line(lines[-1])[:200] if lines else ""
