"""The cluster side is inert to hostile input and leaves nothing (issue 22,
findings 2, 6 and 9), on the lab cluster.

* Finding 2: the cluster user's login shell is switched to fish, tcsh, zsh
  (and bash) with ``usermod -s`` for one test and restored after. Another
  user (root here) has made a hub directory ``models--org--x\\'";id>pwned;#``
  (fish reads ``\\'`` inside single quotes as an escape). ``models --discover
  --add`` and ``start`` (whose snapshot probe names that path) work, and no
  ``pwned`` file appears; start/status/logs/stop work under each shell.
* Finding 6: a FIFO named ``config.json`` and a directory name with a "\\r"
  in the hub: ``models --discover`` answers at once, skips the bad name with
  a word, ``--add`` works, and nothing is left running on the login node.
* Finding 9: while ``logs -f`` streams, the client (SIGKILL of the tool and
  its ssh) or the stream's own shell on the login node dies: nothing of the
  stream (tail, sed, the agent) stays on the login node."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from tool import Tool, assert_nothing_left, free_port

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
HOSTILE_ORG_NAME = "org--x\\'\";id>pwned;#"  # models--org--x\'";id>pwned;#
HOSTILE_NAME = "x-id-pwned"  # what --discover suggests for it


def _hub(lab: Any) -> Path:
    return Path(lab.models)


def _tiny_ok(lab: Any) -> Path:
    return Path(lab.model_path("alvislab", "tiny-ok"))


def _login_home(lab: Any) -> Path:
    return Path(pwd.getpwnam(lab.user).pw_dir)


def _pwned(lab: Any) -> list[str]:
    home = _login_home(lab)
    found = [str(p) for p in (home.glob("pwned*"))]
    found += [str(p) for p in Path("/tmp").glob("pwned*")]
    return found


def _user_procs(lab: Any) -> dict[int, str]:
    """The cluster user's processes on the login-node side: pid -> command line."""
    out = subprocess.run(
        ["ps", "-ww", "-u", lab.user, "-o", "pid=,args="],
        text=True,
        capture_output=True,
        check=False,
    ).stdout
    procs: dict[int, str] = {}
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if pid.isdigit():
            procs[int(pid)] = args
    return procs


def _new_procs(lab: Any, before: dict[int, str], pattern: str, wait: float = 8) -> list[str]:
    """Processes matching ``pattern`` that were not there ``before``, once
    ``wait`` seconds have passed without them going away."""
    deadline = time.monotonic() + wait
    while True:
        left = [
            f"{pid} {args}"
            for pid, args in _user_procs(lab).items()
            if pid not in before and re.search(pattern, args)
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.3)


@pytest.fixture
def tool(lab: Any, tmp_path: Path) -> Iterator[Tool]:
    """The tool with the lab's ssh config and account, the lab's catalog and
    a catalog of its own (where --add writes)."""
    import tomllib

    mine = tmp_path / "my-models.json"
    mine.write_text("{}\n")
    # The lab's catalog, as this stream's settings name it (it lives in the
    # main client dir only, not in every stream's).
    settings = tomllib.loads(Path(lab.env["ALVIS_FSM_CONFIG"]).read_text())
    catalogs = [*settings["catalog"]["paths"], str(mine)]
    config = tmp_path / "alvis-fsm.toml"
    config.write_text(
        f'[ssh]\nconfig_file = "{lab.ssh_config}"\n'
        f'[slurm]\naccount = "{lab.account}"\n'
        f"[catalog]\npaths = {json.dumps(catalogs)}\n"
    )
    t = Tool(lab, tmp_path / "home", ALVIS_FSM_CONFIG=str(config))
    yield t
    t.close()
    lab.cancel_all()


@pytest.fixture
def hostile_hub(lab: Any) -> Iterator[Path]:
    """Made by someone else (root) in the shared hub: a copy of tiny-ok under
    the hostile name, a snapshot whose config.json is a FIFO, one whose
    directory name holds a "\\r"."""
    hub = _hub(lab)
    made = [
        hub / f"models--{HOSTILE_ORG_NAME}",
        hub / "models--org--fifo",
        hub / "models--org--cr\r",
    ]
    for path in _pwned(lab):
        os.unlink(path)
    snap = made[0] / "snapshots" / "abc123"
    fifo = made[1] / "snapshots" / "def456" / "config.json"
    cr_snap = made[2] / "snapshots" / "0a1b2c"
    try:
        subprocess.run(["rm", "-rf", "--", *map(str, made)], check=True)  # a failed run's
        snap.mkdir(parents=True)
        subprocess.run(["cp", "-a", "--sparse=always", f"{_tiny_ok(lab)}/.", str(snap)], check=True)
        fifo.parent.mkdir(parents=True)
        os.mkfifo(fifo, 0o644)
        cr_snap.mkdir(parents=True)
        (cr_snap / "config.json").write_text('{"max_position_embeddings": 2048}')
        for path in made:
            subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
        yield snap
    finally:
        # Release any reader still blocked on the FIFO (a stalled discovery).
        if fifo.exists():
            with open(os.open(fifo, os.O_RDWR | os.O_NONBLOCK), "w") as held:
                held.write("{}")
        subprocess.run(["rm", "-rf", "--", *map(str, made)], check=True)


@pytest.fixture(params=["fish", "tcsh", "zsh", "bash"])
def login_shell(lab: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """The cluster user's login shell, for one test (login and compute nodes
    share /etc/passwd)."""
    path = subprocess.run(
        ["sh", "-c", f"command -v {request.param}"], text=True, capture_output=True, check=False
    ).stdout.strip()
    if not path:
        pytest.skip(f"{request.param} is not installed (tests/lab/up installs it)")
    before = pwd.getpwnam(lab.user).pw_shell
    subprocess.run(["usermod", "-s", path, lab.user], check=True)
    try:
        yield path
    finally:
        subprocess.run(["usermod", "-s", before, lab.user], check=True)


def _discover(tool: Tool, *extra: str) -> subprocess.CompletedProcess[str]:
    return tool.run_piped("models", "--discover", *extra, timeout=60)


# hostile_hub puts hostile model dirs in the shared hub: never beside
# test_discover.py's listings of it (one group: one stream, in turn)
@pytest.mark.xdist_group("hub")
def test_hostile_names_under_every_login_shell(
    lab: Any, tool: Tool, hostile_hub: Path, login_shell: str
) -> None:
    assert pwd.getpwnam(lab.user).pw_shell == login_shell
    proc = _discover(tool, "--add", HOSTILE_NAME)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Added '{HOSTILE_NAME}'" in proc.stdout
    added = json.loads((tool.home.parent / "my-models.json").read_text())
    assert added[HOSTILE_NAME]["path"] == f"{hostile_hub}/"
    assert _pwned(lab) == []

    # start (its snapshot probe and job script get the hostile path), status, logs, stop.
    port = free_port()
    proc = tool.run_piped("start", "-m", HOSTILE_NAME, "--port", str(port), "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert CONNECTED + str(port) in proc.stdout
    status, out = tool.run("status")
    assert status == 0 and f"{HOSTILE_NAME}: tunneled" in out, out
    logs = tool.run_piped("logs", HOSTILE_NAME, "-n", "5")
    assert logs.returncode == 0, logs.stderr
    # uvicorn's line, with vLLM's process prefix as the real server writes it.
    assert re.search(
        r"\[VLLM ERR\] (\(APIServer pid=\d+\) )?INFO:     Application startup complete\.",
        logs.stdout,
    ), logs.stdout
    stopped = tool.run_piped("stop", HOSTILE_NAME, timeout=90)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "Cleaned up job" in stopped.stdout + stopped.stderr
    assert _pwned(lab) == []
    assert_nothing_left(lab, tool)


# hostile_hub puts hostile model dirs in the shared hub: never beside
# test_discover.py's listings of it (one group: one stream, in turn)
@pytest.mark.xdist_group("hub")
def test_a_fifo_and_a_carriage_return_in_the_hub(lab: Any, tool: Tool, hostile_hub: Path) -> None:
    before = _user_procs(lab)
    started = time.monotonic()
    proc = _discover(tool, "--json")
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert took < 30, f"discovery took {took:.0f} s"  # bounded, not the 120 s channel timeout
    models = {m["repo"]: m for m in json.loads(proc.stdout)["models"]}
    assert models["org/fifo"]["max_model_len"] is None  # listed, its config.json not read
    assert not any(repo.startswith("org/cr") for repo in models)
    assert "Skipped" in proc.stderr and "models--org--cr?" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # --add of the good model works next to them; of the skipped one, refused in words.
    added = _discover(tool, "--add", "tiny-ok")
    assert added.returncode == 0, added.stdout + added.stderr
    refused = _discover(tool, "--add", "cr")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "is not among the models discovered" in refused.stderr
    # Nothing of the discovery is left on the login node.
    assert _new_procs(lab, before, r"alvis-fsm-agent|head -c|config\.json") == []
    assert_nothing_left(lab, tool)


def _stream(tool: Tool, name: str) -> pexpect.spawn:
    child = tool.spawn("logs", name, "-f", timeout=60)
    child.expect(r"\[VLLM ERR\] ")
    return child


@pytest.mark.parametrize("how", ["client killed", "stream shell killed"])
def test_nothing_of_a_log_stream_outlives_it(lab: Any, tool: Tool, how: str) -> None:
    port = free_port()
    proc = tool.run_piped("start", "-m", "lab-ok", "--port", str(port), "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = _user_procs(lab)
    child = _stream(tool, "lab-ok")
    streaming = _new_procs(lab, before, r"^tail |^sed ", wait=0)
    assert len(streaming) >= 2, streaming  # the stream is there, on the login node
    agents = [
        int(line.split()[0]) for line in _new_procs(lab, before, r"alvis-fsm-agent stream", wait=0)
    ]
    assert agents, _user_procs(lab)
    if how == "client killed":
        # The window closed: the tool and every ssh it started die at once.
        ours = [
            int(line.split()[0])
            for line in subprocess.run(
                ["pgrep", "-f", str(tool.state_dir)], text=True, capture_output=True
            ).stdout.split()
        ]
        for pid in [child.pid, *ours]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    else:
        # The stream's shell dies without its cleanup (OOM killer, an admin).
        for pid in agents:
            os.kill(pid, signal.SIGKILL)
    left = _new_procs(lab, before, r"^tail |^sed |alvis-fsm-agent stream|^cat$", wait=10)
    child.close(force=True)
    assert left == [], f"left on the login node: {left}"
    tool.run_piped("stop", "lab-ok", timeout=90)
    assert_nothing_left(lab, tool)
