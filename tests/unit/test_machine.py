"""The session machine: its definition's validation and its behaviour."""

from __future__ import annotations

import copy
import time
import tomllib
from typing import Any

import pytest
from transitions import MachineError

from alvis_fsm import paths
from alvis_fsm.engine.machine import (
    LIVE_STATES,
    MachineDefinition,
    Session,
    State,
    build_machine,
    load_definition,
    packaged_definition,
    packaged_timeouts,
)
from alvis_fsm.errors import ConfigError

TIMEOUTS = {"job_start": 600.0, "server_ready": 600.0, "connection_test": 30.0, "cancel_confirm": 30.0}


def raw() -> dict[str, Any]:
    with paths.default_config().open("rb") as f:
        return copy.deepcopy(tomllib.load(f)["machine"])


def make(initial: State | str | None = None, **kw: Any) -> tuple[Session, Any]:
    model = Session()
    machine = build_machine(
        model, packaged_definition(), kw.pop("timeouts", TIMEOUTS), initial, **kw
    )
    return model, machine


# -- the definition --------------------------------------------------------------


def test_packaged_definition_loads() -> None:
    d = packaged_definition()
    assert d.initial == "idle"
    assert list(d.states) == [s.value for s in State]
    assert d.states["submitted"].timeout == "job_start"
    assert packaged_timeouts() == TIMEOUTS


def test_definition_is_a_pydantic_model_for_settings() -> None:
    d = MachineDefinition.model_validate(raw())
    assert MachineDefinition.model_validate(d.model_dump()) == d


def _drop_state(d: dict[str, Any], name: str) -> None:
    del d["states"][name]

    def touches(t: dict[str, Any]) -> bool:
        sources = [t["source"]] if isinstance(t["source"], str) else t["source"]
        return t["dest"] == name or name in sources

    d["transitions"] = [t for t in d["transitions"] if not touches(t)]


def _bad_state_name(d: dict[str, Any]) -> None:
    d["states"]["bogus"] = {}


def _no_failed(d: dict[str, Any]) -> None:
    _drop_state(d, "failed")


def _no_cleaned(d: dict[str, Any]) -> None:
    _drop_state(d, "cleaned")


def _no_tunneled(d: dict[str, Any]) -> None:
    _drop_state(d, "tunneled")


def _unknown_dest(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "fail", "source": "idle", "dest": "limbo"})


def _unknown_source(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "fail", "source": ["idle", "nowhere"], "dest": "failed"})


def _wildcard(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "clean", "source": "*", "dest": "cleaned"})


def _empty_source(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "clean", "source": [], "dest": "cleaned"})


def _bad_initial(d: dict[str, Any]) -> None:
    d["initial"] = "nirvana"


def _unreachable(d: dict[str, Any]) -> None:
    d["transitions"] = [t for t in d["transitions"] if t["trigger"] != "connect"]


def _live_cannot_clean(d: dict[str, Any]) -> None:
    # tunneled can only go back to serving, serving only to tunneled.
    d["transitions"] = [
        {"trigger": "submit", "source": "idle", "dest": "submitted"},
        {"trigger": "start", "source": "submitted", "dest": "running"},
        {"trigger": "ready", "source": "running", "dest": "serving"},
        {"trigger": "connect", "source": "serving", "dest": "tunneled"},
        {"trigger": "disconnect", "source": "tunneled", "dest": "serving"},
        {"trigger": "fail", "source": ["idle", "submitted", "running"], "dest": "failed"},
        {"trigger": "clean", "source": ["idle", "failed"], "dest": "cleaned"},
    ]


def _trigger_clash(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "history", "source": "idle", "dest": "failed"})


def _trigger_clash_callback(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "after_state_change", "source": "idle", "dest": "failed"})


def _trigger_clash_may(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "may_submit", "source": "idle", "dest": "failed"})


def _trigger_not_identifier(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "give up", "source": "idle", "dest": "failed"})


def _trigger_keyword(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "import", "source": "idle", "dest": "failed"})


def _trigger_private(d: dict[str, Any]) -> None:
    d["transitions"].append({"trigger": "_stop_timers", "source": "idle", "dest": "failed"})


def _extra_key(d: dict[str, Any]) -> None:
    d["states"]["idle"]["colour"] = "red"


@pytest.mark.parametrize(
    "mutate, words",
    [
        (_bad_state_name, ["unknown state", "bogus"]),
        (_no_failed, ["'failed'"]),
        (_no_cleaned, ["'cleaned'"]),
        (_no_tunneled, ["tunneled"]),
        (_unknown_dest, ["limbo"]),
        (_unknown_source, ["nowhere"]),
        (_wildcard, ["'*'"]),
        (_empty_source, ["no source"]),
        (_bad_initial, ["nirvana"]),
        (_unreachable, ["unreachable", "tunneled"]),
        (_live_cannot_clean, ["'serving'", "cleaned"]),
        (_trigger_clash, ["history", "clashes"]),
        (_trigger_clash_callback, ["after_state_change", "clashes"]),
        (_trigger_clash_may, ["may_submit", "clashes"]),
        (_trigger_not_identifier, ["give up", "identifier"]),
        (_trigger_keyword, ["import", "identifier"]),
        (_trigger_private, ["_stop_timers"]),
        (_extra_key, ["colour"]),
    ],
)
def test_bad_definition_rejected(mutate: Any, words: list[str]) -> None:
    d = raw()
    mutate(d)
    with pytest.raises(ConfigError) as err:
        load_definition(d)
    for word in words:
        assert word in err.value.message, err.value.message


def test_every_live_state_can_reach_cleaned() -> None:
    d = packaged_definition()
    edges: dict[str, set[str]] = {}
    for t in d.transitions:
        for s in t.sources:
            edges.setdefault(s, set()).add(t.dest)
    for live in LIVE_STATES:
        seen, todo = {live.value}, [live.value]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert "cleaned" in seen, live


def test_custom_trigger_is_bound() -> None:
    d = raw()
    d["transitions"].append({"trigger": "retry", "source": "failed", "dest": "idle"})
    model = Session()
    build_machine(model, load_definition(d), TIMEOUTS)
    model.fail()
    assert model.may_trigger("retry")
    assert vars(model)["may_retry"]()
    vars(model)["retry"]()
    assert model.state == "idle"


def test_missing_timeout_key() -> None:
    with pytest.raises(ConfigError) as err:
        build_machine(Session(), packaged_definition(), {"job_start": 1.0, "server_ready": 1.0})
    assert "connection_test" in err.value.message


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timeout_value(bad: float) -> None:
    with pytest.raises(ConfigError):
        build_machine(Session(), packaged_definition(), {**TIMEOUTS, "job_start": bad})


# -- behaviour -----------------------------------------------------------------------


def test_happy_path() -> None:
    model, machine = make()
    seen: list[State] = []
    model.on_change = seen.append
    assert model.state_enum is State.IDLE and model.is_idle()
    for trigger in ("submit", "start", "ready", "connect", "disconnect", "connect", "clean"):
        assert getattr(model, trigger)() is True
    expected = [
        State.SUBMITTED, State.RUNNING, State.SERVING, State.TUNNELED,
        State.SERVING, State.TUNNELED, State.CLEANED,
    ]  # fmt: skip
    assert seen == expected  # once per transition
    assert [s for s, _ in model.history] == [s.value for s in expected]
    assert set(model.entered_at) == {s.value for s in expected}
    assert model.is_cleaned()
    assert all(not t.is_alive() for s in machine.states.values() for t in s.runner.values())


def _drive_to(model: Session, state: State) -> None:
    path = {
        State.IDLE: [],
        State.SUBMITTED: ["submit"],
        State.RUNNING: ["submit", "start"],
        State.SERVING: ["submit", "start", "ready"],
        State.TUNNELED: ["submit", "start", "ready", "connect"],
    }[state]
    for trigger in path:
        getattr(model, trigger)()
    assert model.state == state


@pytest.mark.parametrize("state", sorted(LIVE_STATES | {State.IDLE}))
def test_fail_then_clean_from_every_live_state(state: State) -> None:
    model, _ = make()
    _drive_to(model, state)
    assert model.may_fail()
    model.fail()
    assert model.state == State.FAILED
    model.clean()
    assert model.state == State.CLEANED


@pytest.mark.parametrize("state", sorted(LIVE_STATES | {State.IDLE}))
def test_clean_from_every_live_state(state: State) -> None:
    model, _ = make()
    _drive_to(model, state)
    model.clean()
    assert model.state == State.CLEANED


def test_invalid_trigger_raises() -> None:
    model, _ = make()
    assert not model.may_ready()
    with pytest.raises(MachineError):
        model.ready()
    assert model.state == State.IDLE
    model.clean()
    with pytest.raises(MachineError):
        model.submit()


def test_unknown_trigger_name_raises() -> None:
    model, _ = make()
    with pytest.raises(AttributeError):
        model.trigger("explode")


def test_no_auto_transitions() -> None:
    model, _ = make()
    assert not hasattr(model, "to_cleaned")


def test_restore_into_running() -> None:
    model, _ = make(initial="running")
    assert model.state == State.RUNNING
    model.ready()
    assert model.state == State.SERVING


def test_restore_accepts_enum() -> None:
    model, _ = make(initial=State.TUNNELED)
    assert model.is_tunneled()


def test_restore_into_bogus_raises_and_adds_nothing() -> None:
    model = Session()
    definition = packaged_definition()
    with pytest.raises(ConfigError) as err:
        build_machine(model, definition, TIMEOUTS, initial="bogus")
    assert "bogus" in err.value.message
    assert "bogus" not in definition.states
    assert model.state == State.IDLE


def test_timeout_fires_on_timer_thread_without_transitioning() -> None:
    model, _ = make(timeouts={**TIMEOUTS, "job_start": 0.05})
    model.submit()
    assert model.timed_out.wait(2)
    assert model.timed_out_state == "submitted"
    assert model.timeout_pending()
    assert model.state == State.SUBMITTED  # the engine's main thread fires `timeout`
    model.timeout()
    assert model.state == State.FAILED
    assert not model.timed_out.is_set() and not model.timeout_pending()


def test_leaving_a_state_cancels_its_timer() -> None:
    model, _ = make(timeouts={**TIMEOUTS, "job_start": 0.2})
    model.submit()
    model.start()
    time.sleep(0.4)
    assert not model.timed_out.is_set()


def test_restore_arms_remaining_timeout() -> None:
    model, _ = make(
        initial="running", timeouts={**TIMEOUTS, "server_ready": 10.0}, already_spent=9.9
    )
    assert model.timed_out.wait(2)
    assert model.timed_out_state == "running"
    # An overdue state still times out, through the timer thread.
    model2, _ = make(initial="submitted", already_spent=10_000.0)
    assert model2.timed_out.wait(2)
    assert model2.timed_out_state == "submitted"


def test_restore_timer_cancelled_by_leaving() -> None:
    model, _ = make(initial="running", timeouts={**TIMEOUTS, "server_ready": 0.2})
    model.ready()
    time.sleep(0.4)
    assert not model.timed_out.is_set()


def test_stop_timers() -> None:
    model, machine = make(timeouts={**TIMEOUTS, "job_start": 0.2})
    model.submit()
    model.stop_timers()
    time.sleep(0.4)
    assert not model.timed_out.is_set()
    assert all(not s.runner for s in machine.states.values())


def test_timers_are_daemon_threads() -> None:
    model, machine = make()
    model.submit()
    timers = [t for s in machine.states.values() for t in s.runner.values()]
    assert timers and all(t.daemon for t in timers)
    model.clean()
    for t in timers:
        t.join(2)
    assert not any(t.is_alive() for t in timers)


# -- every transition the driver fires is guaranteed by the validator ---------------
def _drop(d: dict[str, Any], trigger: str, source: str) -> dict[str, Any]:
    for t in d["transitions"]:
        if t["trigger"] == trigger:
            sources = [t["source"]] if isinstance(t["source"], str) else t["source"]
            t["source"] = [s for s in sources if s != source]
    d["transitions"] = [t for t in d["transitions"] if t["source"]]
    return d


@pytest.mark.parametrize(
    ("trigger", "source"),
    [("clean", "tunneled"), ("clean", "failed"), ("fail", "idle"), ("timeout", "running"),
     ("disconnect", "tunneled")],
)  # fmt: skip
def test_a_transition_the_driver_fires_cannot_be_removed(trigger: str, source: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_definition(_drop(raw(), trigger, source))
    assert f"no transition {trigger!r} from {source!r}" in exc.value.message + str(exc.value.details)


def test_a_new_timed_state_needs_a_timeout_transition() -> None:
    d = raw()
    d["states"]["tunneled"]["timeout"] = "connection_test"
    with pytest.raises(ConfigError) as exc:
        load_definition(d)
    assert "no transition 'timeout' from 'tunneled'" in exc.value.message + str(exc.value.details)
