"""One duration syntax everywhere (issue 26, item 1): SLURM's forms and
units for -t, slurm.time, `gateway --idle` and the catalog; a job time
shorter than the model's expected load plus a margin is refused with the
numbers unless confirmed; every start says its time in words; `--hours`
suggests -t."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alvis_fsm.cluster import jobscript, syntax
from alvis_fsm.cluster.durations import in_words
from alvis_fsm.engine.fit.loadtimes import LoadTimes
from alvis_fsm.engine.session import service
from alvis_fsm.engine.session.store import Store
from alvis_fsm.engine.settings.model import Settings, load_settings
from alvis_fsm.errors import ExitCode, UsageError
from alvis_fsm.fronts.cli.commands.gateway import parse_duration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90m", 5400),
        ("2h", 7200),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1:30:00", 5400),
        ("1-12", 129600),
        ("45", 2700),
        ("1:30", 90),
    ],
)
def test_a_job_time_in_any_form(text: str, seconds: int) -> None:
    assert syntax.parse_walltime(text) == seconds
    # What sbatch is given is always SLURM's own form.
    assert syntax.duration(jobscript.format_walltime(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900), ("1h30m", 5400), ("2d", 172800), ("15:00", 900), ("90", 90)]
)
def test_the_gateway_durations_take_the_same_syntax(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_settings_and_catalog_take_units(tmp_path: Path) -> None:
    cfg = load_settings({"session": {"state_dir": str(tmp_path)}, "slurm": {"time": "2h"}})
    assert cfg.slurm.time == "2h"
    from alvis_fsm.engine.fit.catalog import ModelEntry

    entry = ModelEntry.model_validate({"path": "/x", "max_model_len": 10, "idle_timeout": "1h30m"})
    assert entry.idle_timeout == 5400


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(5400, "1 h 30 min"), (90, "1 min 30 s"), (3600, "1 h"), (93600, "1 d 2 h"), (0, "0 s")],
)
def test_in_words(seconds: int, words: str) -> None:
    assert in_words(seconds) == words


def cfg(tmp_path: Path) -> Settings:
    return load_settings(
        {"session": {"state_dir": str(tmp_path / "s")}, "slurm": {"account": "A", "gpus": "A40:1"}}
    )


def test_mm_ss_is_refused_with_the_numbers(tmp_path: Path) -> None:
    settings = cfg(tmp_path)
    with pytest.raises(UsageError) as err:
        service.create(settings, service.StartOptions(model="gpt-oss-20b", time="1:30"))
    message, hint = err.value.message, err.value.hint or ""
    assert message.startswith("-t/--time: 1:30 is 1 min 30 s, too short for gpt-oss-20b")
    assert "at least 10 min" in message
    assert "Did you mean 1:30:00 (1 h 30 min)?" in hint and "--yes" in hint
    assert not Store(settings.state_dir).names()


def test_the_threshold_follows_earlier_starts(tmp_path: Path) -> None:
    settings = cfg(tmp_path)
    store = Store(settings.state_dir)
    LoadTimes(store.dir).add("gpt-oss-20b", "A40:1", 1200.0)
    with pytest.raises(
        UsageError, match=r"it loads in ~1200 s, based on 1 earlier start.*at least 25 min"
    ):
        service.create(settings, service.StartOptions(model="gpt-oss-20b", time="20m"))
    new = service.create(settings, service.StartOptions(model="gpt-oss-20b", time="30m"))
    assert new.record.time_limit_s == 1800


def test_confirmed_short_time_starts(tmp_path: Path) -> None:
    new = service.create(
        cfg(tmp_path), service.StartOptions(model="gpt-oss-20b", time="1:30", short_ok=True)
    )
    assert new.record.time_limit_s == 90


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOME": str(home),
        "NO_COLOR": "1",
        "PYTHONPATH": str(REPO),
        "ALVIS_FSM_SESSION__STATE_DIR": str(home / "state"),
        "ALVIS_FSM_SSH__HOST": "nohost.invalid",
    }
    return subprocess.run(
        [sys.executable, "-m", "alvis_fsm", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input="",
    )


def test_cli_refuses_before_connecting(tmp_path: Path) -> None:
    proc = run("start", "-m", "gpt-oss-20b", "-t", "1:30", home=tmp_path)
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.startswith("[ERROR] -t/--time: 1:30 is 1 min 30 s"), proc.stderr
    assert "SSH" not in proc.stderr and "ssh" not in proc.stderr.split("[HINT]")[0]


def test_hours_suggests_time(tmp_path: Path) -> None:
    proc = run("start", "--hours", "2", home=tmp_path)
    assert proc.returncode == ExitCode.USAGE
    assert "Did you mean '--time' (-t 2h, -t 90m, -t 1:30:00)?" in proc.stderr, proc.stderr
    assert "--gpus" not in proc.stderr


def test_the_help_names_the_units(tmp_path: Path) -> None:
    out = run("start", "--help", home=tmp_path).stdout
    assert "90m, 2h, 1h30m, 2d" in " ".join(out.split())


@pytest.mark.parametrize(
    ("squeue", "shown"),
    [("59:28", "0:59:28"), ("1:02:03", "1:02:03"), ("1-02:00:00", "1-2:00:00"), ("", None)],
)
def test_time_left_is_written_one_way(squeue: str, shown: str | None) -> None:
    from alvis_fsm.engine.session.service import _time_left

    assert _time_left(squeue) == shown
