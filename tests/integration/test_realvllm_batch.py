"""The batch runner on the REAL vLLM 0.11.0 (issues 21 and 23): `batch submit
--wait` of a small chat file and a small completions file on `tiny-real`,
one shard job each; every custom_id comes back exactly once, in input order,
and each body is the real server's answer (its ids, objects and usage).

Embeddings are not run here: tiny-real is a generative Llama, and vLLM 0.11
serves `/v1/embeddings` only for a model started as a pooling runner. The
model has random weights (tests/lab/realvllm/make_model.py), so the tests
check shapes and counts, never words."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from batchfiles import assert_no_access_log, read_jsonl, request_body, write_batch
from tool import Tool, assert_nothing_left, tool_argv

pytestmark = pytest.mark.realvllm

MODEL = "tiny-real"
SERVED = "alvislab/tiny-real"
N = 12


def write_input(path: Path, url: str) -> list[str]:
    # Lengths differ per line (ignore_eos: exactly that many tokens), so a
    # body given to the wrong custom_id shows.
    text = "the cluster node {}" if url == "/v1/completions" else "Hello {}"
    ids = [f"real-{i:03d}" for i in range(N)]

    def body(i: int, cid: str) -> dict[str, Any]:
        return request_body(MODEL, url, text.format(cid), max_tokens=1 + i, ignore_eos=True)

    return write_batch(path, ids, url, body)


@pytest.mark.parametrize(
    ("url", "obj"),
    [("/v1/chat/completions", "chat.completion"), ("/v1/completions", "text_completion")],
)
def test_submit_wait_on_the_real_engine(
    lab: Any, tool: Tool, tmp_path: Path, url: str, obj: str
) -> None:
    ids = write_input(tmp_path / "in.jsonl", url)
    proc = subprocess.run(
        [*tool_argv(), "batch", "submit", "in.jsonl", "--jobs", "1", "-t", "10", "--wait"],
        cwd=tmp_path,
        env=tool.env,
        text=True,
        capture_output=True,
        timeout=420,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch_id = proc.stdout.splitlines()[0].strip()
    assert batch_id.startswith("batch_"), proc.stdout
    rows = read_jsonl(tmp_path / f"{batch_id}_output.jsonl")
    errors = read_jsonl(tmp_path / f"{batch_id}_errors.jsonl")
    assert errors == [], errors[:3]
    assert [r["custom_id"] for r in rows] == ids
    for i, row in enumerate(rows):
        response = row["response"]
        assert row["error"] is None and response["status_code"] == 200, row
        body = response["body"]
        # The real server's own answer: its model name, object and id scheme.
        assert body["object"] == obj and body["model"] == SERVED, body
        prefix = "chatcmpl-" if obj == "chat.completion" else "cmpl-"
        assert str(body["id"]).startswith(prefix), body["id"]
        assert body["usage"]["completion_tokens"] == 1 + i, (row["custom_id"], body["usage"])
        assert body["usage"]["prompt_tokens"] > 2
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length"
        text = choice["message"]["content"] if obj == "chat.completion" else choice["text"]
        assert isinstance(text, str)
    status = tool.run_piped("batch", "status", batch_id, "--json", timeout=90)
    assert status.returncode == 0, status.stderr[-2000:]
    data = json.loads(status.stdout)
    assert data["status"] == "completed"
    assert data["request_counts"] == {"total": N, "completed": N, "failed": 0}
    assert_no_access_log(lab, data["run_dir"])
    assert_nothing_left(lab, tool)
