"""What the user (or a script) sees when output is piped: plain text, no
ANSI escapes or spinner frames, errors as ``[ERROR]``/``[HINT]`` lines on
stderr with the documented exit codes. And ``env``'s output is valid shell.

Every run is the real entry point (``python -m alvis_fsm``) with pipes, in
the isolated HOME of tests/unit/conftest.py, and with a TERM that would
allow colours, so only the missing terminal keeps the output plain."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alvis_fsm import __version__
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b[\[\]()#;?0-9A-Za-z]")
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")


def run(
    *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.pop("NO_COLOR", None)
    full.update({"TERM": "xterm-256color", "COLUMNS": "120", "FORCE_COLOR": ""})
    full.update(env or {})
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "alvis_fsm", *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        input=input if input is not None else "",
    )


def assert_plain(proc: subprocess.CompletedProcess[str]) -> None:
    for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        assert not ANSI.search(text), f"ANSI escape in {name}: {text!r}"
        assert not SPINNER & set(text), f"spinner frame in {name}: {text!r}"
        assert "\r" not in text, f"carriage return in {name}"


def assert_error_format(stderr: str) -> list[str]:
    """Every stderr line is [ERROR], an indented detail, or [HINT]; returns the lines."""
    lines = stderr.rstrip("\n").splitlines()
    assert lines and lines[0].startswith("[ERROR] "), stderr
    assert any(line.startswith("[HINT] ") for line in lines), stderr
    for line in lines:
        assert line.startswith(("[ERROR] ", "[HINT] ", "    ")), f"stray line: {line!r}"
    assert "Traceback" not in stderr
    return lines


# -- successful output ------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("-h",),
        ("start", "--help"),
        ("models", "--help"),
        ("models",),
        ("models", "--json"),
        ("-q", "models"),
        ("config", "show"),
        ("config", "path"),
        ("status", "--offline"),
        ("status", "--offline", "--json"),
        ("diagram",),
    ],
)
def test_piped_output_is_plain(args: tuple[str, ...]) -> None:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert proc.stderr == ""
    assert_plain(proc)


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"alvis-fsm, version {__version__}\n"
    assert_plain(proc)


def test_help_lists_every_command() -> None:
    from alvis_fsm.fronts.cli.main import cli

    out = run("--help").stdout
    for name, command in cli.commands.items():
        if command.hidden:  # internal (the detached session's supervisor)
            assert name not in out
            continue
        assert re.search(rf"^  {name}\b", out, re.M), name


def test_models_table() -> None:
    out = run("models").stdout.splitlines()
    assert out[0].split() == ["NAME", "MAX_LEN", "GPUS", "DESCRIPTION", "SOURCE"]
    assert out[1].startswith("gpt-oss-20b*") and "10000" in out[1] and "packaged" in out[1]
    assert run("-q", "models").stdout == "gpt-oss-20b\n"


def test_status_offline_json_is_json() -> None:
    # No gateway runs either: its key is null, never absent.
    assert json.loads(run("status", "--offline", "--json").stdout) == {
        "sessions": [],
        "errors": [],
        "gateway": None,
    }


# -- errors -------------------------------------------------------------------------


def test_unknown_model_lists_the_catalog() -> None:
    proc = run("start", "-m", "nosuch")
    assert proc.returncode == 2 == ExitCode.USAGE.value
    assert proc.stdout == ""
    lines = assert_error_format(proc.stderr)
    assert lines[0].startswith("[ERROR] -m/--model: Model 'nosuch' not found in models.json")
    assert any(line.strip() == "- gpt-oss-20b: GPT OSS 20B model" for line in lines)
    assert_plain(proc)


def test_bad_duration_lists_the_accepted_forms() -> None:
    proc = run("start", "-t", "99:99")
    assert proc.returncode == ExitCode.USAGE
    lines = assert_error_format(proc.stderr)
    assert "'99:99'" in lines[0]
    assert "MM, MM:SS, H:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS" in lines[0]
    assert_plain(proc)


def test_bad_settings_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[ssh]\nhots = 'alvis2'\n")
    proc = run("models", env={"ALVIS_FSM_CONFIG": str(bad)})
    assert proc.returncode == 3 == ExitCode.CONFIG.value
    lines = assert_error_format(proc.stderr)
    assert lines[0] == f"[ERROR] Unknown setting 'ssh.hots' in {bad} (did you mean 'ssh.host'?)"
    assert_plain(proc)


def test_settings_syntax_error_is_a_config_error(user_conf: Path) -> None:
    user_conf.write_text("[ssh\n")
    proc = run("config", "show")
    assert proc.returncode == ExitCode.CONFIG
    lines = assert_error_format(proc.stderr)
    assert str(user_conf) in lines[0] and "line 1" in lines[0]


def test_bad_environment_variable_is_a_config_error() -> None:
    proc = run("models", env={"ALVIS_FSM_TUNNEL__LOCAL_PORT": "99999"})
    assert proc.returncode == ExitCode.CONFIG
    lines = assert_error_format(proc.stderr)
    assert "ALVIS_FSM_TUNNEL__LOCAL_PORT" in lines[0]


def test_missing_session_is_a_session_error() -> None:
    proc = run("stop", "nosuch")
    assert proc.returncode == 7 == ExitCode.SESSION.value
    lines = assert_error_format(proc.stderr)
    assert lines[0] == "[ERROR] No session named 'nosuch'"


def test_corrupt_session_file_is_a_session_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state).ensure()
    (state / "sessions" / "broken.json").write_text("{not json")
    proc = run("status", "--offline", "broken", env={"ALVIS_FSM_SESSION__STATE_DIR": str(state)})
    assert proc.returncode == ExitCode.SESSION
    lines = assert_error_format(proc.stderr)
    assert "corrupt" in lines[0]


def test_click_usage_errors_exit_2() -> None:
    for args in (("bogus",), ("start", "--port", "notaport"), ("completion", "tcsh")):
        proc = run(*args)
        assert proc.returncode == ExitCode.USAGE, args
        assert proc.stdout == ""
        assert "Error:" in proc.stderr or "[ERROR]" in proc.stderr
        assert_plain(proc)


# -- env --------------------------------------------------------------------------


def save_session(state_dir: Path, **fields: object) -> SessionRecord:
    values: dict[str, object] = {
        "name": "lab-ok",
        "model": "lab-ok",
        "state": "tunneled",
        "job_id": "42",
        "node": "alvis7-07",
        "port": 41084,
        "local_port": 58123,
        "api_key": "afsm-abc_DEF-123",
    }
    values.update(fields)
    record = SessionRecord(**values)  # type: ignore[arg-type]
    Store(state_dir).save(record)
    return record


def test_env_output_is_valid_shell(tmp_path: Path) -> None:
    state = tmp_path / "state"
    save_session(state)
    proc = run("env", env={"ALVIS_FSM_SESSION__STATE_DIR": str(state)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == (
        "export OPENAI_BASE_URL=http://localhost:58123/v1\nexport OPENAI_API_KEY=afsm-abc_DEF-123\n"
    )
    syntax = subprocess.run(["bash", "-n"], input=proc.stdout, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    evaluated = subprocess.run(
        ["bash", "-c", 'eval "$(cat)"; echo "$OPENAI_BASE_URL"; echo "$OPENAI_API_KEY"'],
        input=proc.stdout,
        capture_output=True,
        text=True,
    )
    assert evaluated.stdout == "http://localhost:58123/v1\nafsm-abc_DEF-123\n"


def test_env_quotes_hostile_values(tmp_path: Path) -> None:
    """A key with quotes and command substitutions comes out as data."""
    state = tmp_path / "state"
    marker = tmp_path / "PWNED"
    key = f"k'ey\" $(touch {marker}) `touch {marker}`; touch {marker}"
    save_session(state, api_key=key)
    proc = run("env", "lab-ok", env={"ALVIS_FSM_SESSION__STATE_DIR": str(state)})
    assert proc.returncode == 0, proc.stderr
    for shell in ("bash", "sh"):
        evaluated = subprocess.run(
            [shell, "-c", 'eval "$(cat)"; printf %s "$OPENAI_API_KEY"'],
            input=proc.stdout,
            capture_output=True,
            text=True,
        )
        assert evaluated.returncode == 0, evaluated.stderr
        assert evaluated.stdout == key
    assert not marker.exists()


def test_env_without_api_key_says_empty(tmp_path: Path) -> None:
    state = tmp_path / "state"
    save_session(state, api_key="")
    proc = run("env", env={"ALVIS_FSM_SESSION__STATE_DIR": str(state)})
    assert proc.stdout.splitlines()[1] == "export OPENAI_API_KEY=EMPTY"


def test_env_of_an_ended_session_prints_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    save_session(state, state="cleaned")
    proc = run("env", "lab-ok", env={"ALVIS_FSM_SESSION__STATE_DIR": str(state)})
    assert proc.returncode == ExitCode.SESSION
    assert proc.stdout == ""  # eval "$(alvis-fsm env)" then changes nothing
    lines = assert_error_format(proc.stderr)
    assert lines[0] == "[ERROR] Session 'lab-ok' is cleaned; there is no server to point at"
    # Bare, it acts on live sessions only: a finished one is history (issue 26).
    proc = run("env", env={"ALVIS_FSM_SESSION__STATE_DIR": str(state)})
    assert proc.returncode == ExitCode.SESSION and proc.stdout == ""
    lines = assert_error_format(proc.stderr)
    assert (
        lines[0] == "[ERROR] There is no live session (1 finished: `alvis-fsm status` lists them)"
    )


def test_env_without_sessions(tmp_path: Path) -> None:
    proc = run("env", env={"ALVIS_FSM_SESSION__STATE_DIR": str(tmp_path / "none")})
    assert proc.returncode == ExitCode.SESSION
    assert proc.stdout == ""
    assert_error_format(proc.stderr)
