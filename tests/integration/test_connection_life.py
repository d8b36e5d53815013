"""The shared connection's life on the lab (issue 31): a laptop that sleeps
while the tunnel's ssh shakes hands with the node, and the login master a
client leaves behind when it dies without closing it.

- A time-out that spans a sleep is the client's absence, not the cluster's
  answer: the tunnel's first opening is tried again (as after a drop), and
  `start` connects.
- The master lives ``ssh.control_persist`` seconds with no channel on it, so
  one left by a killed client ends by itself; a session that relies on it
  (a detached session's supervisor) always has a channel on it and keeps
  the same master, with no re-login.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt, ssh_clients

from alvis_fsm.cluster.ssh import Connection, SSHOptions

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
CLEANED = "Cleaned up job {} successfully"


@pytest.fixture
def tool(lab: Any, tmp_path: Path) -> Any:
    t = Tool(lab, tmp_path / "home", ALVIS_FSM_POLLING__SCHEDULER_INTERVAL="1")
    yield t
    t.close()


def masters(tool: Tool) -> list[int]:
    """The tool's login masters (``ssh -N`` with ControlMaster=yes)."""
    return [
        int(line.split()[0])
        for line in ssh_clients(str(tool.state_dir))
        if "ControlMaster=yes" in line
    ]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# -- item 2: asleep during the tunnel's handshake ----------------------------------------
def test_a_laptop_asleep_during_the_tunnel_handshake_still_connects(
    lab: Any, tool: Tool, tmp_path: Path
) -> None:
    """The moment is made exact by the tunnel ssh itself: the test's ssh
    config runs a hook (``Match exec``) when an ssh reads the config for the
    node, the first time only, which says so and waits a second. Meanwhile
    the laptop's network goes (the login master stops); the tunnel ssh then
    starts its handshake through it, and the whole laptop sleeps (the tool
    and its every ssh stopped) for longer than ``ssh.connect_timeout`` (2 s).
    On waking, the processes run a moment before the network is back (as
    Wi-Fi comes back after the processes): ssh's ConnectTimeout has run out
    during the sleep, "Connection timed out during banner exchange"."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    started = hook_dir / "started"
    hook = hook_dir / "hook.sh"
    hook.write_text(f'[ -e "{started}" ] && exit 1\n: > "{started}"\nsleep 1\nexit 1\n')
    config = tmp_path / "ssh_config"
    config.write_text(f'Include {lab.ssh_config}\nMatch originalhost {lab.node} exec "sh {hook}"\n')
    port = free_port()
    child = tool.spawn(
        "start",
        "-m",
        "lab-ok",
        "--port",
        str(port),
        timeout=120,
        ALVIS_FSM_SSH__CONFIG_FILE=str(config),
        ALVIS_FSM_SSH__CONNECT_TIMEOUT="2",
    )
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists(), "the tunnel ssh never started: " + child.logfile_read.text[-2000:]
    master = masters(tool)
    assert master, ssh_clients(str(tool.state_dir))
    signal_all(master, signal.SIGSTOP)  # the network goes
    try:
        time.sleep(1.5)  # the hook's second is over: the handshake has begun
        laptop = [child.pid] + [
            int(line.split()[0])
            for line in ssh_clients(str(tool.state_dir))
            if int(line.split()[0]) not in master
        ]
        assert len(laptop) >= 2, ssh_clients(str(tool.state_dir))  # the tool and its tunnel ssh
        signal_all(laptop, signal.SIGSTOP)  # the laptop sleeps
        time.sleep(4)  # twice ssh.connect_timeout
        signal_all(laptop, signal.SIGCONT)  # it wakes
        time.sleep(1)
    finally:
        signal_all(master, signal.SIGCONT)  # and the network is back
    index = child.expect_exact([CONNECTED + str(port), pexpect.EOF], timeout=90)
    out = child.logfile_read.text
    assert index == 0, f"exit {child.wait()}: {out[-1500:]}"
    assert "(Connection timed out during banner exchange); trying again in" in out, out[-3000:]
    assert lab.job_state(job_id) == "RUNNING"
    interrupt(child)
    child.expect(pexpect.EOF, timeout=90)
    child.close()
    out = child.logfile_read.text
    assert exit_status(child) == 0 and CLEANED.format(job_id) in out, out[-3000:]
    assert_nothing_left(lab, tool)


# -- item 3: masters that outlive their client ---------------------------------------------
# lab.blocker() holds every GPU of both nodes
@pytest.mark.exclusive
def test_a_master_left_by_a_killed_client_ends_by_itself(lab: Any, tool: Tool) -> None:
    """kill -9 of `start` while its job pends: nothing closes the login
    master; with ``ssh.control_persist`` 3 s it ends once its last channel
    (the wait in flight) has gone. With ControlPersist=yes it never did."""
    port = free_port()
    with lab.blocker():
        child = tool.spawn(
            "start",
            "-m",
            "lab-ok",
            "--port",
            str(port),
            timeout=120,
            ALVIS_FSM_SSH__CONTROL_PERSIST="3",
        )
        child.expect(r"Job submitted: (\d+)")
        child.expect_exact("Waiting for job")
        left = masters(tool)
        assert len(left) == 1, ssh_clients(str(tool.state_dir))
        child.kill(signal.SIGKILL)
        child.expect(pexpect.EOF)
        child.close()
        t_kill = time.monotonic()
        deadline = t_kill + 30
        while masters(tool) and time.monotonic() < deadline:
            time.sleep(0.2)
        ended = time.monotonic() - t_kill
        assert masters(tool) == [], f"the master outlived its client by {ended:.0f} s"
        print(f"master ended {ended:.1f} s after its client was killed (control_persist 3 s)")
        lab.cancel_all()
    assert_nothing_left(lab, tool)


def test_what_a_re_login_costs(lab: Any) -> None:
    """What a master that has ended costs the next command: one login (key
    from a file, no prompt), timed here on the lab's loopback; a real login
    node adds the network's round trips (about 4)."""
    ctl_dir = Path(tempfile.mkdtemp(prefix="afsm-l-", dir="/tmp"))

    class Quiet:
        def interactive(self) -> bool:
            return False

        def ask(self, prompt: str, secret: bool = False) -> str:
            raise AssertionError(prompt)

        def command(self, text: str) -> None:
            pass

    times = []
    for _ in range(5):
        conn = Connection(
            SSHOptions(host=lab.login_host, config_file=str(lab.ssh_config)), ctl_dir / "c", Quiet()
        )
        t0 = time.monotonic()
        conn.open()
        times.append(time.monotonic() - t0)
        conn.close()
    print(
        f"re-login: median {statistics.median(times):.3f} s, {', '.join(f'{t:.3f}' for t in times)}"
    )
    deadline = time.monotonic() + 5
    while ssh_clients(str(ctl_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ssh_clients(str(ctl_dir)) == []


def test_a_detached_session_keeps_its_master_past_its_idle_life(lab: Any, tool: Tool) -> None:
    """Where the tool relies on a long-lived master (a detached session's
    supervisor), something always uses it (the log stream, the tunnel's
    jump): with ``ssh.control_persist`` 2 s it outlives many idle lives,
    with no new login."""
    import urllib.request

    env = {"ALVIS_FSM_SSH__CONTROL_PERSIST": "2"}
    port = free_port()
    status, out = tool.run(
        "start", "-m", "lab-ok", "--port", str(port), "--detach", timeout=120, **env
    )
    assert status == 0, out[-2000:]
    first = masters(tool)
    assert len(first) == 1, ssh_clients(str(tool.state_dir))
    logins = lab.count_accepted("login")
    time.sleep(8)  # four idle lives
    assert masters(tool) == first
    assert lab.count_accepted("login") == logins
    status, out = tool.run("status", "lab-ok", timeout=60, **env)
    assert status == 0 and "tunneled" in out, out[-2000:]
    assert lab.count_accepted("login") == logins  # status used the supervisor's master
    key = __import__("json").loads((tool.state_dir / "sessions" / "lab-ok.json").read_text())[
        "api_key"
    ]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    status, out = tool.run("stop", "lab-ok", timeout=120, **env)
    assert status == 0, out[-2000:]
    assert_nothing_left(lab, tool)


def test_the_gateway_keeps_its_masters_past_their_idle_life(lab: Any, tool: Tool) -> None:
    """The gateway's model sessions rely on their masters as a detached
    session does: with ``ssh.control_persist`` 2 s, a model served, idle
    for four idle lives, still answers through the same master, with no
    new login; Ctrl+C leaves nothing."""
    import httpx

    port = free_port()
    child = tool.spawn(
        "gateway", "--port", str(port), timeout=90, ALVIS_FSM_SSH__CONTROL_PERSIST="2"
    )
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact(f"Gateway on http://localhost:{port}/v1")
    body = {"model": "lab-ok", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", trust_env=False, timeout=120) as http:
        assert http.post("/chat/completions", headers=auth, json=body).status_code == 200
        first = masters(tool)
        assert len(first) == 1, ssh_clients(str(tool.state_dir))
        logins = lab.count_accepted("login")
        time.sleep(8)
        assert masters(tool) == first
        assert http.post("/chat/completions", headers=auth, json=body).status_code == 200
        assert lab.count_accepted("login") == logins
    interrupt(child)
    child.expect(pexpect.EOF, timeout=90)
    child.close()
    assert exit_status(child) == 0, child.logfile_read.text[-2000:]
    assert_nothing_left(lab, tool)
