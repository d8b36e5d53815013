"""The Python API for batches on the lab (issue 23): a script submits a list
of requests with ``alvis_fsm.batch``, waits (its statuses seen on the way,
``finalizing`` before ``completed`` when a poll lands there), reads the
answers as an iterator in input order, and the CLI sees the same batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tool import Tool, assert_nothing_left

SCRIPT = r"""
import json, sys
import alvis_fsm

requests = ({"custom_id": f"p{i:03d}", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": f"line {i}", "max_tokens": 3}} for i in range(30))
b = alvis_fsm.batch(requests, model="lab-ok", jobs=2, time="10")
seen = []
b.wait(poll=1, timeout=240, progress=lambda x: seen.append(x.status.value))
rows = list(b.results())
print(json.dumps({"id": b.id, "status": b.status.value, "seen": seen, "counts": b.request_counts,
                  "ids": [r["custom_id"] for r in rows], "errors": len(list(b.errors())),
                  "object": rows[0]["response"]["body"]["object"],
                  "listed": [x.id for x in alvis_fsm.batches()]}))
"""


def test_a_script_submits_waits_and_reads_a_batch(lab: Any, tool: Tool, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env=tool.env,
        text=True,
        capture_output=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["seen"][-1] == "completed", out
    assert set(out["seen"]) <= {"validating", "in_progress", "finalizing", "completed"}, out
    assert out["ids"] == [f"p{i:03d}" for i in range(30)] and out["errors"] == 0
    assert out["counts"] == {"total": 30, "completed": 30, "failed": 0}
    assert out["object"] == "text_completion" and out["listed"] == [out["id"]]
    cli = tool.run_piped("batch", "status", out["id"], "--json", timeout=90)
    assert cli.returncode == 0 and json.loads(cli.stdout)["status"] == "completed", cli.stderr[
        -2000:
    ]
    assert "finalizing_at" in json.loads(cli.stdout) and json.loads(cli.stdout)["finalizing_at"]
    assert_nothing_left(lab, tool)
