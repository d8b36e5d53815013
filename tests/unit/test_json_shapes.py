"""`--json` output against the table of docs/reference/json-output.md, the documented
schema: one JSON object on stdout, nothing on stderr, the documented keys,
and errors as {"error": {...}} with the usual exit code (issue 16)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.fronts.cli.main import main

JSON_PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "json-output.md"


def documented() -> dict[str, list[str]]:
    """Command -> the quoted key names of its row, in order."""
    text = JSON_PAGE.read_text(encoding="utf-8")
    body = text.split("\n## Shapes\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in body.splitlines():
        m = re.match(r"^\| `?([^`|]+?)`? \| (.+) \|$", line)
        if m and not line.startswith("| ---") and m.group(1) != "Command":
            rows[m.group(1)] = re.findall(r'"(\w+)"', m.group(2))
    return rows


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    assert out.err == "", out.err
    assert out.out.endswith("}\n") and out.out.count("\n{") == 0
    data = json.loads(out.out)
    assert isinstance(data, dict)
    return int(done.value.code or 0), data


@pytest.fixture
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SessionRecord:
    state = tmp_path / "state"
    monkeypatch.setenv("ALVIS_FSM_SESSION__STATE_DIR", str(state))
    record = SessionRecord(
        name="lab-ok",
        model="lab-ok",
        state="tunneled",
        job_id="42",
        node="alvis7-07",
        port=41084,
        local_port=58123,
        api_key="afsm-k",
        served_name="alvislab/tiny-ok",
    )
    Store(state).save(record)
    return record


def test_every_reporting_command_is_documented() -> None:
    assert set(documented()) >= {
        "status --json",
        "start --detach --json",
        "models --json",
        "models --discover --json",
        "config show --json",
        "env --json",
        "any, on failure",
    }


def test_status(session: SessionRecord, capsys: pytest.CaptureFixture[str]) -> None:
    from alvis_fsm.fronts.cli.commands.status import row

    code, data = run(["status", "--offline", "--json"], capsys)
    assert code == 0
    assert list(data) == documented()["status --json"] == ["sessions", "errors", "gateway"]
    (item,) = data["sessions"]  # type: ignore[misc]
    assert set(item) == set(row(session))


def test_start_detach_documents_the_session_row() -> None:
    names = documented()["start --detach --json"]
    assert names == ["session", "api_key", "account"]


def test_models(capsys: pytest.CaptureFixture[str]) -> None:
    names = documented()["models --json"]
    code, data = run(["models", "--json"], capsys)
    assert code == 0
    assert list(data) == names[:1]
    for entry in data["models"].values():  # type: ignore[attr-defined]
        assert set(entry) == set(names[1:])


def test_config_show(capsys: pytest.CaptureFixture[str], user_conf: Path) -> None:
    names = documented()["config show --json"]  # settings, key, value, source, file
    code, data = run(["config", "show", "--json"], capsys)
    assert code == 0
    assert set(data) == {names[0], names[-1]}
    assert data["file"] == str(user_conf)
    items = data["settings"]
    assert isinstance(items, list) and items
    for item in items:
        assert list(item) == names[1:-1]
    account = next(i for i in items if i["key"] == "slurm.account")
    assert account == {"key": "slurm.account", "value": "", "source": "default"}


def test_env(session: SessionRecord, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run(["env", "--json"], capsys)
    assert code == 0
    assert list(data) == documented()["env --json"]
    assert data == {
        "name": "lab-ok",
        "base_url": "http://localhost:58123/v1",
        "api_key": "afsm-k",
        "model": "alvislab/tiny-ok",
    }


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["status", "--offline", "--json", "nosuch"], 7),
        (["env", "--json", "nosuch"], 7),
        (["start", "--json"], 2),  # --json needs --detach
        (["models", "--json", "--bogus"], 2),
        (["start", "--detach", "--json", "--port", "0"], 2),
    ],
)
def test_errors_are_json(
    argv: list[str],
    code: int,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALVIS_FSM_SESSION__STATE_DIR", str(tmp_path / "none"))
    got, data = run(argv, capsys)
    assert got == code
    names = documented()["any, on failure"]
    assert list(data) == names[:1]
    error = data["error"]
    assert isinstance(error, dict) and list(error) == names[1:]
    assert error["exit_code"] == code and error["message"]
