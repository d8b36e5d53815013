"""Hostile run roots on the lab cluster (issue 6).

The run root is the one user-typed string that reaches a remote shell as a
path: the agent creates the run directory on the login node, sbatch gets it
as the job's working directory, and the job script expands it again on the
compute node. Quotes, ``;``, ``$(touch ~/PWNED)``, backticks, spaces, glob
characters and line breaks that are not "\\n" must all arrive as the literal
path; settings refuse only NUL, CR and LF. Each hostile root is checked
through the settings first (what is refused, and why), then used for real:

* through ``remote.Agent`` over the lab (a held job is submitted from the
  literal directory, then cancelled): the run dir, its key and job script
  are exactly there, with their modes, and sbatch saw the same directory;
* end to end through the CLI (``ALVIS_FSM_REMOTE__RUN_ROOT``) for two roots.

No ``PWNED`` file may appear in the cluster user's home or /tmp (on the
login side or inside the compute node), and no job or ssh is left."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt, ssh_clients

from alvis_fsm.cluster import rundir
from alvis_fsm.cluster.agent import Agent
from alvis_fsm.cluster.ssh import Connection, SSHOptions
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import ConfigError

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
TAG = f"afsm-hostile-{uuid.uuid4().hex[:8]}"
FRAGMENTS = [
    "$(touch ~/PWNED)",
    "`touch /tmp/PWNED`",
    ";touch ~/PWNED;",
    "&& touch /tmp/PWNED",
    "| touch ~/PWNED",
    "'",
    '"',
    "\\",
    " ",
    "  ",
    "\t",
    "$HOME",
    "${IFS}",
    "*",
    "?",
    "[ab]",
    "~",
    "-rf",
    "--",
    "#",
    "!",
    "%j",
    "é",
    "\x85",
    "\u2028",
    "\x1b[0m",
    "\n",
    "\r",
]
hostile = (
    st.lists(
        st.one_of(st.sampled_from(FRAGMENTS), st.text(st.characters(codec="utf-8"), max_size=3)),
        min_size=1,
        max_size=5,
    )
    .map("".join)
    .filter(lambda s: "\x00" not in s)
)  # no environment variable holds a NUL


class Quiet:
    def interactive(self) -> bool:
        return False

    def ask(self, prompt: str, secret: bool = False) -> str:
        raise AssertionError("no prompt expected")

    def command(self, text: str) -> None:
        pass


def pwned(lab: Any) -> list[str]:
    """PWNED files in the cluster user's home and /tmp, on both sides."""
    home = pwd.getpwnam(lab.user).pw_dir
    found = glob.glob(f"{home}/PWNED*") + glob.glob("/tmp/PWNED*")
    ns_pid = (lab.root / "run" / "node-ns.pid").read_text().strip()
    inside = subprocess.run(
        [
            "nsenter",
            "-t",
            ns_pid,
            "-m",
            "-u",
            "sh",
            "-c",
            f"ls -d {home}/PWNED* /tmp/PWNED* 2>/dev/null",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return found + [f"(node) {line}" for line in inside.stdout.splitlines()]


def expand(run_dir: str, home: str) -> str:
    """The agent's and the job script's reading of a run dir."""
    if run_dir == "~":
        return home
    if run_dir.startswith("~/"):
        return f"{home}/{run_dir[2:]}"
    return run_dir if run_dir.startswith("/") else f"{home}/{run_dir}"


def refused_by_settings(value: str) -> ConfigError | None:
    old = os.environ.get("ALVIS_FSM_REMOTE__RUN_ROOT")
    os.environ["ALVIS_FSM_REMOTE__RUN_ROOT"] = value
    try:
        load_settings()
        return None
    except ConfigError as exc:
        return exc
    finally:
        if old is None:
            os.environ.pop("ALVIS_FSM_REMOTE__RUN_ROOT", None)
        else:
            os.environ["ALVIS_FSM_REMOTE__RUN_ROOT"] = old


@pytest.fixture(scope="module")
def agent(lab: Any) -> Iterator[Agent]:
    """remote.Agent on a shared connection of our own to the lab's login node."""
    ctl_dir = Path(tempfile.mkdtemp(prefix="afsm-h-", dir="/tmp"))
    conn = Connection(
        SSHOptions(host=lab.login_host, config_file=str(lab.ssh_config)), ctl_dir / "c", Quiet()
    )
    conn.open()
    before = pwned(lab)
    assert before == [], f"PWNED files exist before the test: {before}"
    try:
        yield Agent(conn)
    finally:
        conn.close()
        home = pwd.getpwnam(lab.user).pw_dir
        for made in (f"{home}/{TAG}", f"/tmp/{TAG}"):
            shutil.rmtree(made, ignore_errors=True)
        deadline = time.monotonic() + 5
        while ssh_clients(str(ctl_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ssh_clients(str(ctl_dir)) == []
        shutil.rmtree(ctl_dir, ignore_errors=True)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=hostile, where=st.sampled_from(["home", "relative", "tmp"]))
@example(value="a b 'q' \"d\" $(touch ~/PWNED) `touch /tmp/PWNED`;touch ~/PWNED", where="home")
@example(value="-rf *; touch /tmp/PWNED", where="tmp")
@example(value="next\x85line", where="home")
@example(value="two\nlines", where="home")
def test_hostile_run_root_through_the_agent(lab: Any, agent: Agent, value: str, where: str) -> None:
    refused = refused_by_settings(value)
    if refused is not None:
        # What settings refuse: only what no quoting keeps on one command line.
        assert {"\x00", "\n", "\r"} & set(value) or not value, refused.message
        assert "remote.run_root" in refused.message
        return
    root = {"home": f"~/{TAG}/", "relative": f"{TAG}/", "tmp": f"/tmp/{TAG}/"}[where] + value
    run_dir = f"{root.rstrip('/')}/s-{uuid.uuid4().hex[:8]}"
    home = pwd.getpwnam(lab.user).pw_dir
    expected = expand(run_dir, home)
    key = "afsm-" + uuid.uuid4().hex
    name = f"{TAG}-{uuid.uuid4().hex[:6]}"
    script = "#!/bin/bash\ntouch ~/PWNED-job\n"  # held: never runs
    job_id = ""
    try:
        made, job_id = agent.submit(
            run_dir,
            key,
            script,
            [
                "--hold",
                f"--account={lab.account}",
                "--gpus-per-node=A40:1",
                "--time=1",
                f"--job-name={name}",
                "--output=/dev/null",
            ],
        )
        assert made == expected, f"run dir {made!r}, not the literal {expected!r}"
        path = Path(expected)
        assert path.is_dir()
        assert pwd.getpwuid(path.stat().st_uid).pw_name == lab.user
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert (path / rundir.API_KEY).read_text() == key + "\n"
        assert stat.S_IMODE((path / rundir.API_KEY).stat().st_mode) == 0o600
        assert (path / rundir.JOB_SCRIPT).read_text() == script
        workdir = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%Z"], capture_output=True, check=True
        ).stdout.decode("utf-8", "surrogateescape")
        assert workdir.rstrip("\n").rstrip("/") == expected.rstrip("/")
    finally:
        if job_id or name:
            agent.cancel(job_id, name)
    assert pwned(lab) == []


# -- end to end: the CLI with a hostile run root ---------------------------------------------
@pytest.fixture
def tool(lab: Any, tmp_path: Path) -> Iterator[Tool]:
    t = Tool(lab, tmp_path / "home")
    yield t
    t.close()
    home = pwd.getpwnam(lab.user).pw_dir
    shutil.rmtree(f"{home}/{TAG}", ignore_errors=True)


@pytest.mark.parametrize(
    "value",
    [
        "a b 'q' \"d\" $(touch ~/PWNED) `touch /tmp/PWNED`;touch ~/PWNED #",
        "next\x85line\u2028sep",
    ],
    ids=["shell-metacharacters", "unicode-line-separators"],
)
def test_hostile_run_root_end_to_end(lab: Any, tool: Tool, value: str) -> None:
    root = f"~/{TAG}/{value}"
    port = free_port()
    child = tool.spawn(
        "start",
        "-m",
        "lab-ok",
        "--port",
        str(port),
        timeout=90,
        ALVIS_FSM_REMOTE__RUN_ROOT=root,
        ALVIS_FSM_TIMEOUTS__JOB_START="30",
        ALVIS_FSM_TIMEOUTS__SERVER_READY="30",
    )
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Streaming logs")
    record = json.loads((tool.state_dir / "sessions" / "lab-ok.json").read_text())
    home = pwd.getpwnam(lab.user).pw_dir
    run_dir = record["run_dir"]
    assert run_dir.startswith(f"{home}/{TAG}/{value}/lab-ok-"), run_dir
    assert (Path(run_dir) / rundir.VLLM_OUT).is_file()
    assert (Path(run_dir) / rundir.ADDRESS).is_file()
    interrupt(child)
    child.expect_exact(f"Cleaned up job {job_id} successfully")
    child.expect(pexpect.EOF)
    child.close()
    assert exit_status(child) == 0
    assert pwned(lab) == []
    assert_nothing_left(lab, tool)
