"""The node-side batch runner: one shard of a batch, sent to vLLM.

Shipped into the batch's run directory and run on the compute node with the
Python of the vLLM container (or the host's ``python3``), so it uses the
standard library only: ``http.client`` over the server's unix socket,
threads, ``json``, and the package's one retry policy (``alvis_fsm/retry.py``,
itself stdlib-only, shipped next to it as ``retry.py``).

    python3 batch_runner.py run --input IN --shard K --shards N --out DIR \\
        --socket PATH [--concurrency C] [--deadline EPOCH] [--url-path /v1/...]

Shard K of N takes the input's lines [K*L//N, (K+1)*L//N) (L lines in all),
so the shards are contiguous and the merge keeps input order. Each result
is appended to ``DIR/shard-K.jsonl`` the moment it completes (one line,
flushed; fsync at least every ``FSYNC_S`` seconds and at the end), and
``DIR/shard-K.progress`` (JSON, replaced atomically about once a second)
says how far it got.

**Resumable.** On start the runner reads its own results file, cuts off a
last line a kill left half-written, and skips every ``custom_id`` already
there: a requeued or successor shard redoes at most what was in flight.

**Stopping.** SIGUSR1 (the job's time-limit warning) or SIGTERM: take no
more lines, give the requests in flight ``GRACE_S`` seconds (at most half
the warning time), flush, exit 3 (work left: the job script starts a
successor). Past ``--deadline`` (the
batch's completion window, the cluster's clock) it stops the same way and
exits 4. A server that stops answering (connection refused or reset past the
retries) exits 5 with nothing written for the lines it could not send.

**Failures.** 2xx: the output file. A refusal (4xx other than 408/429): the
error file at once, never retried. Transient (connection errors, 408, 429,
5xx): retried with exponential backoff; a 5xx that persists past the retries
is written as an error (the server answers, so it is the request's answer).

Why not ``vllm run-batch``: in vLLM 0.11 it submits every line at once and
writes the results only at the end (a killed job loses all of them), cannot
resume, and has no ``/v1/completions``."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

try:
    from alvis_fsm.retry import Backoff
except ImportError:  # on the node: shipped next to this file
    from retry import Backoff  # type: ignore[no-redef,import-untyped,unused-ignore]

FSYNC_S = 2.0
PROGRESS_S = 1.0
GRACE_S = 20.0  # after the time-limit warning: in-flight requests may finish
# Requests in flight: all Alvis GPUs get vLLM 0.11's default running batch
# (max_num_seqs 256; 128 on the CPU build), so the engine's batches are as
# full as with `vllm run-batch`, which hands it every line at once.
CONCURRENCY = 256
# Written by the client next to the input: {"warn_s": T} of the job's
# --signal=B:USR1@T, so the grace ends well before the limit's SIGTERM.
SETTINGS = "runner.json"
TERM_GRACE_S = 1.0  # after SIGTERM (scancel, requeue): SLURM kills soon, flush now
RETRIES = 6
BACKOFF_FIRST = 0.5
BACKOFF_MOST = 30.0
TIMEOUT_S = 600.0

EXIT_DONE = 0
EXIT_STOPPED = 3
EXIT_EXPIRED = 4
EXIT_SERVER = 5

RESULTS = "shard-{}.jsonl"
PROGRESS = "shard-{}.progress"
RUNS = "shard-{}.runs"  # one line per run of the shard: what it sent and wrote (benchmarks)


def shard_range(total: int, shard: int, shards: int) -> tuple[int, int]:
    """The input lines [start, end) of shard ``shard`` of ``shards``."""
    return total * shard // shards, total * (shard + 1) // shards


def count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                n += 1
    return n


def read_lines(path: str, start: int, end: int) -> Iterator[tuple[int, str]]:
    """(index, text) of the non-blank input lines with start <= index < end."""
    i = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            if i >= end:
                return
            if i >= start:
                yield i, line
            i += 1


def recover(path: str) -> dict[str, dict[str, Any]]:
    """The results already written (custom_id -> line), after cutting off
    a last line that a kill left incomplete. Nothing is lost: a cut line is
    one whose request was not recorded, so it is sent again."""
    done: dict[str, dict[str, Any]] = {}
    if not os.path.exists(path):
        return done
    good = 0
    with open(path, "rb") as handle:
        data = handle.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: the write was cut
        raw = data[pos:nl]
        try:
            row = json.loads(raw)
        except ValueError:
            break  # a damaged line: keep what precedes it
        if isinstance(row, dict) and isinstance(row.get("custom_id"), str):
            done.setdefault(row["custom_id"], row)
        pos = nl + 1
        good = pos
    if good != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return done


def grace_after_warning(path: str = SETTINGS) -> float:
    """Seconds the requests in flight get after the time-limit warning:
    GRACE_S, but at most half the warning time (``runner.json`` next to
    the input, in the run directory), so the runner has flushed and the job script has submitted
    the successor before SLURM's SIGTERM at the limit."""
    try:
        with open(path, encoding="utf-8") as handle:
            warn = float(json.load(handle)["warn_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return GRACE_S
    return max(1.0, min(GRACE_S, warn / 2))


def is_ok(row: dict[str, Any]) -> bool:
    response = row.get("response")
    return (
        row.get("error") is None
        and isinstance(response, dict)
        and isinstance(response.get("status_code"), int)
        and 200 <= response["status_code"] < 300
    )


def transient(status: int) -> bool:
    return status in (408, 429) or status >= 500


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class ServerGone(Exception):
    pass


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = os.environ.get("VLLM_API_KEY", "")
        self.results_path = os.path.join(args.out, RESULTS.format(args.shard))
        self.progress_path = os.path.join(args.out, PROGRESS.format(args.shard))
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.why = ""
        self.server_gone = ""
        self.done = 0
        self.failed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.sent_now = 0
        self.total = 0
        self.started = time.time()
        self.last_sync = time.monotonic()
        self.last_progress = time.monotonic()
        self.span = (0, 0)  # this shard's input lines [start, end)
        self.handle: Any = None
        self.sent = 0  # requests sent by this run (a retry counts once)
        self.grace = grace_after_warning(os.path.join(os.path.dirname(os.path.abspath(args.input)), SETTINGS))

    # -- signals ------------------------------------------------------------
    def on_signal(self, signum: int, _frame: Any) -> None:
        self.why = "time limit" if signum == signal.SIGUSR1 else "signal"
        if signum != signal.SIGUSR1:
            self.grace = min(self.grace, TERM_GRACE_S)
        self.stop.set()

    # -- results ------------------------------------------------------------
    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, separators=(",", ":")) + "\n"
        with self.lock:
            self.handle.write(line)
            self.handle.flush()
            self.sent_now += 1
            self.count(row)
            if time.monotonic() - self.last_sync >= FSYNC_S:
                os.fsync(self.handle.fileno())
                self.last_sync = time.monotonic()

    def count(self, row: dict[str, Any]) -> None:
        if is_ok(row):
            self.done += 1
            body = row["response"].get("body")
            usage = body.get("usage") if isinstance(body, dict) else None
            if isinstance(usage, dict):
                self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.completion_tokens += int(usage.get("completion_tokens") or 0)
        else:
            self.failed += 1

    def progress(self, state: str) -> None:
        now = time.time()
        data = {
            "shard": self.args.shard,
            "total": self.total,
            "completed": self.done,
            "errored": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "state": state,
            "why": self.why or self.server_gone,
            "this_run": self.sent_now,
            "run_started": self.started,
            "updated": now,
        }
        tmp = f"{self.progress_path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, self.progress_path)

    # -- requests -----------------------------------------------------------
    def send(self, conn: UnixHTTPConnection | None, body: bytes) -> tuple[UnixHTTPConnection, int, bytes, str]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        conn = conn or UnixHTTPConnection(self.args.socket)
        try:
            conn.request("POST", self.args.url_path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return conn, resp.status, data, resp.getheader("x-request-id") or ""
        except Exception:
            conn.close()
            raise

    def one(self, conn: UnixHTTPConnection | None, index: int, text: str) -> tuple[UnixHTTPConnection | None, dict[str, Any] | None]:
        req = json.loads(text)
        body = json.dumps(req["body"]).encode()
        with self.lock:
            self.sent += 1
        backoff = Backoff(first=BACKOFF_FIRST, most=BACKOFF_MOST)
        last = ""
        for attempt in range(RETRIES + 1):
            try:
                conn, status, data, request_id = self.send(conn, body)
            except (OSError, http.client.HTTPException) as exc:
                conn = None
                last = f"{type(exc).__name__}: {exc}"
                status, data, request_id = 0, b"", ""
            if status and not (transient(status) and attempt < RETRIES):
                try:
                    parsed: Any = json.loads(data) if data else None
                except ValueError:
                    parsed = data.decode("utf-8", "replace")
                return conn, {
                    "id": "batch_req_" + secrets.token_hex(12),
                    "custom_id": req["custom_id"],
                    "response": {
                        "status_code": status,
                        "request_id": request_id or "req_" + secrets.token_hex(12),
                        "body": parsed,
                    },
                    "error": None,
                    "_i": index,  # internal (dropped by the merge): input line, completion time
                    "_t": round(time.time(), 3),
                }
            if self.stop.is_set() and attempt > 0:
                return conn, None  # abandoned: redone by the successor
            backoff.failed()
            backoff.wait()
        raise ServerGone(last or "the server did not answer")

    def worker(self, work: queue.Queue[tuple[int, str] | None]) -> None:
        conn: UnixHTTPConnection | None = None
        while True:
            item = work.get()
            if item is None:
                break
            if self.server_gone:
                continue
            try:
                conn, row = self.one(conn, *item)
            except ServerGone as exc:
                self.server_gone = f"the server stopped answering ({exc})"
                self.stop.set()
                continue
            if row is not None:
                self.write(row)
        if conn is not None:
            conn.close()

    # -- the shard ----------------------------------------------------------
    def run(self) -> int:
        """Resume, feed the lines to the workers, drain, record: the exit status."""
        done = self.resume()
        work: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=self.args.concurrency * 2)
        threads = [
            threading.Thread(target=self.worker, args=(work,), daemon=True)
            for _ in range(self.args.concurrency)
        ]
        for t in threads:
            t.start()
        expired = self.feed(work, done)
        self.drain(work, threads)
        self.record_run()
        return self.finish(expired)

    def resume(self) -> set[str]:
        """Open the results file after what a previous run wrote (counted
        again); the custom_ids already done."""
        args = self.args
        os.makedirs(args.out, exist_ok=True)
        done = recover(self.results_path)
        for row in done.values():
            self.count(row)
        self.span = shard_range(count_lines(args.input), args.shard, args.shards)
        self.total = self.span[1] - self.span[0]
        self.handle = open(self.results_path, "a", encoding="utf-8")  # noqa: SIM115
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        self.progress("running")
        return set(done)

    def tick(self) -> None:
        """The progress file, about once a second."""
        if time.monotonic() - self.last_progress >= PROGRESS_S:
            self.progress("running")
            self.last_progress = time.monotonic()

    def feed(self, work: queue.Queue[tuple[int, str] | None], done: set[str]) -> bool:
        """Queue this shard's lines not done yet, until they run out or a
        stop; True when the batch's completion window ended it."""
        for index, text in read_lines(self.args.input, *self.span):
            if json.loads(text).get("custom_id") in done:
                continue
            while not self.stop.is_set():
                if self.args.deadline and time.time() >= self.args.deadline:
                    self.stop.set()
                    return True
                try:
                    work.put((index, text), timeout=0.2)
                    break
                except queue.Full:
                    self.tick()
            if self.stop.is_set():
                return False
            self.tick()
        return False

    def drain(self, work: queue.Queue[tuple[int, str] | None], threads: list[threading.Thread]) -> None:
        """No more lines: let the workers empty the queue (or, when stopping,
        skip what is queued) and finish what is in flight, within the grace
        when stopping (what is still in flight then is redone by the
        successor)."""
        if self.stop.is_set():
            while True:
                try:
                    work.get_nowait()
                except queue.Empty:
                    break
        for _ in threads:
            work.put(None)
        stopping_since = time.monotonic()
        for t in threads:
            while t.is_alive():
                if self.stop.is_set() and time.monotonic() >= stopping_since + self.grace:
                    return  # abandoned in flight: redone by the successor
                self.tick()
                t.join(timeout=0.2)

    def record_run(self) -> None:
        """Flush and fsync the results; one line in the shard's runs file."""
        with self.lock:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            written = self.sent_now
        with open(os.path.join(self.args.out, RUNS.format(self.args.shard)), "a", encoding="utf-8") as runs:
            runs.write(json.dumps({"started": self.started, "ended": time.time(), "sent": self.sent,
                                   "written": written, "why": self.why or self.server_gone}) + "\n")

    def finish(self, expired: bool) -> int:
        """The last progress state and the exit status that says it."""
        if self.server_gone:
            self.progress("server_failed")
            return EXIT_SERVER
        if self.done + self.failed >= self.total:
            self.progress("done")
            return EXIT_DONE
        if expired:
            self.progress("expired")
            return EXIT_EXPIRED
        self.progress("stopped")
        return EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batch_runner.py")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--input", required=True)
    run.add_argument("--shard", type=int, required=True)
    run.add_argument("--shards", type=int, required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--socket", required=True)
    run.add_argument("--concurrency", type=int, default=CONCURRENCY)
    run.add_argument("--deadline", type=float, default=0.0)
    run.add_argument("--url-path", default="/v1/chat/completions")
    args = parser.parse_args(argv)
    if not 0 <= args.shard < args.shards or args.concurrency < 1:
        parser.error("need 0 <= shard < shards and concurrency >= 1")
    runner = Runner(args)
    code = runner.run()
    if code != EXIT_DONE:
        print(f"batch runner: shard {args.shard}: {runner.why or runner.server_gone or 'stopped'}",
              file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
