"""The session state machine, declared as data and run by pytransitions.

The states are fixed by the program (``State``); which transitions connect
them, and which ``[timeouts]`` key bounds each state, come from the
``[machine]`` section of the settings, validated here when they are loaded
so a bad definition fails at start-up with a message naming the offender,
never halfway through a session with a GPU job running.

The behaviour is attached to the states: each live state names, in
``on_enter``, the engine step that runs when the session enters it (submit
and wait for a node, wait for vLLM, open and verify the tunnel, serve). The
machine is *queued*: a step that fires the next trigger returns first, then
the machine enters the next state and runs its step, so the whole life of a
session is one flat loop inside the machine, readable from ``[machine]``
and ``engine/session/runner.py``. A session picked up again (``resume``) re-enters
its state through the reflexive ``resume`` transition, running the same step.

Timeouts: a state's ``timeout`` names a ``[timeouts]`` key; the engine judges
it from the cluster's facts (how long the state has lasted on the login
node's clock), never from a timer on this machine, so a laptop that slept
cannot time a job out. The machine itself starts no threads."""

from __future__ import annotations

import keyword
import math
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from alvis_fsm import paths
from alvis_fsm.engine.session.states import LIVE_STATES, State
from alvis_fsm.errors import ConfigError

if TYPE_CHECKING:
    # transitions (~50 ms: its extensions package imports every extension)
    # is imported only when a machine is built, not by settings' import of
    # MachineDefinition.
    from transitions import Machine


class Trigger(StrEnum):
    """The triggers the engine fires (``SessionModel.fire``). The ``[machine]``
    definition declares the transitions; each (trigger, source) the engine
    fires is checked there when the definition loads (``_driver_fires``), and
    pytransitions adds a method per trigger to the model at run time."""

    SUBMIT = "submit"
    START = "start"
    READY = "ready"
    CONNECT = "connect"
    DISCONNECT = "disconnect"
    RESUME = "resume"
    TIMEOUT = "timeout"
    FAIL = "fail"
    CLEAN = "clean"


# The engine steps a live state may name as its ``on_enter`` (see runner.py).
BEHAVIOURS = ("await_start", "await_server", "connect", "serve")

# A transition's dest "=" means: back into its source state (``resume``).
SAME = "="


# -- the definition ------------------------------------------------------------


class StateDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    timeout: str | None = None  # a key of [timeouts]
    on_enter: str | None = None  # one of BEHAVIOURS


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
            edges.setdefault(s, set()).add(s if t.dest == SAME else t.dest)
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
        _check_states(self)
        reserved = _reserved_names()
        triggers = {t.trigger for t in self.transitions}
        for t in self.transitions:
            _check_transition(t, self.states, reserved, triggers)
        _check_steps(self.states)
        _check_paths(self)
        return self


def _listing() -> str:
    return ", ".join(s.value for s in State)


def _check_states(d: MachineDefinition) -> None:
    """Every state known, every one defined, the initial one among them."""
    known = [s.value for s in State]
    for name in d.states:
        if name not in known:
            raise ValueError(
                f"unknown state {name!r} in [machine.states] (states are: {_listing()})"
            )
    for required in (State.FAILED, State.CLEANED):
        if required.value not in d.states:
            raise ValueError(f"the machine must define the state {required.value!r}")
    missing = [s for s in known if s not in d.states]
    if missing:
        raise ValueError("the machine does not define the state(s) " + ", ".join(missing))
    if d.initial not in d.states:
        raise ValueError(f"initial state {d.initial!r} is not a state (states are: {_listing()})")


def _check_transition(
    t: TransitionDef, states: Mapping[str, StateDef], reserved: set[str], triggers: set[str]
) -> None:
    """Known states on both ends, no wildcard, a trigger that is a name of its own."""
    where = f"transition {t.trigger!r}"
    if not t.sources:
        raise ValueError(f"{where} has no source state")
    for name in [*t.sources, *([] if t.dest == SAME else [t.dest])]:
        if name == "*":
            raise ValueError(f"{where}: the wildcard '*' is not allowed, list the states")
        if name not in states:
            raise ValueError(f"{where} names unknown state {name!r} (states are: {_listing()})")
    if not t.trigger.isidentifier() or keyword.iskeyword(t.trigger):
        raise ValueError(f"trigger {t.trigger!r} is not a valid identifier")
    if t.trigger.startswith("_"):
        raise ValueError(f"trigger {t.trigger!r} must not start with '_'")
    # pytransitions adds may_<trigger> for each trigger: a trigger may not
    # be named so either.
    may = {f"may_{other}" for other in triggers}
    for attr, taken in ((t.trigger, reserved | may), (f"may_{t.trigger}", reserved)):
        if attr in taken:
            raise ValueError(f"trigger {t.trigger!r} clashes with the session attribute {attr!r}")


def _check_steps(states: Mapping[str, StateDef]) -> None:
    """An engine step on entering each live state, and only there."""
    live_names = {s.value for s in LIVE_STATES}
    for name, sdef in states.items():
        is_live = name in live_names
        if sdef.on_enter is not None and sdef.on_enter not in BEHAVIOURS:
            raise ValueError(
                f"state {name!r}: on_enter {sdef.on_enter!r} is not an engine step "
                f"(steps are: {', '.join(BEHAVIOURS)})"
            )
        if is_live and sdef.on_enter is None:
            raise ValueError(
                f"state {name!r} has no on_enter step: a session entering it would stop there"
            )
        if not is_live and sdef.on_enter is not None:
            raise ValueError(f"state {name!r} takes no on_enter step (the engine enters it itself)")


def _check_paths(d: MachineDefinition) -> None:
    """Every state reachable, `cleaned` reachable from every live one, and
    every transition the driver fires (resume included) defined."""
    reachable = _reachable(d.initial, d.transitions)
    unreachable = [s for s in d.states if s not in reachable]
    if unreachable:
        raise ValueError(f"state(s) unreachable from {d.initial!r}: " + ", ".join(unreachable))
    for live in sorted(LIVE_STATES):
        if State.CLEANED.value not in _reachable(live.value, d.transitions):
            raise ValueError(
                f"state {live.value!r} cannot reach 'cleaned': a job could be left running"
            )
    fired = {(t.trigger, src): t.dest for t in d.transitions for src in t.sources}
    for back in sorted(s.value for s in LIVE_STATES):
        if fired.get(("resume", back)) not in (SAME, back):
            raise ValueError(
                f"the machine needs the transition 'resume' from {back!r} back into "
                f"itself (dest = {SAME!r}): `resume` picks a session up in that state"
            )
    for trigger, src in _driver_fires(d.states):
        if (trigger, src) not in fired:
            raise ValueError(
                f"the machine has no transition {trigger!r} from {src!r}, which the "
                "session driver fires there (a session could be left stuck)"
            )


def _driver_fires(states: Mapping[str, StateDef]) -> list[tuple[str, str]]:
    """Every (trigger, source) the session driver fires: its path through the
    states, `clean` from every state but `cleaned` (cleanup may run anywhere),
    `fail` from idle and every live state, `timeout` from every timed state."""
    fires = [
        (Trigger.SUBMIT, State.IDLE.value),
        (Trigger.START, State.SUBMITTED.value),
        (Trigger.READY, State.RUNNING.value),
        (Trigger.CONNECT, State.SERVING.value),
        (Trigger.DISCONNECT, State.TUNNELED.value),
    ]
    fires += [(Trigger.RESUME, s.value) for s in sorted(LIVE_STATES)]
    fires += [(Trigger.CLEAN, s.value) for s in State if s is not State.CLEANED]
    fires += [(Trigger.FAIL, s.value) for s in sorted(LIVE_STATES | {State.IDLE})]
    fires += [(Trigger.TIMEOUT, name) for name, sdef in states.items() if sdef.timeout]
    return [(str(trigger), src) for trigger, src in fires]


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


class SessionModel:
    """The model the machine drives. pytransitions adds, on the instance,
    a method per trigger of the definition (``submit()``, ``may_submit()``),
    ``trigger(name)``, ``may_trigger(name)`` and ``is_<state>()``; the engine
    fires the triggers it knows through ``fire`` (typed)."""

    state: str

    def __init__(self) -> None:
        self.state = State.IDLE.value
        self.entered_at: dict[str, float] = {}
        self.history: list[tuple[str, str]] = []
        self.on_change: Callable[[State], None] | None = None
        self._left: str | None = None
        self._visited: set[str] = set()

    @property
    def state_enum(self) -> State:
        return State(self.state)

    # -- conditions the steps read (the driver keeps no flags of its own) --
    @property
    def came_from(self) -> str | None:
        """The state the last transition left (its own for ``resume``;
        None before the first transition of this process)."""
        return self._left

    def has_been(self, state: State) -> bool:
        """Whether this process's machine has entered ``state`` (``resume``
        re-entering it counts; the state a session was restored in does not)."""
        return state.value in self._visited

    # -- callbacks (named in build_machine) --
    def before_state_change(self, *_: object, **__: object) -> None:
        self._left = self.state

    def entered(self, *_: object, **__: object) -> None:
        """Every state's first on_enter callback: the bookkeeping (and the
        record saved) comes before the state's step runs."""
        self._visited.add(self.state)
        if self._left == self.state:
            return  # ``resume`` re-entered the state: it has not changed
        self.entered_at[self.state] = time.time()
        self.history.append((self.state, datetime.now().astimezone().isoformat(timespec="seconds")))
        if self.on_change is not None:
            self.on_change(self.state_enum)

    # -- firing (the methods pytransitions adds at run time) --
    def fire(self, trigger: Trigger) -> bool:
        """Fire one of the engine's triggers (``MachineError`` when the
        current state has no transition for it)."""
        return self.trigger(trigger.value)

    if TYPE_CHECKING:  # added on the instance by pytransitions (build_machine)

        def trigger(self, name: str) -> bool: ...

        def may_trigger(self, name: str) -> bool: ...


def _reserved_names() -> set[str]:
    """SessionModel attributes a trigger must not shadow (its own, and
    those pytransitions adds besides the triggers)."""
    added = {"get_graph", "trigger", "may_trigger"} | {f"is_{s.value}" for s in State}
    return set(dir(SessionModel)) | set(vars(SessionModel())) | added


# -- the machine -----------------------------------------------------------------


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


def _check_timeouts(definition: MachineDefinition, timeouts: Mapping[str, float]) -> None:
    for name, sdef in definition.states.items():
        if sdef.timeout is None:
            continue
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


def build_machine(
    model: SessionModel,
    definition: MachineDefinition,
    timeouts: Mapping[str, float],
    initial: State | str | None = None,
    steps: Mapping[str, Callable[[], None]] | None = None,
) -> Machine:
    """A queued machine driving ``model`` through ``definition``, starting
    in ``initial`` (a saved state) or the definition's initial state.
    ``steps`` maps each name of ``BEHAVIOURS`` to the engine's step; a
    state's ``on_enter`` runs it (without ``steps``, the bare machine: for
    the diagram and tests of the definition)."""
    from transitions import Machine

    _quiet_library_logs()
    _check_timeouts(definition, timeouts)
    start = definition.initial if initial is None else _restore_name(initial, definition)
    states: list[dict[str, Any]] = []
    for name, sdef in definition.states.items():
        on_enter: list[Any] = ["entered"]
        if steps is not None and sdef.on_enter is not None:
            on_enter.append(steps[sdef.on_enter])
        states.append({"name": name, "on_enter": on_enter})
    machine = Machine(
        model=model,
        states=states,
        transitions=[
            {"trigger": t.trigger, "source": t.sources, "dest": t.dest}
            for t in definition.transitions
        ],
        initial=start,
        auto_transitions=False,
        send_event=False,
        ignore_invalid_triggers=False,
        before_state_change="before_state_change",
        # A step fires the next trigger and returns; the machine then runs
        # the next state's step: one flat loop, no recursion (see the docstring).
        queued=True,
    )
    return machine


def _quiet_library_logs() -> None:
    """transitions logs every transition at INFO: a user's
    ``logging.basicConfig(level=logging.INFO)`` would print dozens of its
    lines per session. Its logger is set to WARNING unless the user has set
    its level (asked for them); alvis-fsm's own progress goes to the
    ``alvis_fsm`` logger."""
    import logging

    library = logging.getLogger("transitions")
    if library.level == logging.NOTSET:
        library.setLevel(logging.WARNING)


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
        if sdef.on_enter is not None:
            label = f"{name} / {sdef.on_enter}"
        if sdef.timeout is not None:
            seconds = (timeouts or {}).get(sdef.timeout)
            shown = f"{sdef.timeout} {seconds:g} s" if seconds is not None else sdef.timeout
            label = f"{label} [timeout: {_mermaid_text(shown)}]"
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
