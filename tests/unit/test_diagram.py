"""diagrams/session.mmd is generated: it must match the packaged machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alvis_fsm.engine.session.machine import packaged_definition, packaged_timeouts, to_mermaid

REPO = Path(__file__).resolve().parents[2]
DIAGRAM = REPO / "diagrams" / "session.mmd"


def test_committed_diagram_is_current() -> None:
    expected = to_mermaid(packaged_definition(), packaged_timeouts())
    assert DIAGRAM.read_text() == expected, (
        "diagrams/session.mmd is stale: run `alvis-fsm diagram > diagrams/session.mmd`"
    )


def test_diagram_is_deterministic() -> None:
    d = packaged_definition()
    assert to_mermaid(d, packaged_timeouts()) == to_mermaid(d, packaged_timeouts())


def test_diagram_content() -> None:
    text = to_mermaid(packaged_definition(), packaged_timeouts())
    assert text.startswith("---\nalvis-fsm session\n---\nstateDiagram-v2\n")
    assert "[*] --> idle" in text
    # Each live state shows its step (on_enter) and its timeout.
    assert 'state "submitted / await_start [timeout: job_start 600 s]" as submitted' in text
    assert 'state "tunneled / serve" as tunneled' in text
    assert "submitted --> submitted: resume" in text
    assert "submitted --> failed: timeout | fail" in text
    assert "s_active" not in text.split("classDef s_previous")[1]  # no state drawn as active
    assert all(line == line.rstrip() for line in text.splitlines())


def test_diagram_without_timeouts_names_the_key() -> None:
    text = to_mermaid(packaged_definition())
    assert 'state "running / await_server [timeout: server_ready]" as running' in text


def test_cli_prints_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "alvis_fsm", "diagram"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == DIAGRAM.read_text()
