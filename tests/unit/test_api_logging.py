"""The Python API's logging (issue 26, item 5): with the README's
``logging.basicConfig(level=logging.INFO)``, the libraries' lines
(transitions.core) stay out, and a normal run logs no warning; a user who
asks for transitions' lines (sets its level) gets them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DRIVE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
{setup}
from alvis_fsm.engine.session.machine import SessionModel, build_machine, packaged_definition
t = {{"job_start": 600.0, "server_ready": 600.0, "connection_test": 30.0, "cancel_confirm": 30.0}}
model = SessionModel()
build_machine(model, packaged_definition(), t)
model.submit(); model.start(); model.ready(); model.connect(); model.resume()
model.fail(); model.clean()
logging.getLogger("alvis_fsm").info("own line")
print("state", model.state)
"""


def drive(setup: str = "") -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVE.format(setup=setup)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_info_logging_shows_only_alvis_fsm_lines() -> None:
    out = drive()
    assert "state cleaned" in out
    assert "INFO alvis_fsm own line" in out
    assert "transitions" not in out, out
    assert "WARNING" not in out and "Skip binding" not in out, out


def test_asked_for_transitions_lines_still_come() -> None:
    out = drive('logging.getLogger("transitions").setLevel(logging.INFO)')
    assert "INFO transitions.core" in out
    assert "Skip binding" not in out
