"""Start-up failures of the REAL vLLM 0.11.0 (issue 21), as the tool meets
them: the engine's own KV-cache refusal (the lab's CPU KV cache is 1 GiB,
131072 tokens of the tiny real model, whose config allows 262144), answered
by the context auto-fit; and a broken snapshot, shown with its cause."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt

pytestmark = pytest.mark.realvllm

CONNECTED = "✓ Connection successful! Server available at http://localhost:"


@pytest.fixture
def catalog(lab: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A catalog file of the test's own (readable by the tool only) and a
    directory for snapshots the cluster user can read."""
    where = Path(tempfile.mkdtemp(prefix="afsm-realvllm-", dir="/tmp"))
    where.chmod(0o755)
    entries: dict[str, Any] = {}
    try:
        yield where, entries
    finally:
        shutil.rmtree(where, ignore_errors=True)


def write_catalog(where: Path, entries: dict[str, Any]) -> dict[str, str]:
    path = where / "models.json"
    path.write_text(json.dumps(entries))
    return {"ALVIS_FSM_CATALOG__PATHS": json.dumps([str(path)])}


def test_auto_fit_answers_the_real_kv_cache_refusal(
    lab: Any, tool: Tool, catalog: tuple[Path, dict[str, Any]]
) -> None:
    where, entries = catalog
    entries["tiny-real-long"] = {
        "path": lab.model_path("alvislab", "tiny-real"),
        "max_model_len": 262144,
    }
    port = free_port()
    child = tool.spawn(
        "start",
        "-m",
        "tiny-real-long",
        "--port",
        str(port),
        timeout=400,
        **write_catalog(where, entries),
    )
    child.expect(r"Job submitted: (\d+)")
    first = child.match.group(1)
    child.expect_exact(f"Cleaned up job {first} successfully")
    child.expect_exact("vLLM refused max_model_len 262144 for tiny-real-long")
    child.expect_exact("Starting once more with max_model_len 131072")
    child.expect(r"Job submitted: (\d+)")
    second = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Streaming logs")
    interrupt(child)
    child.expect_exact(f"Cleaned up job {second} successfully", timeout=90)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    out = child.logfile_read.text
    assert exit_status(child) == 0, out[-3000:]
    # The real engine's own words were shown.
    assert "estimated maximum model length is 131072" in out
    record = json.loads((tool.state_dir / "sessions" / "tiny-real-long.json").read_text())
    script = (Path(record["run_dir"]) / "job.sh").read_text()
    assert re.search(r"^MAX_MODEL_LEN=131072$", script, re.M)
    assert_nothing_left(lab, tool)


def test_a_broken_snapshot_fails_with_its_cause(
    lab: Any, tool: Tool, catalog: tuple[Path, dict[str, Any]]
) -> None:
    where, entries = catalog
    # The tiny real model without its weights, as a download cut short leaves it.
    snap = where / "models--alvislab--tiny-broken" / "snapshots" / ("b" * 40)
    shutil.copytree(lab.model_path("alvislab", "tiny-real"), snap)
    (snap / "model.safetensors").unlink()
    for root, dirs, _files in os.walk(where):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    entries["tiny-broken"] = {"path": f"{snap}/", "max_model_len": 2048, "gpus": "A40:1"}
    status, out = tool.run(
        "start",
        "-m",
        "tiny-broken",
        "--port",
        str(free_port()),
        timeout=400,
        **write_catalog(where, entries),
    )
    assert status == 6, out[-3000:]
    assert "[ERROR] vLLM exited with status 1 before it was ready" in out, out[-3000:]
    assert "Cannot find any model weights" in out, out[-3000:]
    assert "Cleaned up job" in out
    assert_nothing_left(lab, tool)
