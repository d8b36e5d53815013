"""Batches (issue 23), the pure parts and the node-side runner: validation
with line numbers, the status read from the cluster's answer (missing
information is not bad news), the merge (every custom_id once, in input
order), and the runner against a real HTTP server on a unix socket
(classification, retries, resume after a cut, no duplicates)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from alvis_fsm.cluster.remote import batch_runner
from alvis_fsm.engine.batch import input as batch_input
from alvis_fsm.engine.batch import record as batch_record
from alvis_fsm.engine.batch import report as batch_report
from alvis_fsm.engine.batch import results as batch_results
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord, BatchStore
from alvis_fsm.errors import UsageError

RESOLVE = {
    "lab-ok": ("lab-ok", "alvislab/tiny-ok"),
    "alvislab/tiny-ok": ("lab-ok", "alvislab/tiny-ok"),
    "other": ("other", "org/other"),
}


def line(
    cid: str, url: str = "/v1/chat/completions", model: str | None = "lab-ok", **extra: Any
) -> str:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": cid}]}
    if url == "/v1/completions":
        body = {"prompt": cid}
    if url == "/v1/embeddings":
        body = {"input": cid}
    if model is not None:
        body["model"] = model
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **extra})


# -- validation ---------------------------------------------------------------


def test_a_good_file_is_rewritten_with_the_served_name() -> None:
    valid = batch_input.validate([line("a"), "", line("b", model="alvislab/tiny-ok")], RESOLVE)
    assert (
        list(valid.iter_ids()) == ["a", "b"]
        and valid.model == "lab-ok"
        and valid.endpoint == "/v1/chat/completions"
    )
    assert all(
        json.loads(text)["body"]["model"] == "alvislab/tiny-ok"
        for text in valid.requests_path.read_text().splitlines()
    )


def test_the_model_flag_fills_a_missing_model() -> None:
    valid = batch_input.validate([line("a", model=None), line("b")], RESOLVE, "lab-ok")
    assert (
        valid.served_name == "alvislab/tiny-ok"
        and len(valid.requests_path.read_text().splitlines()) == 2
    )


@pytest.mark.parametrize(
    ("lines", "flag", "words"),
    [
        ([line("a"), "{not json"], None, "Line 2: not valid JSON"),
        (
            [line("a"), line("b"), line("a")],
            None,
            "Line 3: duplicate custom_id 'a' (first on line 1)",
        ),
        (
            [line("a"), line("b", url="/v1/completions")],
            None,
            "Line 2: url '/v1/completions' differs",
        ),
        (
            [line("a"), line("b", model="other")],
            None,
            "Line 2: model 'other' differs from 'lab-ok'",
        ),
        ([line("a", model="nosuch")], None, "Line 1: unknown model 'nosuch'"),
        ([line("a", model=None)], None, "Line 1: body.model is missing"),
        ([line("a", model="other")], "lab-ok", "Line 1: model 'other' differs from 'lab-ok'"),
        (
            [json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}})],
            None,
            'Line 1: method must be "POST"',
        ),
        ([line("a", url="/v1/responses")], None, "Line 1: url '/v1/responses' is not one of"),
        ([line("a"), "[1, 2]"], None, "Line 2: a request must be a JSON object"),
        ([line("a", extra_key=1)], None, "Line 1: unknown key(s) 'extra_key'"),
        (
            [json.dumps({"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {}})],
            None,
            "Line 1: custom_id must be a non-empty string",
        ),
        (["", "  "], None, "The batch file holds no requests"),
        ([line("a")], "nosuch", "-m/--model: unknown model 'nosuch'"),
    ],
)
def test_bad_input_is_refused_with_the_line(lines: list[str], flag: str | None, words: str) -> None:
    with pytest.raises(UsageError) as info:
        batch_input.validate(lines, RESOLVE, flag)
    assert words in info.value.message
    assert info.value.exit_code == 2


def test_the_cli_refuses_a_bad_file_before_any_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alvis_fsm.fronts.cli.main import main

    path = tmp_path / "in.jsonl"
    path.write_text(line("a", model="gpt-oss-20b") + "\n" + "{oops\n")
    state = tmp_path / "state"
    monkeypatch.setenv("ALVIS_FSM_SESSION__STATE_DIR", str(state))
    monkeypatch.setenv("ALVIS_FSM_SSH__HOST", "host.invalid")
    with pytest.raises(SystemExit) as exited:
        main(["batch", "submit", str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Line 2: not valid JSON" in err and "Nothing was uploaded or submitted" in err
    assert not (state / "batches").exists()


# -- status from the cluster's answer ------------------------------------------


def record(shards: int = 2, status: BatchStatus = BatchStatus.VALIDATING) -> BatchRecord:
    return BatchRecord(
        id="batch_0123456789abcdef",
        model="lab-ok",
        served_name="s",
        endpoint="/v1/completions",
        total=10,
        shards=shards,
        run_dir="/r",
        job_name="alvis-fsm-x",
        created_at=1,
        status=status.value,
    )


def progress(k: int, state: str, completed: int, failed: int = 0) -> str:
    data = {
        "shard": k,
        "state": state,
        "completed": completed,
        "errored": failed,
        "prompt_tokens": 3 * completed,
        "completion_tokens": 7 * completed,
    }
    return f"PROGRESS|{k}|{json.dumps(data)}"


def answer(*lines: str, now: int = 100, deadline: int = 1000) -> batch_report.BatchReport:
    return batch_report.parse_status("\n".join([f"NOW|{now}", f"DEADLINE|{deadline}", *lines]))


def test_running_shards_are_in_progress_with_their_counts() -> None:
    r = batch_report.apply(record(), answer(progress(0, "running", 3, 1), "QUEUE|5_0|RUNNING|None"))
    assert r.status == BatchStatus.IN_PROGRESS and (r.completed, r.failed) == (3, 1)
    assert r.prompt_tokens == 9 and r.completion_tokens == 21 and r.times["in_progress_at"] == 100


def test_every_shard_done_is_completed() -> None:
    r = batch_report.apply(record(), answer(progress(0, "done", 5), progress(1, "done", 4, 1)))
    assert r.status == BatchStatus.COMPLETED and r.completed == 9 and r.times["completed_at"] == 100


def test_every_line_run_while_a_job_still_finishes_is_finalizing_then_completed() -> None:
    done = (progress(0, "done", 5), progress(1, "done", 4, 1))
    r = batch_report.apply(record(), answer(*done, "QUEUE|5_1|COMPLETING|None"))
    assert (
        r.status == BatchStatus.FINALIZING
        and r.times["finalizing_at"] == 100
        and "completed_at" not in r.times
    )
    assert (
        batch_record.openai_object(r)["status"] == "finalizing"
        and batch_record.openai_object(r)["completed_at"] is None
    )
    r = batch_report.apply(r, answer(*done, now=107))
    assert r.status == BatchStatus.COMPLETED and (
        r.times["finalizing_at"],
        r.times["completed_at"],
    ) == (100, 107)
    view = batch_record.openai_object(
        r, assembling=True
    )  # the gateway, while it downloads the files
    assert (view["status"], view["finalizing_at"], view["completed_at"]) == (
        "finalizing",
        100,
        None,
    )
    assert batch_record.openai_object(r)["status"] == "completed" and r.times["completed_at"] == 107


def test_the_grace_after_the_warning_is_at_most_half_of_it(tmp_path: Path) -> None:
    path = tmp_path / batch_runner.SETTINGS
    assert (
        batch_runner.grace_after_warning(str(path)) == batch_runner.GRACE_S
    )  # no file: the default
    for text, grace in (
        ('{"warn_s": 15}', 7.5),
        ('{"warn_s": 120}', batch_runner.GRACE_S),
        ('{"warn_s": 1}', 1.0),
        ("{", batch_runner.GRACE_S),
        ("{}", batch_runner.GRACE_S),
    ):
        path.write_text(text)
        assert batch_runner.grace_after_warning(str(path)) == grace, text


def test_an_unanswered_queue_does_not_end_a_batch() -> None:
    snap = answer(progress(0, "stopped", 2), "QUEUE_UNKNOWN|squeue: Socket timed out", deadline=50)
    r = batch_report.apply(record(status=BatchStatus.IN_PROGRESS), snap)
    assert r.status == BatchStatus.IN_PROGRESS and not r.error


def test_a_shard_that_failed_for_good_fails_the_batch_once_nothing_runs() -> None:
    cause = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    running = batch_report.apply(record(), answer(f"FAILED|0|{cause}", "QUEUE|5_1|RUNNING|None"))
    assert running.status == BatchStatus.IN_PROGRESS
    r = batch_report.apply(record(), answer(f"FAILED|0|{cause}", progress(1, "done", 5)))
    assert r.status == BatchStatus.FAILED and r.error == f"shard 0: {cause}" and r.completed == 5


def test_past_the_window_with_nothing_running_is_expired() -> None:
    r = batch_report.apply(
        record(), answer(progress(0, "expired", 2), "EXPIRED|0", progress(1, "done", 5))
    )
    assert r.status == BatchStatus.EXPIRED


def test_cancel_is_cancelling_until_the_queue_is_empty() -> None:
    assert (
        batch_report.apply(record(), answer("CANCELLED|1", "QUEUE|5_0|RUNNING|None")).status
        == BatchStatus.CANCELLING
    )
    assert (
        batch_report.apply(record(), answer("CANCELLED|1", "QUEUE_UNKNOWN|x")).status
        == BatchStatus.CANCELLING
    )
    assert batch_report.apply(record(), answer("CANCELLED|1")).status == BatchStatus.CANCELLED


def test_jobs_gone_without_the_shards_done_is_a_failure_named() -> None:
    r = batch_report.apply(record(), answer(progress(0, "done", 5), progress(1, "stopped", 2)))
    assert r.status == BatchStatus.FAILED and r.error.startswith("shard 1: its job ended")


def test_an_ended_batch_is_not_changed() -> None:
    r = record(status=BatchStatus.CANCELLED)
    assert (
        batch_report.apply(r, answer(progress(0, "done", 5), progress(1, "done", 5))).status
        == BatchStatus.CANCELLED
    )


def test_a_cut_record_is_ignored() -> None:
    snap = batch_report.parse_status('NOW|100\nPROGRESS|0|{"state": "run\nQUEUE|1_0|RUNNING|None')
    assert snap.progress == {} and snap.queue == [("1_0", "RUNNING", "None")]


# -- merge --------------------------------------------------------------------


def row(cid: str, code: int = 200, index: int = 0) -> dict[str, Any]:
    return {
        "id": "batch_req_1",
        "custom_id": cid,
        "_i": index,
        "response": {"status_code": code, "request_id": "r", "body": {}},
        "error": None,
    }


def test_merge_keeps_input_order_each_id_once_and_names_what_was_not_run() -> None:
    ids = ["a", "b", "c", "d"]
    rows = [row("c"), row("a"), row("b", 400), row("a")]
    merged = list(batch_results.merge(ids, rows, BatchStatus.EXPIRED))
    assert [r["custom_id"] for _, r in merged] == ids
    assert [ok for ok, _ in merged] == [True, False, True, False]
    assert merged[3][1]["error"]["code"] == "batch_expired" and merged[3][1]["response"] is None
    assert all("_i" not in r for _, r in merged)


def test_merge_of_a_running_batch_gives_only_what_is_done() -> None:
    merged = list(batch_results.merge(["a", "b"], [row("b")], BatchStatus.IN_PROGRESS))
    assert [r["custom_id"] for _, r in merged] == ["b"]


def test_the_store_round_trips_and_lists(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    r = record()
    store.save(r, ["x", "y"])
    assert store.load(r.id) == r and list(store.iter_ids(r.id)) == ["x", "y"] and store.all() == [r]
    assert oct((tmp_path / "batches").stat().st_mode & 0o777) == "0o700"


# -- the runner ---------------------------------------------------------------


class Server:
    """A small HTTP server on a unix socket, answering as vLLM would:
    ``plan`` maps a custom_id (the prompt) to the statuses of its attempts."""

    def __init__(self, path: str, plan: dict[str, list[int]], delay: float = 0.0) -> None:
        self.path = path
        self.plan = plan
        self.seen: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                cid = body["prompt"]
                with outer.lock:
                    outer.seen.append(cid)
                    codes = outer.plan.get(cid, [])
                    code = codes.pop(0) if codes else 200
                if delay:
                    time.sleep(delay)
                if self.headers.get("Authorization") != "Bearer k":
                    code = 401
                data = json.dumps(
                    {
                        "object": "text_completion",
                        "usage": {"prompt_tokens": 2, "completion_tokens": 3},
                    }
                    if code == 200
                    else {"error": {"message": f"status {code}"}}
                ).encode()
                self.send_response(code)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

            def get_request(self) -> Any:
                request, _ = super().get_request()
                return request, ("local", 0)

        self.server = UnixServer(path, Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sock() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="afsm-t", dir="/tmp") as d:
        yield os.path.join(d, "s.sock")


def make_input(path: Path, n: int) -> list[str]:
    ids = [f"c{i}" for i in range(n)]
    path.write_text("".join(line(cid, url="/v1/completions") + "\n" for cid in ids))
    return ids


def run_shard(
    tmp: Path,
    sock: str,
    shard: int = 0,
    shards: int = 1,
    concurrency: int = 4,
    deadline: float = 0.0,
) -> int:
    os.environ["VLLM_API_KEY"] = "k"
    try:
        return batch_runner.main(
            [
                "run",
                "--input",
                str(tmp / "in.jsonl"),
                "--shard",
                str(shard),
                "--shards",
                str(shards),
                "--out",
                str(tmp / "out"),
                "--socket",
                sock,
                "--concurrency",
                str(concurrency),
                "--deadline",
                str(deadline),
                "--url-path",
                "/v1/completions",
            ]
        )
    finally:
        del os.environ["VLLM_API_KEY"]


def results_of(tmp: Path, shard: int = 0) -> list[dict[str, Any]]:
    text = (tmp / "out" / f"shard-{shard}.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def test_shards_are_contiguous_and_cover_every_line() -> None:
    for total in (0, 1, 7, 100):
        for shards in (1, 2, 3, 8):
            ranges = [batch_runner.shard_range(total, k, shards) for k in range(shards)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_refusals_are_not_retried_and_transient_errors_are(
    tmp_path: Path, sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_runner, "BACKOFF_FIRST", 0.01)
    make_input(tmp_path / "in.jsonl", 6)
    server = Server(sock, {"c1": [400, 200], "c2": [503, 500, 200], "c3": [429, 200]})
    try:
        assert run_shard(tmp_path, sock) == batch_runner.EXIT_DONE
    finally:
        server.close()
    rows = {r["custom_id"]: r for r in results_of(tmp_path)}
    assert sorted(rows) == [f"c{i}" for i in range(6)]
    assert rows["c1"]["response"]["status_code"] == 400 and server.seen.count("c1") == 1
    assert rows["c2"]["response"]["status_code"] == 200 and server.seen.count("c2") == 3
    assert rows["c3"]["response"]["status_code"] == 200 and server.seen.count("c3") == 2
    prog = json.loads((tmp_path / "out" / "shard-0.progress").read_text())
    assert prog["state"] == "done" and (prog["completed"], prog["errored"]) == (5, 1)
    assert prog["prompt_tokens"] == 10 and prog["completion_tokens"] == 15


def test_a_restarted_shard_skips_what_it_wrote_and_repairs_a_cut_line(
    tmp_path: Path, sock: str
) -> None:
    ids = make_input(tmp_path / "in.jsonl", 20)
    server = Server(sock, {})
    try:
        assert run_shard(tmp_path, sock, shard=1, shards=2) == batch_runner.EXIT_DONE
        path = tmp_path / "out" / "shard-1.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        # A kill: the last 4 results were never written, the 5th is cut.
        path.write_text("".join(lines[:5]) + lines[5][:17])
        server.seen.clear()
        assert run_shard(tmp_path, sock, shard=1, shards=2) == batch_runner.EXIT_DONE
    finally:
        server.close()
    rows = results_of(tmp_path, 1)
    assert sorted(r["custom_id"] for r in rows) == ids[10:]
    assert len(server.seen) == 5 and not set(server.seen) & {r["custom_id"] for r in rows[:5]}


def test_a_server_gone_stops_the_shard_without_writing_a_line(
    tmp_path: Path, sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_runner, "BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(batch_runner, "RETRIES", 2)
    make_input(tmp_path / "in.jsonl", 3)
    assert run_shard(tmp_path, sock) == batch_runner.EXIT_SERVER  # nothing listens there
    assert (tmp_path / "out" / "shard-0.jsonl").read_text() == ""
    prog = json.loads((tmp_path / "out" / "shard-0.progress").read_text())
    assert prog["state"] == "server_failed" and "stopped answering" in prog["why"]


def test_past_the_deadline_the_shard_expires(tmp_path: Path, sock: str) -> None:
    make_input(tmp_path / "in.jsonl", 3)
    server = Server(sock, {})
    try:
        assert run_shard(tmp_path, sock, deadline=time.time() - 1) == batch_runner.EXIT_EXPIRED
    finally:
        server.close()
    assert json.loads((tmp_path / "out" / "shard-0.progress").read_text())["state"] == "expired"


def test_usr1_stops_taking_lines_and_flushes(tmp_path: Path, sock: str) -> None:
    """The time-limit warning, to the runner as a process (as the job script
    sends it): it exits 3 soon, with every result it wrote whole."""
    make_input(tmp_path / "in.jsonl", 400)
    server = Server(sock, {}, delay=0.02)
    try:
        env = {**os.environ, "VLLM_API_KEY": "k"}
        proc = subprocess.Popen(
            [
                sys.executable,
                batch_runner.__file__,
                "run",
                "--input",
                str(tmp_path / "in.jsonl"),
                "--shard",
                "0",
                "--shards",
                "1",
                "--out",
                str(tmp_path / "out"),
                "--socket",
                sock,
                "--concurrency",
                "2",
                "--url-path",
                "/v1/completions",
            ],
            env=env,
        )
        out = tmp_path / "out" / "shard-0.jsonl"
        for _ in range(600):  # a bound, not a timing: the first result comes at once
            if out.exists() and out.stat().st_size:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=30) == batch_runner.EXIT_STOPPED
    finally:
        server.close()
    rows = results_of(tmp_path)
    assert 0 < len(rows) < 400 and len({r["custom_id"] for r in rows}) == len(rows)
    assert json.loads((tmp_path / "out" / "shard-0.progress").read_text())["state"] == "stopped"


class RawServer:
    """A unix-socket server that answers each request with the next of
    ``answers`` (raw bytes) and then closes the connection when it says so."""

    def __init__(self, path: str, answers: list[tuple[bytes, bool]]) -> None:
        self.answers = answers
        self.connections = 0

        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                while outer.answers:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        byte = self.rfile.read(1)
                        if not byte:
                            return
                        head += byte
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    self.rfile.read(length)
                    answer, close = outer.answers.pop(0)
                    self.wfile.write(answer)
                    self.wfile.flush()
                    if close:
                        return

        class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = UnixServer(path, Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_runner_client_reads_chunked_and_unsized_answers_and_reconnects(sock: str) -> None:
    """The runner's own HTTP/1.1 client: a chunked answer (with a trailer),
    a Content-Length one on the same kept-alive connection, a connection the
    server closed in between (opened again at no cost), and an answer that
    runs to the end of its connection."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-request-id: r1\r\n\r\n"
        b'5\r\n{"a":\r\n3;x=y\r\n 1}\r\n0\r\nT: v\r\n\r\n'
    )
    sized = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}"
    unsized = b"HTTP/1.1 200 OK\r\n\r\n[1, 2]"
    server = RawServer(
        sock,
        [
            (chunked, False),
            (sized, True),
            (b"HTTP/1.1 100 Continue\r\n\r\n" + sized, False),
            (b"HTTP/1.1 204 No Content\r\n\r\n", False),
            (unsized, True),
        ],
    )

    async def exchange() -> list[tuple[int, bytes, str]]:
        conn = batch_runner.Connection(sock)
        try:
            return [await conn.request("/v1/x", b"{}", {}) for _ in range(5)]
        finally:
            conn.close()

    try:
        got = asyncio.run(exchange())
    finally:
        server.close()
    assert got == [
        (200, b'{"a": 1}', "r1"),
        (400, b"{}", ""),
        (400, b"{}", ""),
        (204, b"", ""),
        (200, b"[1, 2]", ""),
    ]
    assert server.connections == 2  # the one the server closed was opened again


def test_a_garbled_answer_is_a_failed_attempt(sock: str) -> None:
    server = RawServer(sock, [(b"SPDY/9 what\r\n\r\n", True)])

    async def exchange() -> None:
        conn = batch_runner.Connection(sock)
        with pytest.raises(batch_runner.FAILURES):
            await conn.request("/v1/x", b"{}", {})
        assert conn.writer is None

    try:
        asyncio.run(exchange())
    finally:
        server.close()


def test_batch_cancel_is_not_the_stop_alias() -> None:
    from alvis_fsm.fronts.cli.main import cli

    group = cli.commands["batch"]
    import click

    assert isinstance(group, click.Group)
    command = group.get_command(click.Context(group), "cancel")
    assert command is not None and command.name == "cancel"


def test_jobs_auto_counts_the_jobs_that_fit_node_by_node() -> None:
    from alvis_fsm.engine.batch.service import jobs_for

    lines = [
        "a|gpu:A40:4(S:0-1)|gpu:A40:1(IDX:0)|mix",  # 3 free
        "b|gpu:A40:4(S:0-1)|gpu:A40:0(IDX:N/A)|idle",  # 4 free
        "c|gpu:A40:4(S:0-1)|gpu:A40:4(IDX:0-3)|alloc",  # none
        "d|gpu:A100:4(S:0-1)|gpu:A100:0(IDX:N/A)|idle",
    ]  # another type
    assert jobs_for(lines, "A40:1") == 7
    assert jobs_for(lines, "A40:2") == 3  # 1 on a, 2 on b: a job is on one node
    assert jobs_for(lines, "A40:4") == 1
    assert jobs_for(lines[2:3], "A40:1") == 1  # nothing free: one job, which waits


def test_the_shard_job_script_renders_quoted_and_parses() -> None:
    from alvis_fsm.cluster import jobscript
    from alvis_fsm.engine.batch.service import _source, warn_seconds

    spec = jobscript.JobSpec(
        job_name="alvis-fsm-batch_0123456789abcdef",
        account="NAISS2025-22-1522",
        time="1:00:00",
        gpus="A40:1",
        run_dir="~/runs/batch_x; rm -rf ~",
        model_path="/hub/models--org--m/snapshots/a$(id)/",
        max_model_len=4096,
        served_name="org/m",
        image="/apps/v.sif",
        ready_timeout=600,
    )
    extra = {
        "SHARDS": "4",
        "CONCURRENCY": "64",
        "URL_PATH": jobscript.word("endpoint", "/v1/completions"),
        "MAX_ATTEMPTS": "3",
        "WARN_S": str(warn_seconds(3600)),
    }
    text = jobscript.render(spec, _source("batch_job.sh"), extra)
    assert "#SBATCH --signal=B:USR1@120\n" in text and "#SBATCH --requeue\n" in text
    assert "RUN_DIR='~/runs/batch_x; rm -rf ~'\n" in text
    assert "HF_MODEL='/hub/models--org--m/snapshots/a$(id)/'\n" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert warn_seconds(60) == 15 and warn_seconds(10) == 10 and warn_seconds(7200) == 120
