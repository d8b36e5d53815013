"""The session state machine, declared as data and run by pytransitions.

The states are fixed by the program (``State``); which transitions connect
them, and which ``[timeouts]`` key bounds each state, come from the
``[machine]`` section of the settings, validated here when they are loaded
so a bad definition fails at start-up with a message naming the offender,
never halfway through a session with a GPU job running.

Threading: the Timeout state feature runs its callbacks on a timer thread.
``Session.on_state_timeout`` therefore only records the timeout; the engine's
main thread notices it and fires ``timeout``, so transitions only ever
happen on one thread."""

from __future__ import annotations

import keyword
import math
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any, NoReturn, cast

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from alvis_fsm import paths
from alvis_fsm.errors import ConfigError

if TYPE_CHECKING:
    # transitions (~50 ms: its extensions package imports every extension)
    # is imported only when a machine is built, not by settings' import of
    # MachineDefinition.
    from transitions import Machine


class State(StrEnum):
    IDLE = "idle"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SERVING = "serving"
    TUNNELED = "tunneled"
    FAILED = "failed"
    CLEANED = "cleaned"


# States in which a job may exist on the cluster: leaving any of them must be
# possible without leaking a GPU job.
LIVE_STATES = frozenset({State.SUBMITTED, State.RUNNING, State.SERVING, State.TUNNELED})

# The triggers the engine fires; each has a typed stub on Session.
TRIGGERS = ("submit", "start", "ready", "connect", "disconnect", "timeout", "fail", "clean")

# A restored timeout that is already overdue still fires through the timer
# thread (not synchronously inside build_machine), hence a tiny positive delay.
_MIN_TIMEOUT = 0.001


# -- the definition ------------------------------------------------------------


class StateDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    timeout: str | None = None  # a key of [timeouts]


class TransitionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trigger: str
    source: str | list[str]
    dest: str

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


def _reachable(start: str, transitions: Iterable[TransitionDef]) -> set[str]:
    edges: dict[str, set[str]] = {}
    for t in transitions:
        for s in t.sources:
            edges.setdefault(s, set()).add(t.dest)
    seen = {start}
    todo = [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


class MachineDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial: str
    states: dict[str, StateDef]
    transitions: list[TransitionDef]

    @model_validator(mode="after")
    def _check(self) -> MachineDefinition:
        known = [s.value for s in State]
        listing = ", ".join(known)
        for name in self.states:
            if name not in known:
                raise ValueError(
                    f"unknown state {name!r} in [machine.states] (states are: {listing})"
                )
        for required in (State.FAILED, State.CLEANED):
            if required.value not in self.states:
                raise ValueError(f"the machine must define the state {required.value!r}")
        missing = [s for s in known if s not in self.states]
        if missing:
            raise ValueError("the machine does not define the state(s) " + ", ".join(missing))
        if self.initial not in self.states:
            raise ValueError(
                f"initial state {self.initial!r} is not a state (states are: {listing})"
            )
        reserved = _reserved_names()
        for t in self.transitions:
            where = f"transition {t.trigger!r}"
            if not t.sources:
                raise ValueError(f"{where} has no source state")
            for name in [*t.sources, t.dest]:
                if name == "*":
                    raise ValueError(f"{where}: the wildcard '*' is not allowed, list the states")
                if name not in self.states:
                    raise ValueError(
                        f"{where} names unknown state {name!r} (states are: {listing})"
                    )
            if not t.trigger.isidentifier() or keyword.iskeyword(t.trigger):
                raise ValueError(f"trigger {t.trigger!r} is not a valid identifier")
            if t.trigger.startswith("_"):
                raise ValueError(f"trigger {t.trigger!r} must not start with '_'")
            # A trigger may only replace its own stubs (submit, may_submit).
            own = {t.trigger, f"may_{t.trigger}"} if t.trigger in TRIGGERS else set()
            for attr in (t.trigger, f"may_{t.trigger}"):
                if attr in reserved - own:
                    raise ValueError(
                        f"trigger {t.trigger!r} clashes with the session attribute {attr!r}"
                    )
        reachable = _reachable(self.initial, self.transitions)
        unreachable = [s for s in self.states if s not in reachable]
        if unreachable:
            raise ValueError(
                f"state(s) unreachable from {self.initial!r}: " + ", ".join(unreachable)
            )
        for live in sorted(LIVE_STATES):
            if State.CLEANED.value not in _reachable(live.value, self.transitions):
                raise ValueError(
                    f"state {live.value!r} cannot reach 'cleaned': a job could be left running"
                )
        fired = {(t.trigger, src): t.dest for t in self.transitions for src in t.sources}
        for trigger, src in _driver_fires(self.states):
            if (trigger, src) not in fired:
                raise ValueError(
                    f"the machine has no transition {trigger!r} from {src!r}, which the "
                    "session driver fires there (a session could be left stuck)"
                )
        return self


def _driver_fires(states: Mapping[str, StateDef]) -> list[tuple[str, str]]:
    """Every (trigger, source) the session driver fires: its path through the
    states, `clean` from every state but `cleaned` (cleanup may run anywhere),
    `fail` from idle and every live state, `timeout` from every timed state."""
    fires = [
        ("submit", State.IDLE.value),
        ("start", State.SUBMITTED.value),
        ("ready", State.RUNNING.value),
        ("connect", State.SERVING.value),
        ("disconnect", State.TUNNELED.value),
    ]
    fires += [("clean", s.value) for s in State if s is not State.CLEANED]
    fires += [("fail", s.value) for s in sorted(LIVE_STATES | {State.IDLE})]
    fires += [("timeout", name) for name, sdef in states.items() if sdef.timeout]
    return fires


def load_definition(data: Mapping[str, Any]) -> MachineDefinition:
    """Validate a ``[machine]`` table; errors become one ``ConfigError``."""
    try:
        return MachineDefinition.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise ConfigError(
            "Invalid [machine] definition: " + "; ".join(problems),
            hint="Compare with the [machine] section of the packaged default.toml "
            "(`alvis-fsm diagram` draws the packaged machine).",
        ) from exc


def packaged_definition() -> MachineDefinition:
    """The ``[machine]`` section of the packaged ``default.toml``."""
    with paths.default_config().open("rb") as f:
        return load_definition(tomllib.load(f)["machine"])


def packaged_timeouts() -> dict[str, float]:
    """The ``[timeouts]`` section of the packaged ``default.toml``."""
    with paths.default_config().open("rb") as f:
        return {k: float(v) for k, v in tomllib.load(f)["timeouts"].items()}


# -- the model -------------------------------------------------------------------


def _undefined(trigger: str) -> NoReturn:
    raise AttributeError(f"the machine definition has no trigger {trigger!r}")


class Session:
    """The model the machine drives. The trigger methods below are typed
    stubs; ``build_machine`` (``model_override=True``) replaces them on the
    instance, so a stub only runs if the definition lacks that trigger."""

    state: str

    def __init__(self) -> None:
        self.state = State.IDLE.value
        self.entered_at: dict[str, float] = {}
        self.history: list[tuple[str, str]] = []
        self.timed_out = threading.Event()
        self.timed_out_state: str | None = None
        self.on_change: Callable[[State], None] | None = None
        self._stop_timers: Callable[[], None] | None = None

    @property
    def state_enum(self) -> State:
        return State(self.state)

    # -- callbacks (named in build_machine) --
    def after_state_change(self, *_: object, **__: object) -> None:
        self.entered_at[self.state] = time.time()
        self.history.append((self.state, datetime.now().astimezone().isoformat(timespec="seconds")))
        # A timeout belongs to the state it fired in; a new state starts clean.
        self.timed_out.clear()
        self.timed_out_state = None
        if self.state == State.CLEANED:
            self.stop_timers()
        if self.on_change is not None:
            self.on_change(self.state_enum)

    def on_state_timeout(self, *_: object, **__: object) -> None:
        # Runs on the timer thread: record only, never transition here.
        self.timed_out_state = self.state
        self.timed_out.set()

    def timeout_pending(self) -> bool:
        """True if the *current* state timed out (a timer racing a transition
        may have fired for the state just left)."""
        return self.timed_out.is_set() and self.timed_out_state == self.state

    def stop_timers(self) -> None:
        """Cancel every pending state timeout (on cleanup or when detaching)."""
        if self._stop_timers is not None:
            self._stop_timers()

    # -- triggers (replaced by transitions) --
    def trigger(self, name: str, *args: Any, **kwargs: Any) -> bool:
        _undefined(name)

    def may_trigger(self, name: str, *args: Any, **kwargs: Any) -> bool:
        _undefined(name)

    def submit(self) -> bool:
        _undefined("submit")

    def start(self) -> bool:
        _undefined("start")

    def ready(self) -> bool:
        _undefined("ready")

    def connect(self) -> bool:
        _undefined("connect")

    def disconnect(self) -> bool:
        _undefined("disconnect")

    def timeout(self) -> bool:
        _undefined("timeout")

    def fail(self) -> bool:
        _undefined("fail")

    def clean(self) -> bool:
        _undefined("clean")

    def may_submit(self) -> bool:
        _undefined("submit")

    def may_start(self) -> bool:
        _undefined("start")

    def may_ready(self) -> bool:
        _undefined("ready")

    def may_connect(self) -> bool:
        _undefined("connect")

    def may_disconnect(self) -> bool:
        _undefined("disconnect")

    def may_timeout(self) -> bool:
        _undefined("timeout")

    def may_fail(self) -> bool:
        _undefined("fail")

    def may_clean(self) -> bool:
        _undefined("clean")

    # With model_override=True transitions binds only names the model
    # declares (and logs a warning for the others), so the is_<state>
    # conveniences are declared too.
    def is_idle(self) -> bool:
        return self.state == State.IDLE

    def is_submitted(self) -> bool:
        return self.state == State.SUBMITTED

    def is_running(self) -> bool:
        return self.state == State.RUNNING

    def is_serving(self) -> bool:
        return self.state == State.SERVING

    def is_tunneled(self) -> bool:
        return self.state == State.TUNNELED

    def is_failed(self) -> bool:
        return self.state == State.FAILED

    def is_cleaned(self) -> bool:
        return self.state == State.CLEANED


def _reserved_names() -> set[str]:
    """Session attributes a trigger must not shadow."""
    return set(dir(Session)) | set(vars(Session())) | {"get_graph"}


# -- the machine -----------------------------------------------------------------


@cache
def _session_machine() -> type[Machine]:
    from transitions import Machine
    from transitions.extensions.states import Timeout, add_state_features

    @add_state_features(Timeout)
    class SessionMachine(Machine):
        """A transitions Machine whose states carry timeouts."""

        def stop_timers(self) -> None:
            for state in self.states.values():
                runner: dict[int, threading.Timer] = getattr(state, "runner", {})
                for timer in runner.values():
                    timer.cancel()
                runner.clear()

    return SessionMachine


def _restore_name(initial: State | str, definition: MachineDefinition) -> str:
    name = initial.value if isinstance(initial, State) else str(initial)
    valid = [s.value for s in State]
    # transitions would silently add an unknown initial state to the machine.
    if name not in valid or name not in definition.states:
        raise ConfigError(
            f"Cannot restore the session into unknown state {name!r}",
            hint="Valid states: " + ", ".join(valid) + ". The session file may be corrupt.",
        )
    return name


def _state_configs(
    definition: MachineDefinition, timeouts: Mapping[str, float]
) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = []
    for name, sdef in definition.states.items():
        config: dict[str, Any] = {"name": name}
        if sdef.timeout is not None:
            if sdef.timeout not in timeouts:
                raise ConfigError(
                    f"State {name!r} names timeout {sdef.timeout!r}, which is not set",
                    hint="Known timeouts: " + ", ".join(sorted(timeouts)),
                )
            seconds = float(timeouts[sdef.timeout])
            if not (math.isfinite(seconds) and seconds > 0):
                raise ConfigError(
                    f"Timeout {sdef.timeout!r} must be a positive number of seconds, got {seconds}"
                )
            config["timeout"] = seconds
            config["on_timeout"] = "on_state_timeout"
        configs.append(config)
    return configs


def build_machine(
    model: Session,
    definition: MachineDefinition,
    timeouts: Mapping[str, float],
    initial: State | str | None = None,
    already_spent: float = 0.0,
) -> Machine:
    """A machine driving ``model`` through ``definition``.

    ``initial`` restores a saved state; its timeout is armed with what is
    left of it after ``already_spent`` seconds (entering the initial state
    of a machine starts no timer by itself)."""
    from transitions import EventData
    from transitions.core import Event
    from transitions.extensions.states import Timeout

    start = definition.initial if initial is None else _restore_name(initial, definition)
    machine = _session_machine()(
        model=model,
        states=_state_configs(definition, timeouts),
        transitions=[
            {"trigger": t.trigger, "source": t.sources, "dest": t.dest}
            for t in definition.transitions
        ],
        initial=start,
        auto_transitions=False,
        send_event=False,
        ignore_invalid_triggers=False,
        after_state_change="after_state_change",
        queued=False,
        model_override=True,
    )
    # model_override binds only declared names: bind triggers a custom
    # definition adds beyond the stubs, so getattr(model, trigger) works.
    for trigger, event in machine.events.items():
        if trigger not in TRIGGERS:
            setattr(model, trigger, lambda *a, _e=event, **k: _e.trigger(model, *a, **k))
            setattr(
                model, f"may_{trigger}", lambda *a, _t=trigger, **k: model.may_trigger(_t, *a, **k)
            )
    model._stop_timers = cast(Callable[[], None], getattr(machine, "stop_timers"))  # noqa: B009
    state = cast(Timeout, machine.get_state(start))
    if state.timeout > 0:
        remaining = max(state.timeout - max(already_spent, 0.0), _MIN_TIMEOUT)
        event_data = EventData(state, Event("restore", machine), machine, model, (), {})
        # Same bookkeeping as Timeout.enter, so leaving the state cancels it.
        timer = threading.Timer(remaining, state._process_timeout, args=(event_data,))
        timer.daemon = True
        timer.start()
        state.runner[id(model)] = timer
    return machine


# -- the diagram -------------------------------------------------------------------


def _mermaid_text(text: str) -> str:
    # Keep labels inside one mermaid statement: no quotes, separators or
    # line breaks from a user's description.
    return " ".join(text.replace('"', "'").replace(";", ",").replace("#", "").split())


def to_mermaid(definition: MachineDefinition, timeouts: Mapping[str, float] | None = None) -> str:
    """The machine as a Mermaid state diagram, generated by transitions'
    GraphMachine (pure-python mermaid engine). Deterministic: states and
    edges follow the definition's order."""
    from transitions import State as _TState
    from transitions.extensions.diagrams import GraphMachine
    from transitions.extensions.states import add_state_features

    class _Labelled(_TState):
        """A state with a diagram label (the markup picks up ``label``)."""

        def __init__(self, *args: Any, label: str | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if label:
                self.label = label

    machine_cls = add_state_features(_Labelled)(type("_DiagramMachine", (GraphMachine,), {}))
    states: list[dict[str, Any]] = []
    for name, sdef in definition.states.items():
        label = name
        if sdef.timeout is not None:
            seconds = (timeouts or {}).get(sdef.timeout)
            shown = f"{sdef.timeout} {seconds:g} s" if seconds is not None else sdef.timeout
            label = f"{name} [timeout: {_mermaid_text(shown)}]"
        states.append({"name": name, "label": label})
    machine = machine_cls(
        model=None,
        states=states,
        transitions=[
            {"trigger": t.trigger, "source": t.sources, "dest": t.dest}
            for t in definition.transitions
        ],
        initial=definition.initial,
        auto_transitions=False,
        graph_engine="mermaid",
        title="alvis-fsm session",
    )
    # A fresh graph of the machine itself: no model, so no "active" state.
    source = str(machine.graph_cls(machine).get_graph(title="alvis-fsm session").draw(None))
    lines = [line.rstrip() for line in source.splitlines()]
    for name, sdef in definition.states.items():
        if sdef.description:
            lines.append(f"  {name} : {_mermaid_text(sdef.description)}")
    return "\n".join(lines) + "\n"
