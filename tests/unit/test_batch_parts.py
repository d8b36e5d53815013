"""Small pure parts of batch submission and of the settings' quick merge:
--jobs, --jobs auto's count, reading the input file, and the unvalidated
layers --help shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from alvis_fsm.engine.batch import service as batch_service
from alvis_fsm.engine.settings import layers as setting_layers
from alvis_fsm.errors import UsageError

A40_FREE_2 = "alvis4-12|gpu:A40:4(S:0-1)|gpu:A40:2(IDX:0-1)|mix"
A40_FREE_4 = "alvis4-15|gpu:A40:4(S:0-1)|gpu:A40:0(IDX:N/A)|idle"
A40_DRAINED = "alvis4-14|gpu:A40:4(S:0-1)|gpu:A40:0(IDX:N/A)|drained"
FAT_FREE_1 = "alvis5-01|gpu:A100fat:4(S:0-1)|gpu:A100fat:3(IDX:0-2)|mix"


def test_jobs_flag() -> None:
    assert batch_service.parse_jobs("auto") is None
    assert batch_service.parse_jobs("4") == 4
    for bad in ("0", "1001", "-1", "two", ""):
        with pytest.raises(UsageError, match="--jobs"):
            batch_service.parse_jobs(bad)


def test_jobs_auto_counts_whole_jobs_node_by_node() -> None:
    lines = [A40_FREE_2, A40_FREE_4, A40_DRAINED, FAT_FREE_1]
    assert batch_service.jobs_for(lines, "A40:1") == 6
    assert batch_service.jobs_for(lines, "A40:2") == 3  # 1 on the node with 2 free, 2 on the other
    assert batch_service.jobs_for(lines, "A40:4") == 1
    assert batch_service.jobs_for(lines, "A100fat:4") == 1  # none fit now: still one (it queues)


def test_read_input(tmp_path: Path) -> None:
    good = tmp_path / "in.jsonl"
    good.write_text('{"a": 1}\n{"b": 2}\n', encoding="utf-8")
    assert list(batch_service.read_input(good)) == [
        '{"a": 1}',
        '{"b": 2}',
    ]  # streamed, a line at a time
    with pytest.raises(UsageError, match="No such file"):
        list(batch_service.read_input(tmp_path / "missing.jsonl"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": "\xe9"}\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        list(batch_service.read_input(latin))
    with pytest.raises(UsageError, match="Cannot read"):
        list(batch_service.read_input(tmp_path))  # a folder


def test_raw_values_merge_packaged_user_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = tmp_path / "conf.toml"
    user.write_text('[slurm]\ntime = "3:00:00"\n[gateway]\nport = 58123\n')
    monkeypatch.setenv("ALVIS_FSM_CONFIG", str(user))
    monkeypatch.setenv("ALVIS_FSM_TUNNEL__LOCAL_PORT", "58009")
    values = setting_layers.raw_values()
    assert values["slurm.time"] == "3:00:00"  # the user's file over the packaged default
    assert values["gateway.port"] == "58123"
    assert values["tunnel.local_port"] == "58009"  # the environment over both
    assert values["catalog.default_model"] == "gpt-oss-20b"  # packaged
    assert "vllm.api_key" not in values  # booleans are not shown as defaults
    user.write_text("[slurm\nbroken")  # a file that cannot be read is skipped
    assert setting_layers.raw_values()["slurm.time"] != "3:00:00"
    assert setting_layers.env_name("timeouts", "job_start") == "ALVIS_FSM_TIMEOUTS__JOB_START"


def test_submit_without_input_is_refused_before_anything(tmp_path: Path) -> None:
    from alvis_fsm.engine.settings.model import load_settings

    class Silent:
        def __getattr__(self, name: str) -> object:
            return lambda *a, **k: None

    settings = load_settings()
    with pytest.raises(UsageError, match="No batch input"):
        batch_service.submit(settings, batch_service.SubmitOptions(), Silent())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--jobs"):
        batch_service.submit(settings, batch_service.SubmitOptions(jobs="none"), Silent())  # type: ignore[arg-type]
    assert not (settings.state_dir / "batches").exists()  # nothing recorded


RESOLVE = {
    "lab-ok": ("lab-ok", "alvislab/tiny-ok"),
    "alvislab/tiny-ok": ("lab-ok", "alvislab/tiny-ok"),
}


@pytest.mark.parametrize(
    ("url", "body", "said"),
    [
        ("/v1/completions", "text", "body must be a JSON object"),
        ("/v1/completions", {"prompt": "x"}, "body.model is missing"),
        ("/v1/completions", {"model": "lab-ok", "prompt": "x", "stream": True}, "stream"),
        ("/v1/chat/completions", {"model": "lab-ok", "messages": "hi"}, "body.messages"),
        ("/v1/completions", {"model": "lab-ok"}, "body.prompt"),
        ("/v1/embeddings", {"model": "lab-ok"}, "body.input"),
    ],
)
def test_a_bad_body_is_refused_with_its_line(url: str, body: object, said: str) -> None:
    import json

    from alvis_fsm.engine.batch import input as batch_input

    line = json.dumps({"custom_id": "a", "method": "POST", "url": url, "body": body})
    with pytest.raises(UsageError, match=said) as info:
        batch_input.validate([line], RESOLVE, None)
    assert info.value.message.startswith("Line 1: ")


def test_ids_and_windows_are_checked() -> None:
    from alvis_fsm.engine.batch import record as batch_record

    with pytest.raises(UsageError, match="Invalid batch id"):
        batch_record.check_id("batch_../../x")
    with pytest.raises(UsageError, match="completion window"):
        batch_record.window_seconds("tomorrow")
