"""The gateway's /v1/files and /v1/batches (issue 23) with the official
openai client: upload, create, retrieve, content, list with after/limit,
cancel, delete, and refusals, in OpenAI's shapes. The cluster side is the
engine's record and merge driven by a stand-in for batch_service (the lab
test runs the real one)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path
from typing import Any

import openai
import pytest

from alvis_fsm.engine.batch import input as batch_input
from alvis_fsm.engine.batch import record as batch_record
from alvis_fsm.engine.batch import results as batch_results
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord, BatchStore
from alvis_fsm.fronts.gateway.openai.batches import Batches, Ops
from alvis_fsm.fronts.gateway.server import Gateway, serve
from alvis_fsm.fronts.gateway.slot.models import Models

KEY = "gw-test-key"
RESOLVE = {
    "lab-ok": ("lab-ok", "alvislab/tiny-ok"),
    "alvislab/tiny-ok": ("lab-ok", "alvislab/tiny-ok"),
}


class Cluster:
    """Batches that complete on the next retrieve; line 'bad' is refused."""

    def __init__(self, state_dir: Path) -> None:
        self.store = BatchStore(state_dir)
        self.cancelled: list[str] = []
        self.hold: threading.Event | None = None  # set: results wait for it
        self.downloading = threading.Event()

    def submit(
        self, valid: batch_input.Validated, window: str, metadata: dict[str, str], file_id: str
    ) -> BatchRecord:
        r = BatchRecord(
            id=batch_record.new_id(),
            model=valid.model,
            served_name=valid.served_name,
            endpoint=valid.endpoint,
            total=valid.total,
            shards=1,
            run_dir="/r",
            job_name="j",
            created_at=1700000000,
            completion_window=window,
            metadata=metadata,
            input_file_id=file_id,
        )
        r.set_status(BatchStatus.IN_PROGRESS)
        self.store.save(r, valid.iter_ids())
        return r

    def refresh(self, r: BatchRecord) -> BatchRecord:
        r.completed, r.failed = r.total - 1, 1
        if not r.ended:  # the lifecycle's path (lifecycle.MOVES)
            r.set_status(BatchStatus.FINALIZING)
            r.set_status(BatchStatus.COMPLETED)
        self.store.save(r)
        return r

    def cancel(self, r: BatchRecord) -> BatchRecord:
        self.cancelled.append(r.id)
        r.set_status(BatchStatus.CANCELLING)
        r.set_status(BatchStatus.CANCELLED)
        self.store.save(r)
        return r

    def results(self, r: BatchRecord, out: Path, err: Path) -> tuple[int, int]:
        self.downloading.set()
        if self.hold is not None:
            self.hold.wait(10)
        ids = list(self.store.iter_ids(r.id))
        rows = [
            {
                "id": "batch_req_x",
                "custom_id": cid,
                "error": None,
                "response": {
                    "status_code": 400 if cid == "bad" else 200,
                    "request_id": "q",
                    "body": {"object": "chat.completion", "echo": cid},
                },
            }
            for cid in reversed(ids)
        ]
        return batch_results.write_results(
            ids, "\n".join(json.dumps(x) for x in rows), BatchStatus(r.status), out, err
        )


def jsonl(*ids: str, model: str = "lab-ok") -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": i,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": i}]},
            }
        ).encode()
        + b"\n"
        for i in ids
    )


def run(state_dir: Path, test: Any) -> Any:
    cluster = Cluster(state_dir)
    ops = Ops(
        submit=cluster.submit,
        refresh=cluster.refresh,
        cancel=cluster.cancel,
        results=cluster.results,
        resolve=lambda: RESOLVE,
    )
    gateway = Gateway(KEY, Models({}, lambda *a: None), batches=Batches(state_dir, ops))  # type: ignore[arg-type,return-value]

    async def main() -> Any:
        served = await serve(gateway, "127.0.0.1", 0)
        try:
            # Closed inside the loop: a client left to the garbage collector
            # closes itself on a dead loop and logs it into a later test.
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{served.port}/v1", api_key=KEY, max_retries=0
            ) as client:
                return await test(client, cluster)
        finally:
            await served.runner.cleanup()

    return asyncio.run(main())


def test_the_openai_client_runs_a_batch_unchanged(tmp_path: Path) -> None:
    async def test(client: openai.AsyncOpenAI, cluster: Cluster) -> None:
        f = await client.files.create(
            file=("in.jsonl", io.BytesIO(jsonl("a", "bad", "c"))), purpose="batch"
        )
        assert f.id.startswith("file-") and f.purpose == "batch" and f.bytes > 0
        assert (await client.files.retrieve(f.id)).filename == "in.jsonl"
        b = await client.batches.create(
            input_file_id=f.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"job": "eval"},
        )
        assert (
            b.id.startswith("batch_")
            and b.status == "in_progress"
            and b.metadata == {"job": "eval"}
        )
        assert b.request_counts is not None and b.request_counts.total == 3
        b = await client.batches.retrieve(b.id)
        assert b.status == "completed" and b.completed_at and b.output_file_id and b.error_file_id
        out = (await client.files.content(b.output_file_id)).text.splitlines()
        err = (await client.files.content(b.error_file_id)).text.splitlines()
        assert [json.loads(x)["custom_id"] for x in out] == ["a", "c"]
        assert [json.loads(x)["response"]["status_code"] for x in err] == [400]
        # Retrieved again: the same files, not downloaded twice.
        again = await client.batches.retrieve(b.id)
        assert again.output_file_id == b.output_file_id
        listed = [x.id async for x in client.files.list()]
        assert f.id in listed and b.output_file_id in listed
        deleted = await client.files.delete(f.id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(f.id)

    run(tmp_path, test)


def test_list_pages_with_after_and_limit_newest_first(tmp_path: Path) -> None:
    async def test(client: openai.AsyncOpenAI, cluster: Cluster) -> None:
        f = await client.files.create(file=("in.jsonl", io.BytesIO(jsonl("a"))), purpose="batch")
        made = []
        for _ in range(3):
            made.append(
                (
                    await client.batches.create(
                        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
                    )
                ).id
            )
            await asyncio.sleep(0)
        page = await client.batches.list(limit=2)
        assert len(page.data) == 2 and page.has_more
        rest = await client.batches.list(limit=2, after=page.data[-1].id)
        assert not rest.has_more
        assert sorted([b.id for b in page.data] + [b.id for b in rest.data]) == sorted(made)

    run(tmp_path, test)


def test_cancel_and_refusals(tmp_path: Path) -> None:
    async def test(client: openai.AsyncOpenAI, cluster: Cluster) -> None:
        f = await client.files.create(
            file=("in.jsonl", io.BytesIO(jsonl("a", "a"))), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as info:
            await client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert "Line 2: duplicate custom_id 'a'" in str(info.value)
        g = await client.files.create(file=("in.jsonl", io.BytesIO(jsonl("x"))), purpose="batch")
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(
                input_file_id=g.id, endpoint="/v1/completions", completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError):
            await client.files.create(file=("in.jsonl", io.BytesIO(b"x")), purpose="fine-tune")
        b = await client.batches.create(
            input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        c = await client.batches.cancel(b.id)
        assert c.status == "cancelled" and cluster.cancelled == [b.id]
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_ffffffffffffffff")

    run(tmp_path, test)


def test_a_completed_batch_is_finalizing_while_its_files_are_downloaded(tmp_path: Path) -> None:
    async def test(client: openai.AsyncOpenAI, cluster: Cluster) -> None:
        f = await client.files.create(
            file=("in.jsonl", io.BytesIO(jsonl("a", "c"))), purpose="batch"
        )
        b = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        release = cluster.hold = threading.Event()
        first = asyncio.ensure_future(client.batches.retrieve(b.id))  # downloads, held
        assert await asyncio.to_thread(cluster.downloading.wait, 10)
        meanwhile = await client.batches.retrieve(b.id)
        assert (
            meanwhile.status == "finalizing"
            and meanwhile.finalizing_at
            and meanwhile.completed_at is None
        )
        assert meanwhile.output_file_id is None
        release.set()
        done = await first
        assert done.status == "completed" and done.output_file_id and done.completed_at

    run(tmp_path, test)


def test_bad_bodies_and_upload_names_are_400s_in_openai_shape(tmp_path: Path) -> None:
    """Issue 31, item 9: deep JSON to /v1/batches, file names with control
    characters or 300 characters long: 400s in OpenAI's shape, nothing kept."""

    async def test(client: openai.AsyncOpenAI, cluster: Cluster) -> None:
        import httpx

        async with httpx.AsyncClient(
            base_url=str(client.base_url),
            trust_env=False,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as http:
            resp = await http.post(
                "batches", content=b"[" * 200_000, headers={"Content-Type": "application/json"}
            )
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
            with pytest.raises(openai.BadRequestError) as refused:
                await client.files.create(file=("x" * 300, io.BytesIO(jsonl("a"))), purpose="batch")
            assert refused.value.code == "invalid_filename"
            # Control characters (httpx would percent-encode them: sent by hand).
            for name in (b"a%00b", b"a%0Ab", b"a%1b%5d52%3bc%3bx%07"):
                form = (
                    b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                    b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename*=utf-8''"
                    + name
                    + b'\r\n\r\n{"custom_id": "a"}\n\r\n--B--\r\n'
                )
                resp = await http.post(
                    "files",
                    content=form,
                    headers={"Content-Type": "multipart/form-data; boundary=B"},
                )
                assert (
                    resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_filename"
                ), name
            assert [f async for f in client.files.list()] == []

    run(tmp_path, test)
