"""The Python API on the lab: `alvis_fsm.session(...)` starts a session (or
reuses a live one), hands out an `openai.OpenAI` client, and stops what it
started when the `with` block ends. Progress goes to the `alvis_fsm` logger,
nothing to stdout; errors are the CLI's exception classes."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import pytest
from tool import free_port, ssh_clients, tool_jobs

import alvis_fsm
from alvis_fsm.errors import AlvisError, ExitCode, UsageError


@pytest.fixture
def api_env(lab: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process as a user of the lab (what tests/integration/tool.Tool
    sets for a child process)."""
    state = Path(tempfile.mkdtemp(prefix="afsm-", dir="/tmp"))
    for key, value in lab.env.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ALVIS_FSM_SESSION__STATE_DIR", str(state))
    monkeypatch.setenv("ALVIS_FSM_TUNNEL__LOCAL_PORT", str(free_port()))
    return state


class _Tool:  # what tool_jobs() reads
    def __init__(self, state: Path) -> None:
        self.state_dir = state


def test_session_starts_serves_reuses_and_stops(
    lab: Any, api_env: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="alvis_fsm")
    with alvis_fsm.session("lab-ok", time="0:10:00") as s:
        assert s.started_here and s.job_id
        assert s.base_url.startswith("http://localhost:") and s.base_url.endswith("/v1")
        reply = s.openai().chat.completions.create(
            model=s.served_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
        assert reply.choices[0].message.content
        # A second call reuses the live session instead of starting another job.
        again = alvis_fsm.session("lab-ok")
        assert (again.job_id, again.started_here) == (s.job_id, False)
        assert tool_jobs(lab, _Tool(api_env)) == [s.job_id]
        again.__exit__(None, None, None)  # did not start it: leaves it running
        assert tool_jobs(lab, _Tool(api_env)) == [s.job_id]
    assert tool_jobs(lab, _Tool(api_env)) == []
    assert ssh_clients(str(api_env)) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Job submitted: ") for m in messages), messages
    assert any("reusing session lab-ok" in m for m in messages)
    assert any(f"Cleaned up job {s.job_id} successfully" in m for m in messages)
    assert capsys.readouterr().out == ""  # progress goes to the logger only


def test_errors_are_the_cli_exception_classes(lab: Any, api_env: Path) -> None:
    with pytest.raises(UsageError) as info:
        alvis_fsm.session("no-such-model")
    assert isinstance(info.value, AlvisError) and info.value.exit_code == ExitCode.USAGE
    with pytest.raises(UsageError, match="via must be"):
        alvis_fsm.session("lab-ok", via="elsewhere")  # type: ignore[arg-type]
    assert tool_jobs(lab, _Tool(api_env)) == []
