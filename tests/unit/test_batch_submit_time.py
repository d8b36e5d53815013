"""`batch submit -t` is read as `start -t` is (one rule, session_spec):
a bad value names the flag, before anything is uploaded or submitted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_service import settings

from alvis_fsm.engine.batch import service as batch_service
from alvis_fsm.engine.fit.catalog import load_catalog
from alvis_fsm.errors import UsageError


def test_a_bad_time_names_the_flag_before_any_network(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    model = next(iter(load_catalog(cfg).names()))
    path = tmp_path / "in.jsonl"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    path.write_text(
        json.dumps(
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        + "\n"
    )
    options = batch_service.SubmitOptions(path=path, time="soon")
    with pytest.raises(UsageError) as caught:
        batch_service.submit(cfg, options, ui=None)  # type: ignore[arg-type]  # never reached: no network
    assert caught.value.message.startswith("-t/--time: ")
    assert not (tmp_path / "state" / "batches").exists() or not list(
        (tmp_path / "state" / "batches").iterdir()
    )
