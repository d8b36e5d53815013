"""`config` and `models` through the CLI: click's runner for speed, plus real
`python -m alvis_fsm` runs for the entry point and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from alvis_fsm.engine.settings.explain import explain
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import AlvisError, ExitCode
from alvis_fsm.fronts.cli.main import cli

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point, in the test's isolated HOME and environment."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "alvis_fsm", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def show_line(output: str, key: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"{key} = "))


def test_set_then_show_keeps_comments(user_conf: Path) -> None:
    user_conf.write_text(
        "# my precious comment\n[timeouts]\n# about job start\nserver_ready = 700\n"
    )
    done = run_module("config", "set", "timeouts.job_start", "900")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Set timeouts.job_start = 900 in {user_conf}"
    text = user_conf.read_text()
    assert "# my precious comment" in text and "# about job start" in text
    assert tomllib.loads(text)["timeouts"] == {"server_ready": 700, "job_start": 900}
    assert user_conf.stat().st_mode & 0o777 == 0o600

    done = run_module("config", "show")
    assert done.returncode == 0, done.stderr
    line = show_line(done.stdout, "timeouts.job_start")
    assert "= 900" in line and line.endswith(f"# {user_conf}")
    assert show_line(done.stdout, "timeouts.connection_test").endswith("# default")


def test_set_creates_file_and_section(user_conf: Path) -> None:
    assert "Set tunnel.local_port = 58001" in run_cli("config", "set", "tunnel.local_port", "58001")
    run_cli("config", "set", "slurm.extra_args", '["--qos=short", "--x"]')
    run_cli("config", "set", "vllm.api_key", "false")
    run_cli("config", "set", "polling.file_interval", "0.5")
    run_cli("config", "set", "catalog.paths", "~/a.json, ~/b.json")
    s = load_settings()
    assert s.tunnel.local_port == 58001
    assert s.slurm.extra_args == ["--qos=short", "--x"]
    assert s.vllm.api_key is False
    assert s.polling.file_interval == 0.5
    assert s.catalog.paths == ["~/a.json", "~/b.json"]
    assert user_conf.stat().st_mode & 0o777 == 0o600


def test_env_shows_in_config_show() -> None:
    done = run_module("config", "show", env={"ALVIS_FSM_TIMEOUTS__JOB_START": "5"})
    assert done.returncode == 0, done.stderr
    line = show_line(done.stdout, "timeouts.job_start")
    assert "= 5 " in line and line.endswith("# env ALVIS_FSM_TIMEOUTS__JOB_START")


def test_misspelt_key_in_user_file_exit_3(user_conf: Path) -> None:
    user_conf.write_text("[timeouts]\njob_strat = 5\n")
    done = run_module("config", "show")
    assert done.returncode == ExitCode.CONFIG == 3
    assert "timeouts.job_strat" in done.stderr
    assert str(user_conf) in done.stderr
    assert "job_start" in done.stderr
    assert "Traceback" not in done.stderr


def test_init_writes_file_that_loads_to_defaults(user_conf: Path) -> None:
    before = explain(load_settings())
    out = run_cli("config", "init")
    assert str(user_conf) in out
    assert user_conf.stat().st_mode & 0o777 == 0o600
    text = user_conf.read_text()
    assert "# job_start = 600" in text
    assert [(k, v) for k, v, _ in explain(load_settings())] == [(k, v) for k, v, _ in before]

    with pytest.raises(AlvisError, match="already exists"):
        CliRunner().invoke(cli, ["config", "init"], catch_exceptions=False)
    run_cli("config", "init", "--force")

    # `set` on the initialised file lands in its section and keeps the comments.
    run_cli("config", "set", "timeouts.job_start", "900")
    edited = user_conf.read_text()
    assert "# job_start = 600" in edited
    assert tomllib.loads(edited)["timeouts"]["job_start"] == 900


def test_set_unknown_key_refused(user_conf: Path) -> None:
    done = run_module("config", "set", "nosuch.key", "1")
    assert done.returncode == ExitCode.USAGE
    assert "nosuch.key" in done.stderr and "timeouts.job_start" in done.stderr
    assert not user_conf.exists()


def test_set_invalid_value_leaves_file_untouched(user_conf: Path) -> None:
    user_conf.write_text("# keep me\n")
    for key, value in [
        ("tunnel.bind", "0.0.0.0"),
        ("tunnel.local_port", "99999"),
        ("timeouts.job_start", "soon"),
        ("vllm.api_key", "maybe"),
    ]:
        with pytest.raises(AlvisError):
            CliRunner().invoke(cli, ["config", "set", key, value], catch_exceptions=False)
    assert user_conf.read_text() == "# keep me\n"


def test_config_path(user_conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("config", "path").strip() == str(user_conf)
    other = tmp_path / "x.toml"
    monkeypatch.setenv("ALVIS_FSM_CONFIG", str(other))
    assert run_cli("config", "path").strip() == str(other)


def test_models_lists_gpt_oss() -> None:
    done = run_module("models")
    assert done.returncode == 0, done.stderr
    assert "gpt-oss-20b" in done.stdout and "GPT OSS 20B model" in done.stdout


def test_models_json_parses() -> None:
    data = json.loads(run_cli("models", "--json"))
    entry = data["models"]["gpt-oss-20b"]
    assert entry["max_model_len"] == 10000
    assert set(entry) == {
        "path",
        "max_model_len",
        "description",
        "gpus",
        "vllm_args",
        "idle_timeout",
        "source",
    }


def test_models_add_needs_discover() -> None:
    # --add names a model found by --discover; alone it is a usage error.
    result = CliRunner().invoke(cli, ["models", "--add", "x"])
    assert isinstance(result.exception, AlvisError)
    assert result.exception.exit_code == 2


def test_model_names_never_raises(user_conf: Path) -> None:
    from alvis_fsm.fronts.cli.commands.models import model_names

    assert "gpt-oss-20b" in model_names()
    user_conf.write_text("broken [\n")
    assert "gpt-oss-20b" in model_names()
