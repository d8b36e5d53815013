from __future__ import annotations

from pathlib import Path

import pytest

from alvis_fsm.engine.settings.explain import explain
from alvis_fsm.engine.settings.model import load_settings, user_config_path
from alvis_fsm.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_text(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    e = exc.value
    return "\n".join(filter(None, [e.message, e.hint, e.details]))


def test_defaults_without_user_file(user_conf: Path) -> None:
    assert not user_conf.exists()
    s = load_settings()
    assert s.timeouts.job_start == 600
    assert s.tunnel.local_port == 58000
    assert s.tunnel.bind == "127.0.0.1"
    assert s.ssh.host == "alvis2"
    assert s.catalog.default_model == "gpt-oss-20b"
    assert s.machine.initial == "idle"
    assert s.timeouts.get("server_ready") == 600.0
    assert s.state_dir == user_conf.parent / ".alvis-vllm"


def test_user_file_sets_one_key_others_keep_defaults(user_conf: Path) -> None:
    write(user_conf, "[timeouts]\njob_start = 900\n")
    s = load_settings()
    assert s.timeouts.job_start == 900
    assert s.timeouts.server_ready == 600
    assert s.slurm.gpus == "auto"  # the packaged default (issue 15)
    rows = {k: (v, src) for k, v, src in explain(load_settings())}
    assert rows["timeouts.job_start"] == (900, str(user_conf))
    assert rows["timeouts.server_ready"][1] == "default"


def test_env_beats_file(user_conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(user_conf, "[timeouts]\njob_start = 900\n")
    monkeypatch.setenv("ALVIS_FSM_TIMEOUTS__JOB_START", "5")
    monkeypatch.setenv("ALVIS_FSM_SLURM__EXTRA_ARGS", '["--qos=short"]')
    s = load_settings()
    assert s.timeouts.job_start == 5
    assert s.slurm.extra_args == ["--qos=short"]
    rows = {k: src for k, _, src in explain(load_settings())}
    assert rows["timeouts.job_start"] == "env ALVIS_FSM_TIMEOUTS__JOB_START"


def test_overrides_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALVIS_FSM_TUNNEL__LOCAL_PORT", "59000")
    s = load_settings({"tunnel": {"local_port": 59001, "route": None}})
    assert s.tunnel.local_port == 59001
    assert s.tunnel.route == "jump"  # None means "flag not given"
    rows = {k: src for k, _, src in explain(load_settings({"tunnel": {"local_port": 59001}}))}
    assert rows["tunnel.local_port"] == "flag"


def test_settings_record_where_each_value_came_from(
    user_conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each layer is recorded when the settings load, flags too: nothing is
    read again to say where a value came from."""
    write(user_conf, "[timeouts]\njob_start = 900\n")
    monkeypatch.setenv("ALVIS_FSM_SSH__HOST", "alvis1")
    s = load_settings({"slurm": {"gpus": "A40:2"}})
    user_conf.unlink()  # gone since: the record says where the value was read
    assert s.source("slurm.time") == "default"
    assert s.origin_of("timeouts.job_start") == f"in {user_conf}"
    assert s.origin_of("ssh.host") == "from the environment variable ALVIS_FSM_SSH__HOST"
    assert s.source("slurm.gpus") == "flag"
    assert s.origin_of("slurm.gpus") == "from a command-line flag"


def test_alvis_fsm_config_picks_another_file(
    tmp_path: Path, user_conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(user_conf, "[timeouts]\njob_start = 900\n")
    other = write(tmp_path / "other.toml", "[timeouts]\njob_start = 42\n")
    monkeypatch.setenv("ALVIS_FSM_CONFIG", str(other))
    assert user_config_path() == other
    assert load_settings().timeouts.job_start == 42


def test_machine_state_timeout_can_be_overridden(user_conf: Path) -> None:
    write(user_conf, '[machine.states.running]\ntimeout = "job_start"\n')
    s = load_settings()
    assert s.machine.states["running"].timeout == "job_start"
    # Deep merge keeps the packaged description of the state.
    assert s.machine.states["running"].description


def test_unknown_key_refused_by_name_with_valid_keys(user_conf: Path) -> None:
    write(user_conf, "[timeouts]\njob_strat = 5\n")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    text = error_text(exc)
    assert "timeouts.job_strat" in text
    assert str(user_conf) in text
    assert "job_start, server_ready, connection_test, cancel_confirm" in text
    assert "did you mean 'timeouts.job_start'" in text


def test_typod_section_refused(user_conf: Path) -> None:
    write(user_conf, "[timeout]\njob_start = 5\n")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    text = error_text(exc)
    assert "[timeout]" in text and str(user_conf) in text
    assert "timeouts" in text


def test_toml_syntax_error_names_file_and_line(user_conf: Path) -> None:
    write(user_conf, "[timeouts]\njob_start = 5\nserver_ready = \n")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert str(user_conf) in exc.value.message
    assert "line 3" in exc.value.message


def test_bad_type_names_key_and_file(user_conf: Path) -> None:
    write(user_conf, '[timeouts]\njob_start = "soon"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "timeouts.job_start" in exc.value.message
    assert str(user_conf) in exc.value.message


def test_bad_env_value_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALVIS_FSM_TUNNEL__LOCAL_PORT", "70000")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "tunnel.local_port" in exc.value.message
    assert "ALVIS_FSM_TUNNEL__LOCAL_PORT" in exc.value.message


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.168.1.4", "::", "example.org"])
def test_non_loopback_bind_refused(user_conf: Path, bind: str) -> None:
    write(user_conf, f'[tunnel]\nbind = "{bind}"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "tunnel.bind" in exc.value.message
    assert "loopback" in exc.value.message
    assert exc.value.hint and "127.0.0.1" in exc.value.hint


@pytest.mark.parametrize("bind", ["127.0.0.1", "localhost"])
def test_loopback_bind_accepted(bind: str) -> None:
    assert load_settings({"tunnel": {"bind": bind}}).tunnel.bind == bind


@pytest.mark.parametrize("bind", ["127.0.0.2", "::1"])
def test_loopback_bind_that_does_not_work_end_to_end_refused(user_conf: Path, bind: str) -> None:
    """127.0.0.2 does not exist on macOS; ::1 is not where the tool's own
    checks of the tunnel look: both would fail only after the job started."""
    write(user_conf, f'[tunnel]\nbind = "{bind}"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "tunnel.bind" in exc.value.message and "cannot use" in exc.value.message
    assert exc.value.hint and "127.0.0.1" in exc.value.hint


def test_machine_timeout_must_name_a_timeouts_key(user_conf: Path) -> None:
    write(user_conf, '[machine.states.running]\ntimeout = "server_redy"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings()
    text = error_text(exc)
    assert "running" in text and "server_redy" in text
    assert "machine.states.running.timeout" in text
    assert "job_start, server_ready, connection_test, cancel_confirm" in text


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("tunnel", "local_port", 0),
        ("tunnel", "local_port", 65536),
        ("tunnel", "route", "direct"),
        ("timeouts", "job_start", 0),
        ("polling", "file_interval", -1),
        ("slurm", "account", "a b"),
        ("slurm", "gpus", "A40:0"),
        ("slurm", "gpus", "A40:1 --x"),
        ("ssh", "host", "-oProxyCommand=x"),
        ("ssh", "host", "alvis 2"),
    ],
)
def test_invalid_values_refused(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({section: {key: value}})
    assert f"{section}.{key}" in exc.value.message


@pytest.mark.parametrize("gpus", ["A40:1", "4", "A100_fat:8"])
def test_valid_gpus(gpus: str) -> None:
    assert load_settings({"slurm": {"gpus": gpus}}).slurm.gpus == gpus


def test_timeouts_get_unknown_name() -> None:
    with pytest.raises(ConfigError):
        load_settings().timeouts.get("nope")


def test_no_config_read_at_import(user_conf: Path) -> None:
    import subprocess
    import sys

    write(user_conf, "not toml at all [\n")
    repo = Path(__file__).resolve().parents[2]
    # A fresh interpreter, because this process has imported the module already.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import alvis_fsm.engine.settings.model, alvis_fsm.engine.fit.catalog",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
