"""One live session per model, whoever started it, and the next step that
works (issue 26, items 2, 6 and 8), through the session service and the
store (no cluster): `start` declined offers a free name and port; `start`
and the API point at the gateway's session; `logs MODEL` says which job."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fake_cluster import Say
from test_service import Agent, free_port, handles, live, settings

from alvis_fsm.cluster.tunnel import local_port_free
from alvis_fsm.engine.session import service
from alvis_fsm.engine.session.service import StartOptions
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.fronts.api import session as api
from alvis_fsm.fronts.gateway import instance
from alvis_fsm.fronts.gateway.slot.sessions import adoptable


def test_declining_offers_a_second_session_that_works(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    port = cfg.tunnel.local_port
    live(store, "gpt-oss-20b", port)
    store.save(SessionRecord(name="gpt-oss-20b-2", model="gpt-oss-20b", state="cleaned"))
    with pytest.raises(service.AlreadyLive) as err:
        service.create(cfg, StartOptions(time="2h"))
    m = re.fullmatch(
        r"alvis-fsm start -m gpt-oss-20b --new -n (\S+) --port (\d+)", err.value.second
    )
    assert m, err.value.second
    assert m.group(1) == "gpt-oss-20b-3"  # -2 is taken, if only by a finished session
    assert int(m.group(2)) != port and local_port_free(int(m.group(2)))
    assert err.value.second in (err.value.hint or "")
    # Followed literally, it passes every local check.
    again = settings(tmp_path, tunnel={"local_port": int(m.group(2))})
    new = service.create(again, StartOptions(time="2h", name=m.group(1), force_new=True))
    assert new.record.name == "gpt-oss-20b-3"


def test_start_points_at_the_gateway_serving_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alvis_fsm.fronts.cli.commands.start import _offer_resume
    from alvis_fsm.fronts.ui import Reporter, Verbosity

    state = tmp_path / "state"
    os.environ["ALVIS_FSM_SESSION__STATE_DIR"] = str(state)
    try:
        record = SessionRecord(name="gw-lab-ok", model="lab-ok", state="tunneled", job_id="13")
        with instance.claim(state) as me:
            me.publish(58777)
            _offer_resume(Reporter(Verbosity.NORMAL), service.AlreadyLive(record), Verbosity.NORMAL)
        out = capsys.readouterr().out
        assert "lab-ok is already served by the gateway at http://localhost:58777/v1" in out
        assert "no second job started" in out and "alvis-fsm env --gateway" in out
    finally:
        del os.environ["ALVIS_FSM_SESSION__STATE_DIR"]


def test_the_api_reuses_the_gateways_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.save(
        SessionRecord(
            name="gw-lab-ok",
            model="lab-ok",
            state="tunneled",
            job_id="13",
            local_socket=str(tmp_path / "sock"),
        )
    )
    monkeypatch.setattr("alvis_fsm.cluster.tunnel.health", lambda *a, **k: True)
    assert api._live_session(store, "lab-ok", None) is None  # not its socket
    assert api._gateway_session(store, "lab-ok", keep=False) is None  # no gateway runs
    with instance.claim(tmp_path) as me:
        me.publish(58777)
        s = api._gateway_session(store, "lab-ok", keep=False)
    assert s is not None and s.base_url == "http://localhost:58777/v1" and s.model == "lab-ok"
    assert s.served_name == "lab-ok" and not s.started_here and s.job_id == "13"


def test_the_gateway_adopts_only_live_answering_sessions_of_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.save(SessionRecord(name="gw-lab-ok", model="lab-ok", state="tunneled", local_port=1))
    store.save(SessionRecord(name="old", model="lab-ok", state="cleaned", local_port=2))
    store.save(SessionRecord(name="other", model="x", state="tunneled", local_port=3))
    answering = {4}
    monkeypatch.setattr("alvis_fsm.cluster.tunnel.health", lambda port, **k: port in answering)
    assert adoptable(store, "lab-ok") is None
    store.save(SessionRecord(name="lab-ok", model="lab-ok", state="tunneled", local_port=5))
    assert adoptable(store, "lab-ok") is None  # does not answer
    answering.add(5)
    assert adoptable(store, "lab-ok").name == "lab-ok"  # type: ignore[union-attr]


def test_logs_say_which_session_and_job(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, "gw-gpt-oss-20b", free_port())
    store.save(SessionRecord(name="gpt-oss-20b", model="gpt-oss-20b", state="cleaned", job_id="7"))
    from alvis_fsm.fronts.gateway.slot.sessions import session_of

    say = Say()
    service.logs(cfg, store, session_of(store, "gpt-oss-20b"), say, lines=10, **handles(Agent()))
    assert say.lines[0] == (
        "info",
        "Logs of session 'gw-gpt-oss-20b' (job 41, tunneled, model gpt-oss-20b)",
    )
