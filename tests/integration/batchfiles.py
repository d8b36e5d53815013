"""Batch input and output files for the lab's batch tests (issue 23)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Body = Callable[[int, str], dict[str, Any]]


def request_body(model: str, url: str, text: str, **fields: Any) -> dict[str, Any]:
    """A body for `url`: `text` as the prompt or as one user message."""
    body: dict[str, Any] = {"model": model, **fields}
    if url == "/v1/completions":
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    return body


def write_batch(path: Path, ids: list[str], url: str, body: Body) -> list[str]:
    """One OpenAI batch line per custom_id, its body from `body(index, custom_id)`."""
    with path.open("w") as handle:
        for i, cid in enumerate(ids):
            line = {"custom_id": cid, "method": "POST", "url": url, "body": body(i, cid)}
            handle.write(json.dumps(line) + "\n")
    return ids


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def assert_no_access_log(lab: Any, run_dir: str) -> None:
    """Every shard's server ran without uvicorn's access log (a line per
    request in the shared run directory), and its log was written."""
    out = lab.login(
        f"cat {run_dir}/shards/*/vllm.out {run_dir}/shards/*/vllm.err", check=False
    ).stdout
    assert "Application startup complete" in out, out[-2000:]
    requests = [line for line in out.splitlines() if '"POST /v1/' in line]
    assert requests == [], requests[:3]
