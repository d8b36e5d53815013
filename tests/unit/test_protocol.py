"""The cluster protocol's facts, once (issue 24 item 4): SLURM's job states
by phase, the agent's named arguments, "~" expansion; the agent runs here
under bash with a stand-in squeue/sacct."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from alvis_fsm.cluster import protocol, rundir
from alvis_fsm.cluster.agent import CancelReply, JobNews, Mark, agent_argv
from alvis_fsm.cluster.slurm import PHASES, JobInfo, JobState, Phase
from alvis_fsm.paths import jobscript_template

# Every name SLURM's job_state_string prints (SchedMD/slurm,
# src/common/slurm_protocol_defs.c), flags and base states.
SLURM_PRINTS = [
    "COMPLETING",
    "STAGE_OUT",
    "CONFIGURING",
    "RESIZING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
    "STOPPED",
    "REVOKED",
    "RESV_DEL_HOLD",
    "SIGNALING",
    "PENDING",
    "RUNNING",
    "SUSPENDED",
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
]


def test_every_state_slurm_prints_has_one_phase() -> None:
    assert sorted(s.value for s in PHASES) == sorted(SLURM_PRINTS)
    assert JobState.UNKNOWN.phase is None and not JobState.UNKNOWN.ended


def test_completing_is_over_but_not_released() -> None:
    assert JobState.COMPLETING.ended and not JobState.COMPLETING.released
    assert JobState.CANCELLED.ended and JobState.CANCELLED.released
    assert not JobState.RUNNING.ended and not JobState.PENDING.ended
    assert JobInfo(source="squeue", state=JobState.COMPLETING).ended
    assert not JobInfo(source="unknown", state=JobState.UNKNOWN).ended
    assert JobState.parse("CANCELLED by 1000") is JobState.CANCELLED
    assert JobState.parse("SOMETHING_NEW") is JobState.UNKNOWN


def test_command_args_are_named_and_checked() -> None:
    assert protocol.command_args("jobinfo", {"job": 7}) == ["jobinfo", "job=7"]
    assert protocol.command_args("submit", {"run": "~/r", "has_key": 1}, ["-t", "1:00"]) == [
        "submit",
        "run=~/r",
        "has_key=1",
        "--",
        "-t",
        "1:00",
    ]
    with pytest.raises(ValueError, match="takes"):
        protocol.command_args("jobinfo", {})
    with pytest.raises(ValueError, match="takes"):
        protocol.command_args("jobinfo", {"job": 1, "extra": 2})
    with pytest.raises(ValueError, match="no command"):
        protocol.command_args("nope", {})


def test_shell_definitions_carry_the_tables() -> None:
    out = subprocess.run(
        [
            "bash",
            "-c",
            protocol.shell_definitions()
            + 'printf "%s\\n" "$JOB_STATES_ENDED" "$AGENT_ARGS_wait_ready" "$FILE_STARTED"',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].split() == [s.value for s, p in PHASES.items() if p is Phase.ENDED]
    assert out[1].split() == list(protocol.COMMANDS["wait-ready"])
    assert out[2] == "job.started"


def _scheduler(tmp_path: Path, scripts: dict[str, str]) -> dict[str, str]:
    """An environment whose PATH holds these stand-in scheduler commands
    (name -> the body of a /bin/sh script), with HOME at tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool, body in scripts.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}


def _run(
    tmp_path: Path, argv: list[str], squeue: str = "", sacct: str = ""
) -> subprocess.CompletedProcess[str]:
    scripts = {
        tool: f"printf '%s' '{out}'\n"
        for tool, out in (("squeue", squeue), ("sacct", sacct), ("scancel", ""))
    }
    env = _scheduler(tmp_path, scripts)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)


@pytest.mark.parametrize(
    ("queue", "verdict"),
    [
        ("COMPLETING\n", "unconfirmed"),
        ("CANCELLED\n", "confirmed"),
        ("REVOKED\n", "confirmed"),
        ("SPECIAL_EXIT\n", "confirmed"),
        ("PENDING\n", "unconfirmed"),
        ("", "confirmed"),
    ],
)
def test_cancel_by_name_waits_for_a_released_job(tmp_path: Path, queue: str, verdict: str) -> None:
    proc = _run(
        tmp_path, agent_argv("cancel", {"job": "", "job_name": "n", "confirm": 0}), squeue=queue
    )
    assert proc.returncode == 0, proc.stderr
    assert f"CANCEL|{verdict}|" in proc.stdout


def test_the_agent_refuses_arguments_it_does_not_take(tmp_path: Path) -> None:
    base = ["bash", "-c", protocol.agent_script("agent.sh"), "alvis-fsm-agent"]
    for words, why in (
        (["jobinfo"], "missing argument job="),
        (["jobinfo", "job=1", "run=x"], "unexpected argument 'run=x'"),
        (["jobinfo", "1"], "unexpected argument '1'"),
        (["nope"], "unknown subcommand 'nope'"),
    ):
        proc = _run(tmp_path, base + words)
        assert proc.returncode == 3 and why in proc.stderr, (words, proc.stderr)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("~", "{h}"),
        ("~/a b", "{h}/a b"),
        ("rel/x", "{h}/rel/x"),
        ("/abs/x", "/abs/x"),
        ("~x", "{h}/~x"),
        ("a\nb\n", "{h}/a\nb\n"),
    ],
)
def test_home_path_is_the_one_tilde_expansion(tmp_path: Path, given: str, expected: str) -> None:
    script = protocol.fragment("common.sh") + 'home_path out "$1"; printf "%s" "$out"'
    proc = _run(tmp_path, ["bash", "-c", script, "x", given])
    assert proc.stdout == expected.format(h=tmp_path)


@pytest.mark.parametrize(
    ("squeue", "sacct", "gone"),
    [
        ("COMPLETING|n|||", "", "COMPLETING"),
        ("PENDING|||||", "", "PENDING"),
        ("", "TIMEOUT|n|||0:0", "TIMEOUT"),
        ("", "COMPLETING|n|||0:0", "COMPLETING"),
    ],
)
def test_a_stream_ends_when_the_job_no_longer_runs(
    tmp_path: Path, squeue: str, sacct: str, gone: str
) -> None:
    (tmp_path / "run").mkdir()
    argv = agent_argv(
        "stream",
        {"run": "run", "job": 7, "lines": 1, "from": "", "follow": 1, "interval": 0.1, "check": 1},
    )
    env = _scheduler(
        tmp_path,
        {tool: f"printf '%s\\n' '{out}'\n" for tool, out in (("squeue", squeue), ("sacct", sacct))},
    )
    # stdin open, as the ssh channel's is: its EOF ends the stream.
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("GONE|"):
                assert line.strip() == f"GONE|{gone}"
                break
        else:
            pytest.fail("the stream ended without GONE")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("target", "content", "event"),
    [(rundir.VLLM_EXIT, "1", "EXITED|1"), (rundir.ENDED, "signal TERM", "ENDED|signal TERM")],
)
def test_wait_ready_tells_a_job_that_ended_during_the_slice_by_its_files(
    tmp_path: Path, target: str, content: str, event: str
) -> None:
    """The job writes its files, then ends, between the agent's last look and
    its scheduler query: the files' word (vLLM's status, the signal) is what
    comes back, not the bare FAILED the scheduler gives."""
    (tmp_path / "run").mkdir()
    env = _scheduler(
        tmp_path,
        {
            # The controller has forgotten the job; it wrote its file just before.
            "squeue": f"printf '%s\\n' '{content}' > '{tmp_path}/run/{target}'\n"
            "echo 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n",
            "sacct": "printf '%s\\n' 'FAILED|n|||00:00:05|1:0'\n",
        },
    )
    argv = agent_argv(
        "wait-ready", {"run": "run", "job": 7, "slice": 0.2, "interval": 0.05, "known": 0}
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == event, proc.stdout
    assert "JOB|" not in proc.stdout


def test_ready_comes_with_the_mark_a_stream_starts_from(tmp_path: Path) -> None:
    """Issue 31, item 4: READY says where vLLM's logs stood (MARK|OUT,ERR);
    a stream given that mark shows every line written since, the first of
    them written before the stream itself started."""
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.ADDRESS).write_text("node:8000\n")
    (run / rundir.VLLM_OUT).write_text("loading\n")
    err = (run / rundir.VLLM_ERR).write_text(f"x\n{rundir.STARTUP_LINE}\n")  # ASCII: bytes
    ready = _run(
        tmp_path,
        agent_argv(
            "wait-ready", {"run": "run", "job": 7, "slice": 1, "interval": 0.05, "known": 1}
        ),
    )
    records = [line for line in ready.stdout.splitlines() if "|" in line]
    assert records == [f"MARK|8,{err}", "READY|node:8000"], ready.stderr
    mark = Mark.parse(records[0][5:])
    assert mark == Mark(8, err)
    with (run / rundir.VLLM_OUT).open("a") as f:
        f.write('"POST /v1/chat/completions HTTP/1.1" 200 OK\n')  # sent at connect
    alone = _run(tmp_path, agent_argv("mark", {"run": "run"}))
    assert alone.stdout == f"MARK|{(run / rundir.VLLM_OUT).stat().st_size},{err}\n", alone.stderr
    argv = agent_argv(
        "stream",
        {
            "run": "run",
            "job": 7,
            "lines": 0,
            "from": str(mark),
            "follow": 0,
            "interval": 0.1,
            "check": 30,
        },
    )
    shown = _run(tmp_path, argv)
    assert shown.stdout == 'O|"POST /v1/chat/completions HTTP/1.1" 200 OK\n', shown.stderr
    proc = subprocess.Popen(
        ["follow=1" if w == "follow=0" else w for w in argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_scheduler(tmp_path, {}),
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == 'O|"POST /v1/chat/completions HTTP/1.1" 200 OK\n'
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    bad = _run(tmp_path, ["from=1;2" if w == f"from={mark}" else w for w in argv])
    assert bad.returncode == 3 and "from=1;2 is not OUT,ERR" in bad.stderr


def test_every_reply_is_a_record_the_agent_prints() -> None:
    """The replies' kinds are the agent's: each one ``Reply`` names is a
    record agent.sh prints, so a renamed record cannot go unread."""
    source = protocol.fragment("agent.sh")
    for kind in protocol.Reply:
        assert f"'{kind}|" in source, kind
    assert set(protocol.Reply) == protocol.STREAM_NEWS | protocol.WAIT_REPLIES


def test_the_time_limit_is_what_the_job_script_writes() -> None:
    """ENDED's detail at the time limit is the job script's word for it."""
    assert f'stop_vllm "{protocol.TIME_LIMIT}"' in jobscript_template().read_text()


@pytest.mark.parametrize(
    ("line", "news"),
    [
        ("EXITED|1", JobNews(protocol.Reply.EXITED, "1")),
        ("ENDED|time limit", JobNews(protocol.Reply.ENDED, "time limit")),
        ("GONE|NODE_FAIL", JobNews(protocol.Reply.GONE, "NODE_FAIL")),
        ("UNKNOWN|squeue: timed out", JobNews(protocol.Reply.UNKNOWN, "squeue: timed out")),
        ("READY|node:8000", None),  # a wait's answer, not the stream's news
        ("O|EXITED|1", None),  # a log line
        ("EXITED", None),
    ],
)
def test_the_streams_news_are_typed(line: str, news: JobNews | None) -> None:
    assert JobNews.parse(line) == news


@pytest.mark.parametrize(
    ("news", "limit", "ends"),
    [
        (JobNews(protocol.Reply.ENDED, protocol.TIME_LIMIT), True, True),
        (JobNews(protocol.Reply.GONE, JobState.TIMEOUT.value), True, True),
        (JobNews(protocol.Reply.ENDED, "signal TERM"), False, True),
        (JobNews(protocol.Reply.EXITED, "1"), False, True),
        (JobNews(protocol.Reply.GONE, "CANCELLED"), False, True),
        (JobNews(protocol.Reply.UNKNOWN, "sacct: down"), False, False),
    ],
)
def test_what_the_news_mean(news: JobNews, limit: bool, ends: bool) -> None:
    assert (news.at_time_limit, news.ends_job) == (limit, ends)


def test_the_news_in_words_before_and_after_ready() -> None:
    exited, ended = (
        JobNews(protocol.Reply.EXITED, "1"),
        JobNews(protocol.Reply.ENDED, "signal TERM"),
    )
    assert exited.says("42") == "vLLM exited with status 1"
    assert exited.says("42", before_ready=True) == "vLLM exited with status 1 before it was ready"
    assert ended.says("42") == "The job stopped (signal TERM)"
    assert ended.says("42", before_ready=True) == (
        "The job stopped before vLLM was ready (signal TERM)"
    )
    assert JobNews(protocol.Reply.GONE, "NODE_FAIL").says("42") == (
        "Job 42 is no longer running (NODE_FAIL)"
    )
    assert JobNews(protocol.Reply.UNKNOWN, "squeue: timed out").says("42") == (
        "Could not check job 42: squeue: timed out"
    )


def test_a_cancels_reply_is_typed() -> None:
    """`cancel`'s record, confirmed or not and why (before: "" or the why)."""
    assert CancelReply.parse("confirmed|") == CancelReply(True)
    assert CancelReply.parse("unconfirmed|job 7 is RUNNING") == CancelReply(
        False, "job 7 is RUNNING"
    )
    assert CancelReply.parse("unconfirmed|") == CancelReply(False, "not confirmed")
