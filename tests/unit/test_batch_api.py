"""The Python API for batches (fronts/api/batch.py): requests validated before
anything is submitted, status, wait (through finalizing), results as
iterators, the list. The cluster is a stand-in service whose status answers
go through the engine's own parser and rules (engine/batch/)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import alvis_fsm
from alvis_fsm.engine.batch import input as batch_input
from alvis_fsm.engine.batch import record as batch_record
from alvis_fsm.engine.batch import report as batch_report
from alvis_fsm.engine.batch import results as batch_results
from alvis_fsm.engine.batch import service as batch_service
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord, BatchStore
from alvis_fsm.errors import UsageError
from alvis_fsm.fronts.api import batch as batch_api

RESOLVE = {
    "lab-ok": ("lab-ok", "alvislab/tiny-ok"),
    "alvislab/tiny-ok": ("lab-ok", "alvislab/tiny-ok"),
}


def request(cid: str, model: str | None = "lab-ok") -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": cid}]}
    if model:
        body["model"] = model
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


class Service:
    """engine/batch/service.py's functions, with the cluster's answers scripted."""

    SubmitOptions = batch_service.SubmitOptions

    def __init__(self, state: Path, answers: list[str]) -> None:
        self.store = BatchStore(state)
        self.answers = answers
        self.submitted: list[tuple[Any, list[str]]] = []
        self.connections = 0
        self.cancelled: list[str] = []

    def resolver(self, cfg: Any) -> dict[str, tuple[str, str]]:
        return RESOLVE

    def submit(self, cfg: Any, options: Any, ui: Any) -> BatchRecord:
        valid = options.validated or batch_input.validate(
            batch_service.read_input(options.path), RESOLVE, options.model
        )
        r = BatchRecord(
            id=batch_record.new_id(),
            model=valid.model,
            served_name=valid.served_name,
            endpoint=valid.endpoint,
            total=valid.total,
            shards=2,
            run_dir="/r",
            job_name="j",
            created_at=1,
            completion_window=options.completion_window,
            metadata=options.metadata,
        )
        self.submitted.append((options, valid.requests_path.read_text().splitlines()))
        self.store.save(r, valid.iter_ids())
        return r

    @contextlib.contextmanager
    def connected(self, cfg: Any, ui: Any) -> Iterator[str]:
        self.connections += 1
        yield "remote"

    def refresh(
        self, cfg: Any, record: BatchRecord, ui: Any, remote: Any = None, store: Any = None
    ) -> BatchRecord:
        if not record.ended and self.answers:
            batch_report.apply(record, batch_report.parse_status(self.answers.pop(0)))
            self.store.save(record)
        return record

    def results(
        self, cfg: Any, record: BatchRecord, ui: Any, out: Path, err: Path, store: Any
    ) -> tuple[int, int]:
        ids = list(self.store.iter_ids(record.id))
        rows = [
            {
                "id": "batch_req_1",
                "custom_id": cid,
                "error": None,
                "response": {
                    "status_code": 400 if cid == "bad" else 200,
                    "request_id": "r",
                    "body": {"echo": cid},
                },
            }
            for cid in reversed(ids)
        ]
        return batch_results.write_results(
            ids, [json.dumps(x) for x in rows], BatchStatus(record.status), out, err
        )

    def cancel(self, cfg: Any, record: BatchRecord, ui: Any, store: Any) -> BatchRecord:
        self.cancelled.append(record.id)
        record.set_status(BatchStatus.CANCELLING)
        record.set_status(BatchStatus.CANCELLED)
        return record


def progress(k: int, state: str, done: int) -> str:
    return f"PROGRESS|{k}|" + json.dumps({"state": state, "completed": done, "errored": 0})


RUNNING = f"NOW|100\n{progress(0, 'running', 1)}\nQUEUE|7_0|RUNNING|None"
LAST_JOB_FINISHING = (
    f"NOW|110\n{progress(0, 'done', 2)}\n{progress(1, 'done', 1)}\nQUEUE|7_1|RUNNING|None"
)
ALL_GONE = f"NOW|120\n{progress(0, 'done', 2)}\n{progress(1, 'done', 1)}"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALVIS_FSM_SESSION__STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_a_list_is_validated_submitted_waited_for_through_finalizing_and_read(state: Path) -> None:
    service = Service(state, [RUNNING, LAST_JOB_FINISHING, ALL_GONE])
    b = alvis_fsm.batch(
        iter([request("a"), request("bad", model=None), request("c")]),
        model="lab-ok",
        metadata={"run": "1"},
        service=service,
    )
    options, lines = service.submitted[0]
    assert options.path is None and options.metadata == {"run": "1"} and options.jobs == "1"
    assert [json.loads(x)["body"]["model"] for x in lines] == ["alvislab/tiny-ok"] * 3
    assert b.id.startswith("batch_") and b.request_counts == {
        "total": 3,
        "completed": 0,
        "failed": 0,
    }
    seen: list[BatchStatus] = []
    assert b.wait(poll=0, progress=lambda x: seen.append(x.status)) is b
    assert seen == [BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.COMPLETED]
    assert service.connections == 1  # one connection for the whole wait
    assert b.record.times["finalizing_at"] == 110 and b.record.times["completed_at"] == 120
    assert [r["custom_id"] for r in b.results()] == ["a", "c"]
    assert [r["custom_id"] for r in b.errors()] == ["bad"]
    assert not list(state.joinpath("batches").glob(".batch_*"))  # the downloads are gone
    assert [x.id for x in alvis_fsm.batches(service=service)] == [b.id]
    assert alvis_fsm.get_batch(b.id, service=service).status == BatchStatus.COMPLETED
    assert "3/3 done" in repr(alvis_fsm.get_batch(b.id, service=service))


def test_a_bad_request_is_refused_with_its_number_and_nothing_submitted(state: Path) -> None:
    service = Service(state, [])
    with pytest.raises(UsageError, match=r"Line 2: duplicate custom_id 'a' \(first on line 1\)"):
        alvis_fsm.batch([request("a"), request("a")], service=service)
    with pytest.raises(UsageError, match="Line 1: the request is not JSON"):
        alvis_fsm.batch([{"custom_id": {1, 2}}], service=service)  # type: ignore[dict-item]
    assert service.submitted == [] and alvis_fsm.batches(service=service) == []


def test_a_file_is_submitted_by_its_path(state: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(request("x")) + "\n")
    service = Service(state, [])
    b = batch_api.batch(str(path), jobs="auto", time="30", service=service)
    options, _ = service.submitted[0]
    assert options.path == path and options.jobs == "auto" and options.time == "30"
    assert b.status == BatchStatus.VALIDATING and b.error == ""


def test_wait_past_its_timeout_says_the_batch_runs_on(state: Path) -> None:
    service = Service(state, [RUNNING] * 5)
    b = alvis_fsm.batch([request("a")], service=service)
    with pytest.raises(TimeoutError, match="runs on without this process"):
        b.wait(timeout=0, poll=0)
    assert b.refresh().status == BatchStatus.IN_PROGRESS
    assert b.cancel().status == BatchStatus.CANCELLED and service.cancelled == [b.id]


def test_the_results_of_a_running_batch_are_the_ones_so_far(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = Service(state, [RUNNING])
    b = alvis_fsm.batch([request("a"), request("b")], service=service).refresh()
    assert [r["custom_id"] for r in b.results()] == ["a", "b"]
    assert "results so far" in caplog.text


def test_the_batch_api_does_not_import_the_cli() -> None:
    source = Path(batch_api.__file__).read_text()
    assert "fronts.cli" not in source
    code = "import sys, alvis_fsm.fronts.api.batch; print([m for m in sys.modules if 'fronts.cli' in m])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
