"""The conventions of gh, uv and kubectl (issue 16): global options anywhere,
help on stdout with exit 0, effective defaults in --help, config get/unset,
setting-name completion, no terminal escapes from catalogs, and a quiet
non-zero exit when stdout is closed or full."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alvis_fsm.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]


def run(
    *args: str,
    env: dict[str, str] | None = None,
    stdout: int | None = None,
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "alvis_fsm", *args],
        cwd=REPO,
        env=full,
        text=True,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("args", [(), ("config",), ("-q",), ("-v", "config")])
def test_bare_commands_print_help_and_succeed(args: tuple[str, ...]) -> None:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: alvis-fsm")
    assert "Commands:" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize(
    "args",
    [("-q", "models"), ("models", "-q"), ("models", "--quiet"), ("--quiet", "models")],
)
def test_global_options_anywhere(args: tuple[str, ...]) -> None:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "gpt-oss-20b\n"


def test_verbose_after_the_command_is_accepted() -> None:
    proc = run("status", "--offline", "-v")
    assert proc.returncode == 0, proc.stderr
    proc = run("config", "show", "-v")
    assert proc.returncode == 0, proc.stderr


def test_help_shows_the_users_defaults(user_conf: Path) -> None:
    before = " ".join(run("start", "--help").stdout.split())  # help wraps lines
    assert "[default: 58000]" in before and "[default: 1:00:00, at most 7-00:00:00]" in before
    assert "[default: not set]" in before  # slurm.account
    user_conf.write_text(
        '[tunnel]\nlocal_port = 58123\n[slurm]\ntime = "2:00:00"\naccount = "NAISS2025-1-2"\n'
    )
    after = " ".join(run("start", "--help", env={"ALVIS_FSM_SLURM__GPUS": "A100:2"}).stdout.split())
    assert "[default: 58123]" in after
    assert "[default: 2:00:00, at most 7-00:00:00]" in after
    assert "[default: NAISS2025-1-2]" in after
    assert "else A100:2]" in after


def test_config_get_and_unset(user_conf: Path) -> None:
    assert run("config", "set", "tunnel.local_port", "58001").returncode == 0
    got = run("config", "get", "tunnel.local_port")
    assert got.stdout == "58001\n"
    assert str(user_conf) in got.stderr
    assert run("config", "get", "slurm.time").stdout == "1:00:00\n"  # strings bare
    done = run("config", "unset", "tunnel.local_port")
    assert done.returncode == 0 and f"Removed tunnel.local_port from {user_conf}" in done.stdout
    assert run("config", "get", "tunnel.local_port").stdout == "58000\n"
    again = run("config", "unset", "tunnel.local_port")
    assert again.returncode == 0 and "not set" in again.stdout


def test_setting_names_complete() -> None:
    env = {
        "_ALVIS_FSM_COMPLETE": "bash_complete",
        "COMP_WORDS": "alvis-fsm config set slurm.",
        "COMP_CWORD": "3",
    }
    proc = run(env=env)
    words = [line.split(",", 1)[1] for line in proc.stdout.splitlines()]
    assert "slurm.account" in words and "slurm.time" in words
    assert all(w.startswith("slurm.") for w in words)
    env["COMP_WORDS"] = "alvis-fsm config unset tun"
    words = [line.split(",", 1)[1] for line in run(env=env).stdout.splitlines()]
    assert "tunnel.local_port" in words


def test_catalog_text_reaches_the_terminal_without_escapes(tmp_path: Path, user_conf: Path) -> None:
    catalog = tmp_path / "models.json"
    hostile = "Nice\x1b]0;owned\x07 model \x1b[2J\x1b[31mred\x1b[0m\x07 \x9b1m end"
    catalog.write_text(
        json.dumps({"evil": {"path": "/m/evil/", "max_model_len": 8, "description": hostile}})
    )
    user_conf.write_text(f'[catalog]\npaths = ["{catalog}"]\n')
    proc = run("models")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("evil"))
    assert "Nice model red  end" in line
    assert not any(ch in proc.stdout for ch in "\x1b\x07\x9b")


def test_clean() -> None:
    from alvis_fsm.text import inert_line as clean

    assert clean("a\x1b[1;31mb\x1b[0mc") == "abc"
    assert clean("t\x1b]2;title\x1b\\x") == "tx"
    assert clean("tab\tkept\r\x00\x08") == "tab\tkept"
    assert clean("ünïcode ✓") == "ünïcode ✓"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("args", [("models",), ("models", "--json"), ("--help",), ("diagram",)])
def test_full_stdout_ends_quietly(args: tuple[str, ...]) -> None:
    with open("/dev/full", "w") as full:
        proc = run(*args, stdout=full.fileno())
    assert proc.returncode == ExitCode.OUTPUT != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr == "[ERROR] Could not write the output: No space left on device\n"


def test_closed_stdout_ends_quietly() -> None:
    full = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alvis_fsm", "diagram"],
        cwd=REPO,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader went away before reading anything (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == ExitCode.OUTPUT
    assert err == ""


def test_reporter_strips_remote_text(capsys: pytest.CaptureFixture[str]) -> None:
    from alvis_fsm.fronts.ui import Reporter

    ui = Reporter()
    ui.info("Model path: /m/\x1b[2Jevil\x07/")
    ui.log_line("err", "INFO \x1b]0;pwned\x07ready\x1b[K")
    ui.waiting("Waiting for job 1 — \x1b[31mPriority\x1b[0m")
    out = capsys.readouterr()
    assert out.out == "[VLLM ERR] INFO ready\n"
    assert out.err.startswith("[INFO] Model path: /m/evil/\n[INFO] Waiting for job 1 — Priority (")
    assert "\x1b" not in out.err and "\x07" not in out.err


# A process whose terminal closed (issue 31): the pty's other end is gone, so
# every write fails with EIO. With the command line's streams steady, each of
# the ways output is written goes on (print, logging's last resort, rich's
# console, click, a child that inherits the descriptor, the exit-time
# flush) and the work after them still runs.
_HANGUP = r"""
import logging, os, signal, subprocess, sys, time
import click
from rich.console import Console
from alvis_fsm.fronts.output import lost, steady_streams

signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the test: what runs after it
report, go = int(sys.argv[1]), int(sys.argv[2])
steady_streams()
os.write(report, b"ready\n")
while os.read(go, 1) != b"g":
    pass
print("a line for nobody", flush=True)
logging.getLogger("x").warning("a record for nobody")
Console(file=sys.stderr, force_terminal=True).print("[bold]rich for nobody[/bold]")
click.echo("click for nobody", err=True)
subprocess.run(["sh", "-c", "echo child for nobody; echo child >&2"], check=True)
sys.stdout.write("unflushed at exit")
os.write(report, f"cleanup ran {lost().errno}\n".encode())
"""


def test_vanished_terminal_does_not_stop_the_work() -> None:
    import errno
    import pty

    master, slave = pty.openpty()
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANGUP, str(report_w), str(go_r)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        pass_fds=(report_w, go_r),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(slave)
    os.close(report_w)
    os.close(go_r)
    with os.fdopen(report_r, "rb") as report:
        assert report.readline() == b"ready\n"
        os.close(master)  # the terminal closes
        os.write(go_w, b"g")
        rest = report.read().decode()
    os.close(go_w)
    assert proc.wait(timeout=60) == 0
    assert rest == f"cleanup ran {errno.EIO}\n"


def test_follower_stops_when_its_reader_is_gone(tmp_path: Path) -> None:
    """`gateway log -f | head -0`: writes no longer raise, so the follower
    asks whether its stdout is lost, and ends (exit 1, nothing said)."""
    import time

    from alvis_fsm.fronts.gateway.observe.requestlog import Entry, RequestLog

    env = {**os.environ, "PYTHONPATH": str(REPO), "ALVIS_FSM_SESSION__STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alvis_fsm", "gateway", "log", "-f"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader went away
    log = RequestLog(tmp_path)
    deadline = time.monotonic() + 30
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            log.write(
                Entry(
                    time=time.time(), model="m", route="/v1/x", status=200, latency_s=0.01, ok=True
                )
            )
            time.sleep(0.2)
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.wait(timeout=5) == ExitCode.OUTPUT
    assert proc.stderr.read().decode() == ""
