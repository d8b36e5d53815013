"""The session machine: its definition's validation and its behaviour."""

from __future__ import annotations

import copy
import threading
import time
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from transitions import MachineError

from alvis_fsm import paths
from alvis_fsm.engine.session.machine import (
    LIVE_STATES,
    MachineDefinition,
    SessionModel,
    State,
    build_machine,
    load_definition,
    packaged_definition,
    packaged_timeouts,
)
from alvis_fsm.errors import ConfigError

TIMEOUTS = {
    "job_start": 600.0,
    "server_ready": 600.0,
    "connection_test": 30.0,
    "cancel_confirm": 30.0,
}


def raw() -> dict[str, Any]:
    with paths.default_config().open("rb") as f:
        return copy.deepcopy(tomllib.load(f)["machine"])


def make(initial: State | str | None = None, **kw: Any) -> tuple[SessionModel, Any]:
    model = SessionModel()
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
    d["transitions"].append({"trigger": "before_state_change", "source": "idle", "dest": "failed"})


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
        (_trigger_clash_callback, ["before_state_change", "clashes"]),
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
    model = SessionModel()
    build_machine(model, load_definition(d), TIMEOUTS)
    model.fail()
    assert model.may_trigger("retry")
    assert vars(model)["may_retry"]()
    vars(model)["retry"]()
    assert model.state == "idle"


def test_missing_timeout_key() -> None:
    with pytest.raises(ConfigError) as err:
        build_machine(
            SessionModel(), packaged_definition(), {"job_start": 1.0, "server_ready": 1.0}
        )
    assert "connection_test" in err.value.message


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timeout_value(bad: float) -> None:
    with pytest.raises(ConfigError):
        build_machine(SessionModel(), packaged_definition(), {**TIMEOUTS, "job_start": bad})


# -- behaviour -----------------------------------------------------------------------


def test_happy_path() -> None:
    model, machine = make()
    seen: list[State] = []
    model.on_change = seen.append
    assert model.state_enum is State.IDLE and model.is_idle()
    for trigger in ("submit", "start", "ready", "connect", "disconnect", "connect", "clean"):
        assert getattr(model, trigger)() is True
    expected = [
        State.SUBMITTED,
        State.RUNNING,
        State.SERVING,
        State.TUNNELED,
        State.SERVING,
        State.TUNNELED,
        State.CLEANED,
    ]
    assert seen == expected  # once per transition
    assert [s for s, _ in model.history] == [s.value for s in expected]
    assert set(model.entered_at) == {s.value for s in expected}
    assert model.is_cleaned()
    assert machine.has_queue  # steps fire the next trigger and return (no recursion)


def _drive_to(model: SessionModel, state: State) -> None:
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
    model = SessionModel()
    definition = packaged_definition()
    with pytest.raises(ConfigError) as err:
        build_machine(model, definition, TIMEOUTS, initial="bogus")
    assert "bogus" in err.value.message
    assert "bogus" not in definition.states
    assert model.state == State.IDLE


# -- behaviour attached to the states; no timers --------------------------------------
def test_the_machine_starts_no_threads() -> None:
    """Timeouts are judged by the engine from the cluster's facts (see
    test_driver's client-sleep tests), not by timers on this machine."""
    before = threading.active_count()
    model, _ = make(timeouts={**TIMEOUTS, "job_start": 0.01})
    model.submit()
    time.sleep(0.1)
    assert model.state == State.SUBMITTED
    assert threading.active_count() == before


def test_each_live_state_runs_its_on_enter_step_in_order() -> None:
    model = SessionModel()
    ran: list[str] = []

    def step(name: str, then: str | None) -> Callable[[], None]:
        def run() -> None:
            ran.append(name)
            if then:
                getattr(model, then)()  # queued: runs after this step returns
                ran.append(f"{name} returned")

        return run

    steps = {
        "await_start": step("await_start", "start"),
        "await_server": step("await_server", "ready"),
        "connect": step("connect", "connect"),
        "serve": step("serve", None),
    }
    build_machine(model, packaged_definition(), TIMEOUTS, steps=steps)
    model.submit()
    assert ran == [
        "await_start",
        "await_start returned",
        "await_server",
        "await_server returned",
        "connect",
        "connect returned",
        "serve",
    ]
    assert model.state == State.TUNNELED


def test_state_is_recorded_before_its_step_runs() -> None:
    model = SessionModel()
    seen: list[State] = []
    model.on_change = seen.append

    def serve() -> None:
        assert seen[-1] is State.TUNNELED  # saved before the step: a crash in it keeps it
        raise RuntimeError("boom")

    noop: Callable[[], None] = lambda: None  # noqa: E731
    build_machine(
        model,
        packaged_definition(),
        TIMEOUTS,
        initial="serving",
        steps={"await_start": noop, "await_server": noop, "connect": noop, "serve": serve},
    )
    with pytest.raises(RuntimeError):
        model.connect()
    assert model.state == State.TUNNELED
    # The error cleared the queue: the machine takes the next trigger at once.
    model.fail()
    assert model.state == State.FAILED


def test_resume_reenters_the_state_and_runs_its_step_again() -> None:
    model = SessionModel()
    ran: list[str] = []
    seen: list[State] = []
    model.on_change = seen.append
    noop: Callable[[], None] = lambda: None  # noqa: E731
    build_machine(
        model,
        packaged_definition(),
        TIMEOUTS,
        initial="running",
        steps={
            "await_start": noop,
            "await_server": lambda: ran.append("await_server"),
            "connect": noop,
            "serve": noop,
        },
    )
    model.resume()
    assert ran == ["await_server"] and model.state == State.RUNNING
    assert seen == [] and model.history == []  # not a change of state


def test_timeouts_are_still_checked_when_the_machine_is_built() -> None:
    with pytest.raises(ConfigError, match="job_start"):
        make(timeouts={k: v for k, v in TIMEOUTS.items() if k != "job_start"})
    with pytest.raises(ConfigError, match="positive"):
        make(timeouts={**TIMEOUTS, "job_start": 0.0})


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
    [
        ("clean", "tunneled"),
        ("clean", "failed"),
        ("fail", "idle"),
        ("timeout", "running"),
        ("disconnect", "tunneled"),
    ],
)
def test_a_transition_the_driver_fires_cannot_be_removed(trigger: str, source: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_definition(_drop(raw(), trigger, source))
    assert f"no transition {trigger!r} from {source!r}" in exc.value.message + str(
        exc.value.details
    )


def test_a_new_timed_state_needs_a_timeout_transition() -> None:
    d = raw()
    d["states"]["tunneled"]["timeout"] = "connection_test"
    with pytest.raises(ConfigError) as exc:
        load_definition(d)
    assert "no transition 'timeout' from 'tunneled'" in exc.value.message + str(exc.value.details)
