"""The node-side batch runner: one shard of a batch, sent to vLLM.

Shipped into the batch's run directory and run on the compute node with the
Python of the vLLM container (or the host's ``python3``), so it uses the
standard library only: one ``asyncio`` event loop with a minimal HTTP/1.1
client over the server's unix socket (``--concurrency`` keep-alive
connections, one request in flight on each), ``json``, and the package's one
retry policy (``alvis_fsm/retry.py``,
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
import asyncio
import json
import os
import secrets
import signal
import sys
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
READ_LIMIT = 1 << 24  # longest header block or chunk-size line the client reads
DRAIN_POLL_S = 0.05

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


class HTTPError(Exception):
    """The server's answer was not HTTP/1.1 as expected."""


# A request that failed this way was not answered: transient, retried.
FAILURES = (
    OSError,
    EOFError,
    ValueError,
    HTTPError,
    asyncio.TimeoutError,
    asyncio.LimitOverrunError,
)


class Connection:
    """One keep-alive HTTP/1.1 connection over the server's unix socket: a
    minimal client (Content-Length and chunked answers), one request at a
    time, opened on first use and again after the server closed it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, str]:
        """(status, body, x-request-id) of one POST. A kept-alive connection
        the server closed meanwhile is opened again once, at no cost."""
        reused = self.writer is not None
        try:
            return await asyncio.wait_for(self._exchange(path, body, headers), TIMEOUT_S)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.close()
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise  # not a kept-alive connection the server had closed
        except BaseException:
            self.close()
            raise
        try:
            return await asyncio.wait_for(self._exchange(path, body, headers), TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    async def _exchange(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, str]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_unix_connection(
                self.path, limit=READ_LIMIT
            )
        assert self.reader is not None
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode("latin-1") + body)
        await self.writer.drain()
        status, fields = await self._head()
        if status in (204, 304):
            data = b""  # no body, whatever the fields say
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            data = await self._chunked()
        elif "content-length" in fields:
            data = await self.reader.readexactly(int(fields["content-length"]))
        else:  # neither: the body runs to the end of the connection
            data = await self.reader.read()
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, data, fields.get("x-request-id", "")

    async def _head(self) -> tuple[int, dict[str, str]]:
        """The status and the header fields (names in lower case) of an answer."""
        assert self.reader is not None
        while True:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise HTTPError(f"not an HTTP answer: {lines[0][:80]!r}")
            status = int(parts[1])
            if status >= 200 or status == 101:
                break  # 1xx (100 Continue) precede the answer
        fields: dict[str, str] = {}
        for text in lines[1:]:
            name, sep, value = text.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        return status, fields

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HTTPError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields, then the blank line
                return b"".join(parts)
            parts.append((await self.reader.readexactly(size + 2))[:-2])


class ServerGone(Exception):
    pass


class ShardRunner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = os.environ.get("VLLM_API_KEY", "")
        self.results_path = os.path.join(args.out, RESULTS.format(args.shard))
        self.progress_path = os.path.join(args.out, PROGRESS.format(args.shard))
        self.stopping = False
        self.stopped_at = 0.0  # time.monotonic() of the stop
        self.why = ""
        self.server_gone = ""
        self.done = 0
        self.failed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.sent_now = 0
        self.total = 0
        self.pending = 0  # lines queued or in flight
        self.started = time.time()
        self.last_sync = time.monotonic()
        self.last_progress = time.monotonic()
        self.span = (0, 0)  # this shard's input lines [start, end)
        self.handle: Any = None
        self.sent = 0  # requests sent by this run (a retry counts once)
        self.grace = grace_after_warning(
            os.path.join(os.path.dirname(os.path.abspath(args.input)), SETTINGS)
        )

    # -- signals ------------------------------------------------------------
    def on_signal(self, signum: int, _frame: Any) -> None:
        self.why = "time limit" if signum == signal.SIGUSR1 else "signal"
        if signum != signal.SIGUSR1:
            self.grace = min(self.grace, TERM_GRACE_S)
        self.halt()

    def halt(self) -> None:
        """Take no more lines (the signal handler, the deadline, a server gone)."""
        if not self.stopping:
            self.stopping = True
            self.stopped_at = time.monotonic()

    # -- results ------------------------------------------------------------
    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, separators=(",", ":")) + "\n"
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
    async def one(self, conn: Connection, index: int, text: str) -> dict[str, Any] | None:
        req = json.loads(text)
        body = json.dumps(req["body"]).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        self.sent += 1
        backoff = Backoff(first=BACKOFF_FIRST, most=BACKOFF_MOST)
        last = ""
        for attempt in range(RETRIES + 1):
            try:
                status, data, request_id = await conn.request(self.args.url_path, body, headers)
            except FAILURES as exc:
                last = f"{type(exc).__name__}: {exc}"
                status, data, request_id = 0, b"", ""
            if status and not (transient(status) and attempt < RETRIES):
                try:
                    parsed: Any = json.loads(data) if data else None
                except ValueError:
                    parsed = data.decode("utf-8", "replace")
                return {
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
            if self.stopping and attempt > 0:
                return None  # abandoned: redone by the successor
            backoff.failed()
            await asyncio.sleep(backoff.delay)
        raise ServerGone(last or "the server did not answer")

    async def worker(self, work: asyncio.Queue[tuple[int, str]]) -> None:
        """Lines from the queue, one request at a time on one kept-alive connection."""
        conn = Connection(self.args.socket)
        try:
            while True:
                index, text = await work.get()
                try:
                    if not self.server_gone:
                        row = await self.one(conn, index, text)
                        if row is not None:
                            self.write(row)
                except ServerGone as exc:
                    self.server_gone = f"the server stopped answering ({exc})"
                    self.halt()
                finally:
                    self.pending -= 1
        finally:
            conn.close()

    # -- the shard ----------------------------------------------------------
    def run(self) -> int:
        """Resume, send the lines, drain, record: the exit status."""
        done = self.resume()
        expired = asyncio.run(self.shard(done))
        self.record_run()
        return self.finish(expired)

    async def shard(self, done: set[str]) -> bool:
        """One event loop: ``concurrency`` workers fed from a bounded queue;
        True when the batch's completion window ended it."""
        work: asyncio.Queue[tuple[int, str]] = asyncio.Queue(maxsize=self.args.concurrency * 2)
        workers = [asyncio.ensure_future(self.worker(work)) for _ in range(self.args.concurrency)]
        try:
            expired = await self.feed(work, done)
            await self.drain(work)
        finally:
            for task in workers:
                task.cancel()  # idle, or abandoned in flight: redone by the successor
            await asyncio.gather(*workers, return_exceptions=True)
        return expired

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

    async def feed(self, work: asyncio.Queue[tuple[int, str]], done: set[str]) -> bool:
        """Queue this shard's lines not done yet, until they run out or a
        stop; True when the batch's completion window ended it."""
        for index, text in read_lines(self.args.input, *self.span):
            if json.loads(text).get("custom_id") in done:
                continue
            while not self.stopping:
                if self.args.deadline and time.time() >= self.args.deadline:
                    self.halt()
                    return True
                if await self.put(work, (index, text)):
                    break
                self.tick()
            if self.stopping:
                return False
            self.tick()
        return False

    async def put(self, work: asyncio.Queue[tuple[int, str]], item: tuple[int, str]) -> bool:
        """Queue one line, waiting at most 0.2 s for room: whether it went in."""
        if work.full():
            try:
                await asyncio.wait_for(work.put(item), 0.2)
            except asyncio.TimeoutError:  # noqa: UP041 (not the builtin before Python 3.11)
                return False
        else:
            work.put_nowait(item)
        self.pending += 1
        return True

    async def drain(self, work: asyncio.Queue[tuple[int, str]]) -> None:
        """No more lines: let the workers empty the queue (or, when stopping,
        skip what is queued) and finish what is in flight, within the grace
        when stopping (what is still in flight then is redone by the
        successor)."""
        fed = time.monotonic()
        while self.pending > 0:
            if self.stopping:
                while not work.empty():
                    work.get_nowait()
                    self.pending -= 1
                if time.monotonic() >= max(fed, self.stopped_at) + self.grace:
                    return  # abandoned in flight: redone by the successor
            self.tick()
            await asyncio.sleep(DRAIN_POLL_S)

    def record_run(self) -> None:
        """Flush and fsync the results; one line in the shard's runs file."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        written = self.sent_now
        with open(
            os.path.join(self.args.out, RUNS.format(self.args.shard)), "a", encoding="utf-8"
        ) as runs:
            runs.write(
                json.dumps(
                    {
                        "started": self.started,
                        "ended": time.time(),
                        "sent": self.sent,
                        "written": written,
                        "why": self.why or self.server_gone,
                    }
                )
                + "\n"
            )

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
    runner = ShardRunner(args)
    code = runner.run()
    if code != EXIT_DONE:
        print(
            f"batch runner: shard {args.shard}: {runner.why or runner.server_gone or 'stopped'}",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
