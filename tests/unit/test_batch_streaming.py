"""Batches (issue 23) at any size: validation reads the input once, line by
line, and keeps the requests, the custom_ids and the duplicate check on disk;
the merge takes the shards' raw results in any order through an on-disk
index; the upload and download pump files through a process a chunk at a
time; the gateway receives an upload in chunks. The laptop's memory does not
grow with the number of lines (measured with tracemalloc: a bound, not a
timing)."""

from __future__ import annotations

import gc
import io
import json
import random
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from alvis_fsm.engine.batch import input as batch_input
from alvis_fsm.engine.batch import record as batch_record
from alvis_fsm.engine.batch import results as batch_results
from alvis_fsm.engine.batch import service as batch_service
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord, BatchStore
from alvis_fsm.errors import UsageError

RESOLVE = {
    "lab-ok": ("lab-ok", "alvislab/tiny-ok"),
    "alvislab/tiny-ok": ("lab-ok", "alvislab/tiny-ok"),
}


def request(i: int) -> str:
    return json.dumps(
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "lab-ok", "prompt": f"say {i}", "max_tokens": 4},
        }
    )


def result(i: int, ok: bool = True) -> str:
    return json.dumps(
        {
            "id": f"batch_req_{i}",
            "custom_id": f"req-{i}",
            "_i": i,
            "response": {
                "status_code": 200 if ok else 400,
                "request_id": f"q{i}",
                "body": {"choices": [{"text": f"answer {i}"}]},
            },
            "error": None,
        }
    )


def write_input(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(request(i) + "\n")
    return path


def write_raw(path: Path, n: int, shards: int) -> Path:
    """The shards' raw result files as the agent's ``results`` sends them:
    shard after shard, each in completion order (shuffled here), every
    tenth request refused, the last one of each shard not done."""
    rng = random.Random(7)
    with path.open("w", encoding="utf-8") as handle:
        for k in range(shards):
            rows = list(range(k * n // shards, (k + 1) * n // shards - 1))
            rng.shuffle(rows)
            for i in rows:
                handle.write(result(i, ok=i % 10 != 0) + "\n")
    return path


# -- validation -----------------------------------------------------------------


def test_validate_reads_a_generator_once_and_keeps_the_requests_on_disk(tmp_path: Path) -> None:
    consumed = []

    def lines() -> Iterator[str]:
        for i in range(5):
            consumed.append(i)
            yield request(i)
            yield ""  # blank lines are skipped

    valid = batch_input.validate(lines(), RESOLVE)
    assert consumed == [0, 1, 2, 3, 4] and valid.total == 5
    assert list(valid.iter_ids()) == [f"req-{i}" for i in range(5)]
    sent = valid.requests_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["body"]["model"] for x in sent] == ["alvislab/tiny-ok"] * 5
    assert (valid.dir.stat().st_mode & 0o777) == 0o700
    assert not (valid.dir / "seen.db").exists()  # the duplicate index is gone once validated
    work = valid.dir
    del valid
    gc.collect()
    assert not work.exists()  # the temp directory goes with the object


def test_a_duplicate_far_down_is_refused_with_both_line_numbers_and_nothing_left(
    tmp_path: Path,
) -> None:
    lines = [request(i) for i in range(3000)] + [request(1234)]
    before = set(Path(batch_input.tempfile.gettempdir()).glob("alvis-fsm-batch-*"))
    with pytest.raises(
        UsageError, match=r"Line 3001: duplicate custom_id 'req-1234' \(first on line 1235\)"
    ):
        batch_input.validate(iter(lines), RESOLVE)
    assert set(Path(batch_input.tempfile.gettempdir()).glob("alvis-fsm-batch-*")) == before


def test_read_input_streams_the_file_and_says_what_is_wrong(tmp_path: Path) -> None:
    path = write_input(tmp_path / "in.jsonl", 3)
    assert [json.loads(x)["custom_id"] for x in batch_service.read_input(path) if x] == [
        "req-0",
        "req-1",
        "req-2",
    ]
    (tmp_path / "bad.jsonl").write_bytes(request(0).encode() + b"\n\xff\xfe\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        batch_input.validate(batch_service.read_input(tmp_path / "bad.jsonl"), RESOLVE)
    with pytest.raises(UsageError, match="No such file"):
        batch_input.validate(batch_service.read_input(tmp_path / "missing.jsonl"), RESOLVE)


# -- the store and the merge ----------------------------------------------------


def test_the_store_streams_the_ids(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    r = BatchRecord(
        id=batch_record.new_id(),
        model="m",
        served_name="s",
        endpoint="/v1/completions",
        total=3,
        shards=1,
        run_dir="/r",
        job_name="j",
        created_at=1,
    )
    store.save(r, (f"id-{i}" for i in range(3)))
    assert list(store.iter_ids(r.id)) == ["id-0", "id-1", "id-2"]


def test_merge_puts_shards_in_completion_order_back_in_input_order(tmp_path: Path) -> None:
    n, shards = 1000, 3
    raw = write_raw(tmp_path / "raw.jsonl", n, shards)
    # A shard that wrote a line twice (a resume): the first is kept.
    with raw.open("a", encoding="utf-8") as handle:
        handle.write(
            json.dumps({"custom_id": "req-5", "response": None, "error": {"code": "x"}}) + "\n"
        )
        handle.write('{"custom_id": "req-7", "cut')  # a line being written: ignored
    ids = (f"req-{i}" for i in range(n))
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    with raw.open(encoding="utf-8") as lines:
        n_ok, n_err = batch_results.write_results(ids, lines, BatchStatus.EXPIRED, out, err)
    ok_rows = [json.loads(x) for x in out.read_text().splitlines()]
    err_rows = [json.loads(x) for x in err.read_text().splitlines()]
    assert (n_ok, n_err) == (len(ok_rows), len(err_rows)) and n_ok + n_err == n
    order = [int(r["custom_id"][4:]) for r in ok_rows]
    assert order == sorted(order) and all("_i" not in r for r in ok_rows)
    assert sorted(order + [int(r["custom_id"][4:]) for r in err_rows]) == list(range(n))
    last = [(k + 1) * n // shards - 1 for k in range(shards)]
    expired = [
        int(r["custom_id"][4:])
        for r in err_rows
        if r["error"] and r["error"]["code"] == "batch_expired"
    ]
    assert expired == last
    assert 5 in order  # the first of the two lines for req-5
    assert (out.stat().st_mode & 0o777) == 0o600


# -- memory ---------------------------------------------------------------------


def peak_of_validate_and_merge(tmp_path: Path, n: int) -> int:
    """Peak bytes traced while validating an input of n lines and merging
    its results from files, as `batch submit` and `batch results` do."""
    path = write_input(tmp_path / f"in-{n}.jsonl", n)
    raw = write_raw(tmp_path / f"raw-{n}.jsonl", n, shards=4)
    gc.collect()
    tracemalloc.start()
    try:
        valid = batch_input.validate(batch_service.read_input(path), RESOLVE)
        with raw.open(encoding="utf-8") as lines:
            counts = batch_results.write_results(
                valid.iter_ids(),
                lines,
                BatchStatus.COMPLETED,
                tmp_path / f"out-{n}",
                tmp_path / f"err-{n}",
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert valid.total == n and sum(counts) == n - 4
    return peak


def test_memory_of_validate_and_merge_does_not_grow_with_the_lines(tmp_path: Path) -> None:
    small = peak_of_validate_and_merge(tmp_path, 1_000)
    large = peak_of_validate_and_merge(tmp_path, 10_000)
    # Ten times the lines; in memory, the same few lines at a time. (SQLite's
    # page cache is outside tracemalloc's view: bounded by batch_input.CACHE_KIB.)
    assert large < small + 64 * 1024, (small, large)
    assert large < 1024 * 1024, large


# -- the ssh pump ---------------------------------------------------------------


def test_the_pump_streams_both_ways_without_blocking(tmp_path: Path) -> None:
    data = tmp_path / "big"
    data.write_bytes(b"".join(b"%08d %s\n" % (i, b"x" * 100) for i in range(60_000)))  # ~6.5 MB
    # Upload: stdin from the file while the command also answers (more than a pipe holds).
    proc = subprocess.Popen(
        ["sh", "-c", "tee copy | wc -c; head -c 200000 /dev/zero >&2"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    code, out, err = batch_service._pump(proc, data, None)
    assert code == 0 and int(out) == data.stat().st_size and len(err) == 200_000
    assert (tmp_path / "copy").read_bytes() == data.read_bytes()
    # Download: stdout into a sink, chunk by chunk.
    proc = subprocess.Popen(
        ["cat", str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    sink = io.BytesIO()
    code, out, err = batch_service._pump(proc, None, sink)
    assert code == 0 and out == "" and sink.getvalue() == data.read_bytes()


# -- the gateway ----------------------------------------------------------------


def test_the_gateway_receives_a_large_upload_in_chunks_and_serves_it_back(tmp_path: Path) -> None:
    from tests.unit.test_gateway_batches import run

    n = 30_000  # ~3.6 MB: several chunks
    body = write_input(tmp_path / "in.jsonl", n).read_bytes()

    async def test(client: openai.AsyncOpenAI, cluster: object) -> None:
        f = await client.files.create(file=("in.jsonl", io.BytesIO(body)), purpose="batch")
        assert f.bytes == len(body)
        assert (await client.files.content(f.id)).content == body
        b = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        assert b.request_counts is not None and b.request_counts.total == n
        b = await client.batches.retrieve(b.id)
        assert b.output_file_id
        out = (await client.files.content(b.output_file_id)).text.splitlines()
        assert [json.loads(x)["custom_id"] for x in out] == [f"req-{i}" for i in range(n)]

    state = tmp_path / "state"
    run(state, test)
    assert not list((state / "files").glob(".upload-*"))  # no staging file left


class LocalConnection:
    """The ssh connection's popen, run here: the real batch agent script on
    a local directory (the lab tests run it over ssh). ``fail`` makes the
    first n runs end as ssh does when the connection is lost (255);
    ``hang`` makes them never end."""

    def __init__(self, fail: int = 0, hang: bool = False) -> None:
        self.fail, self.hang, self.reopened = fail, hang, 0
        self.opts = type("Opts", (), {"host": "local"})()
        self.prompter = type("P", (), {"command": staticmethod(lambda text: None)})()

    def popen(self, argv: list[str]) -> subprocess.Popen[bytes]:
        if self.hang:
            argv = ["sleep", "30"]
        elif self.fail:
            self.fail -= 1
            argv = ["sh", "-c", "cat >/dev/null; echo lost >&2; exit 255"]
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def reopen(self) -> None:
        self.reopened += 1


def remote(conn: LocalConnection) -> batch_service.Remote:
    return batch_service.Remote(conn, None)  # type: ignore[arg-type]


def test_put_and_results_stream_through_the_agent_and_survive_a_lost_connection(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    src = write_input(tmp_path / "in.jsonl", 20_000)  # ~2.4 MB
    conn = LocalConnection(fail=1)
    put = remote(conn).stream("put", str(run), "input.jsonl", source=src)
    assert put.returncode == 0 and conn.reopened == 1
    assert (run / "input.jsonl").read_bytes() == src.read_bytes()
    (run / "results").mkdir()
    (run / "results" / "shard-0.jsonl").write_text(result(0) + "\n")
    (run / "results" / "shard-1.jsonl").write_text(result(1) + "\n")
    sink = io.BytesIO(b"left from an earlier try")
    got = remote(LocalConnection(fail=1)).stream("results", str(run), sink=sink)
    assert got.returncode == 0 and sink.getvalue() == (result(0) + "\n" + result(1) + "\n").encode()
    with pytest.raises(batch_service.ConnectionLost, match="Lost the connection"):
        remote(LocalConnection(fail=3)).stream("results", str(run), sink=io.BytesIO())


def test_a_transfer_that_does_not_finish_in_time_is_ended(tmp_path: Path) -> None:
    with pytest.raises(batch_service.ConnectionLost, match="did not finish within"):
        remote(LocalConnection(hang=True)).stream(
            "results", str(tmp_path), sink=io.BytesIO(), timeout=0.5
        )
