"""State names only through the enum (issue 13): one spelling, in the light
``engine.session.states``; the light duration formatting; and what ``status
--offline`` does not import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from alvis_fsm.cluster.durations import fmt_duration
from alvis_fsm.engine.session import machine
from alvis_fsm.engine.session.states import ENDED_STATES, LIVE_STATES, State
from alvis_fsm.engine.session.store import SessionRecord

PACKAGE = Path(__file__).resolve().parents[2] / "alvis_fsm"
NAMES = {s.value for s in State}


def test_the_machine_knows_the_same_states() -> None:
    # One State: the machine takes its states' names from engine.session.states.
    assert machine.State is State and machine.LIVE_STATES is LIVE_STATES
    assert not LIVE_STATES & ENDED_STATES
    assert LIVE_STATES | ENDED_STATES | {State.IDLE} == set(State)


def test_a_record_keeps_its_state_as_a_plain_string() -> None:
    record = SessionRecord(name="s1", model="m")
    assert type(record.state) is str and record.state == State.IDLE
    record.state = State.TUNNELED
    assert record.live
    assert json.loads(json.dumps(record.to_json()))["state"] == "tunneled"
    record.state = "failed"  # as read back from disk
    assert record.state == State.FAILED and not record.live and record.state in ENDED_STATES


# Files that may spell a state: the enum itself, the machine (its definition
# checks), the runner (being rewritten; its literals go with that change).
# cluster/slurm.py's "idle" is a SLURM node state, not ours.
ALLOWED = {"engine/session/states.py", "engine/session/machine.py"}


def _state_literals(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value in NAMES:
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (PACKAGE / "fronts").rglob("*.py") if "__pycache__" not in p.parts)
    + sorted(
        p for p in (PACKAGE / "engine").glob("*.py") if str(p.relative_to(PACKAGE)) not in ALLOWED
    ),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_raw_state_names_outside_the_enum(path: Path) -> None:
    assert not _state_literals(path), f"{path.relative_to(PACKAGE)}: use State.X"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0:00:00"),
        (-5, "0:00:00"),
        (59.9, "0:00:59"),
        (61, "0:01:01"),
        (3600, "1:00:00"),
        (86399, "23:59:59"),
        (86400, "1-0:00:00"),
        (2 * 86400 + 3723, "2-1:02:03"),
    ],
)
def test_fmt_duration(seconds: float, text: str) -> None:
    assert fmt_duration(seconds) == text


def test_status_offline_imports_neither_runner_nor_machine() -> None:
    code = (
        "import sys\n"
        "import alvis_fsm.fronts.cli.commands.status\n"
        "heavy = [m for m in ('alvis_fsm.engine.session.runner', 'alvis_fsm.engine.session.machine',"
        " 'pydantic', 'transitions') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
