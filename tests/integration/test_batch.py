"""Batches on the lab (issue 23): the CLI with --wait, bad input refused with
nothing uploaded, a shard requeued mid-way resumes with no duplicate, a
batch that needs two jobs' time limits completes with no client running,
a confirmed cancel, and a server that OOMs -> failed with the cause."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from batchfiles import assert_no_access_log, read_jsonl, request_body, write_batch
from tool import Tool, assert_nothing_left, tool_argv


def write_input(
    path: Path, n: int, url: str = "/v1/chat/completions", model: str = "lab-ok"
) -> list[str]:
    ids = [f"req-{i:05d}" for i in range(n)]
    return write_batch(
        path, ids, url, lambda _i, cid: request_body(model, url, f"line {cid}", max_tokens=5)
    )


def status(tool: Tool, batch_id: str) -> dict[str, Any]:
    proc = tool.run_piped("batch", "status", batch_id, "--json", timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def wait_status(tool: Tool, batch_id: str, done: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = status(tool, batch_id)
        if data["status"] in done or time.monotonic() > deadline:
            return data
        time.sleep(3)


def batch_jobs(lab: Any, batch_id: str) -> list[str]:
    out = lab.run(
        ["squeue", "-h", "-u", lab.user, "-n", f"alvis-fsm-{batch_id}", "-o", "%i|%T"]
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def results(
    tool: Tool, batch_id: str, tmp_path: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    proc = tool.run_piped(
        "batch", "results", batch_id, "-o", str(out), "--errors", str(err), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_jsonl(out), read_jsonl(err)


def test_submit_wait_downloads_every_answer_once_in_order(
    lab: Any, tool: Tool, tmp_path: Path
) -> None:
    ids = write_input(tmp_path / "in.jsonl", 40)
    proc = subprocess.run(
        [*tool_argv(), "batch", "submit", "in.jsonl", "--jobs", "2", "-t", "10", "--wait"],
        cwd=tmp_path,
        env=tool.env,
        text=True,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch_id = proc.stdout.splitlines()[0].strip()
    assert batch_id.startswith("batch_")
    assert "req/s" in proc.stderr and "ETA" in proc.stderr
    rows = read_jsonl(tmp_path / f"{batch_id}_output.jsonl")
    assert [r["custom_id"] for r in rows] == ids
    assert read_jsonl(tmp_path / f"{batch_id}_errors.jsonl") == []
    data = status(tool, batch_id)
    assert data["status"] == "completed"
    assert data["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert data["jobs"] == 2
    again, errors = results(tool, batch_id, tmp_path)
    assert again == rows and errors == []
    assert all(r["response"]["status_code"] == 200 for r in rows)
    assert rows[0]["response"]["body"]["object"] == "chat.completion"
    assert_no_access_log(lab, data["run_dir"])
    assert_nothing_left(lab, tool)


def test_bad_input_is_refused_with_its_line_and_nothing_uploaded(
    lab: Any, tool: Tool, tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    write_input(path, 5)
    lines = path.read_text().splitlines()
    lines[3] = lines[1]  # a duplicate custom_id on line 4
    path.write_text("\n".join(lines) + "\n")
    before = lab.login("ls -a ~/ 2>/dev/null; find ~ -maxdepth 4 -name 'batch_*' | sort").stdout
    proc = tool.run_piped("batch", "submit", str(path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Line 4: duplicate custom_id 'req-00001' (first on line 2)" in proc.stderr
    assert "Nothing was uploaded or submitted" in proc.stderr
    after = lab.login("ls -a ~/ 2>/dev/null; find ~ -maxdepth 4 -name 'batch_*' | sort").stdout
    assert after == before
    assert not list((tool.state_dir / "batches").glob("*.json"))
    assert_nothing_left(lab, tool)


def submit(tool: Tool, path: Path, *args: str) -> str:
    proc = tool.run_piped("batch", "submit", str(path), *args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch_id = proc.stdout.strip()
    assert batch_id.startswith("batch_"), proc.stdout
    return batch_id


def remote_results(lab: Any, tool: Tool, batch_id: str) -> list[str]:
    """custom_ids of every line the shards wrote, duplicates and all."""
    run_dir = status(tool, batch_id)["run_dir"]
    text = lab.login(f"cat {run_dir}/results/shard-*.jsonl").stdout
    return [json.loads(x)["custom_id"] for x in text.splitlines() if x]


def events(lab: Any, tool: Tool, batch_id: str) -> str:
    run_dir = status(tool, batch_id)["run_dir"]
    return str(lab.login(f"cat {run_dir}/shards/*/events", check=False).stdout)


def wait_done_at_least(tool: Tool, batch_id: str, n: int, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = status(tool, batch_id)
        if data["request_counts"]["completed"] >= n or time.monotonic() > deadline:
            return data
        time.sleep(1)


def test_a_requeued_shard_resumes_with_nothing_lost_and_nothing_twice(
    lab: Any, tool: Tool, tmp_path: Path
) -> None:
    ids = write_input(tmp_path / "in.jsonl", 240, model="lab-slow")
    batch_id = submit(tool, tmp_path / "in.jsonl", "-t", "10")
    data = wait_done_at_least(tool, batch_id, 40)
    assert data["status"] == "in_progress" and data["request_counts"]["completed"] < 240, data
    job = data["job_id"]
    lab.run(["scontrol", "requeue", job])
    data = wait_status(tool, batch_id, {"completed", "failed"}, timeout=240)
    assert data["status"] == "completed", (data, events(lab, tool, batch_id))
    written = remote_results(lab, tool, batch_id)
    assert sorted(written) == ids, "a line lost or written twice"
    rows, errors = results(tool, batch_id, tmp_path)
    assert [r["custom_id"] for r in rows] == ids and errors == []
    assert events(lab, tool, batch_id).count("start job") >= 2
    assert_nothing_left(lab, tool)


def test_a_batch_longer_than_a_job_completes_with_no_client(
    lab: Any, tool: Tool, tmp_path: Path
) -> None:
    # 0.25 s a request, 4 at once: 16 requests/s, so 900 lines need about a
    # minute of serving: more than one 1-minute job gives after start-up.
    ids = write_input(tmp_path / "in.jsonl", 900, model="lab-slow")
    batch_id = submit(tool, tmp_path / "in.jsonl", "-t", "1")
    # No alvis-fsm runs from here on: only the scheduler, as root.
    deadline = time.monotonic() + 300
    while batch_jobs(lab, batch_id) and time.monotonic() < deadline:
        time.sleep(3)
    assert not batch_jobs(lab, batch_id)
    data = status(tool, batch_id)
    log = events(lab, tool, batch_id)
    assert data["status"] == "completed", (data, log)
    assert "successor" in log and log.count("start job") >= 2, log
    written = remote_results(lab, tool, batch_id)
    assert sorted(written) == ids, "a line lost or written twice"
    rows, errors = results(tool, batch_id, tmp_path)
    assert [r["custom_id"] for r in rows] == ids and errors == []
    assert_nothing_left(lab, tool)


def test_cancel_is_confirmed_and_keeps_the_results_so_far(
    lab: Any, tool: Tool, tmp_path: Path
) -> None:
    ids = write_input(tmp_path / "in.jsonl", 2000, model="lab-slow")
    batch_id = submit(tool, tmp_path / "in.jsonl", "--jobs", "2", "-t", "10")
    wait_done_at_least(tool, batch_id, 10)
    proc = tool.run_piped("batch", "cancel", batch_id, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Batch {batch_id} cancelled (confirmed)" in proc.stdout
    assert batch_jobs(lab, batch_id) == []
    data = status(tool, batch_id)
    assert data["status"] == "cancelled" and data["cancelled_at"], data
    rows, errors = results(tool, batch_id, tmp_path)
    assert len(rows) + len(errors) == 2000
    merged = {r["custom_id"]: r for r in rows + errors}
    assert sorted(merged) == ids and len(rows) >= 10
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert_nothing_left(lab, tool)


def test_a_server_that_ooms_fails_the_batch_with_the_cause(
    lab: Any, tool: Tool, tmp_path: Path
) -> None:
    ids = write_input(tmp_path / "in.jsonl", 5, model="lab-oom")
    batch_id = submit(tool, tmp_path / "in.jsonl", "-t", "10")
    data = wait_status(tool, batch_id, {"failed", "completed"}, timeout=180)
    assert data["status"] == "failed", (data, events(lab, tool, batch_id))
    message = data["errors"]["data"][0]["message"]
    assert "CUDA out of memory" in message, message
    assert events(lab, tool, batch_id).count("attempt") == 3
    rows, errors = results(tool, batch_id, tmp_path)
    assert rows == [] and [e["custom_id"] for e in errors] == ids
    assert {e["error"]["code"] for e in errors} == {"batch_failed"}
    assert_nothing_left(lab, tool)
