"""`alvis_fsm.session(model, via="gateway")`: a client of the running gateway,
one started in the background when none runs (a real process; it starts no
job until a request asks, so no cluster is needed here) and stopped on exit
when the block started it (issue 24, item 2)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import alvis_fsm
from alvis_fsm.errors import UsageError
from alvis_fsm.fronts.gateway import instance


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_gateway_left: list[Path]) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("ALVIS_FSM_SESSION__STATE_DIR", str(state))
    monkeypatch.setenv("ALVIS_FSM_GATEWAY__PORT", str(free_port()))
    no_gateway_left.append(state)
    return state


def test_via_gateway_starts_one_uses_it_and_stops_what_it_started(state: Path) -> None:
    assert instance.running(state) is None
    with alvis_fsm.session("gpt-oss-20b", via="gateway") as s:
        found = instance.running(state)
        assert found is not None and s.base_url == found.base_url
        assert s.api_key == (state / "gateway.key").read_text().strip()
        assert s.model == "gpt-oss-20b" and s.started_here
        # The openai client through the gateway lists the catalog (no job started).
        names = [m.id for m in s.openai(max_retries=0).models.list()]
        assert "gpt-oss-20b" in names
        # A second session of the API finds the same gateway and does not own it.
        with alvis_fsm.session("gpt-oss-20b", via="gateway") as again:
            assert again.base_url == s.base_url and not again.started_here
        assert instance.running(state) is not None  # the inner block left it running
    assert not instance.claimed(state)  # the block that started it stopped it


def test_via_gateway_keep_leaves_it_running(state: Path) -> None:
    with alvis_fsm.session("gpt-oss-20b", via="gateway", keep=True):
        pass
    assert instance.running(state) is not None


def test_via_gateway_refuses_an_unknown_model_and_starts_nothing(state: Path) -> None:
    with pytest.raises(UsageError, match="no-such-model"):
        alvis_fsm.session("no-such-model", via="gateway")
    assert not instance.claimed(state)
    with pytest.raises(UsageError, match="via must be"):
        alvis_fsm.session("gpt-oss-20b", via="elsewhere")  # type: ignore[arg-type]
