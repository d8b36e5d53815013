"""Resilience on the lab cluster (issue 6): faults injected into a live
session, each followed by the check that no job and no ssh of the tool is
left.

1. the tunnel ssh SIGKILLed 20 times in one session;
2. the login node's sshd (listener and session children) stopped for 10 s
   while the job waits for a GPU, and again while tunneled;
3. vLLM dying after it was ready (model ``lab-die``);
4. the client SIGKILLed while tunneled, then ``resume``;
5. Ctrl+C in each live state;
6. a changed compute-node host key;
7. the API key on no command line on either side, and file modes / bind
   address of what holds it.

When ``ALVIS_RELIABILITY_RESULTS`` names a file, each test appends one JSON
line per fault to it (``{"fault", "tries", "survived", "worst_recovery_s",
...}``); ``tools/reliability.py`` turns those into ``docs/concepts/reliability.md``.
Numbers are measured here, never typed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pytest
from tool import (
    Tool,
    assert_nothing_left,
    exit_status,
    free_port,
    interrupt,
    report,
    ssh_clients,
    tool_jobs,
    wait_jobs_gone,
)

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
REPO = Path(__file__).resolve().parents[2]
LAB_UP = REPO / "tests" / "lab" / "up"

TUNNEL_KILLS = 20
RECOVERY_LIMIT_S = 5.0
SSHD_OUTAGE_S = 10.0
DETECT_LIMIT_S = 5.0
# The tool's notices while it reopens a dropped tunnel (engine.Runner.serve).
DROPPED = re.compile(r"\[WARN\] [^\n]*[Tt]unnel dropped")
BACK_UP = "Tunnel back up: http://localhost:"


# -- helpers ------------------------------------------------------------------------
def session(tool: Tool, name: str = "lab-ok") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tool.state_dir / "sessions" / f"{name}.json").read_text())
    return data


def get_models(port: int, key: str, timeout: float = 2) -> list[str] | None:
    """GET /v1/models through the tunnel; the model ids, or None if it does not answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read().decode())
    except (OSError, ValueError):
        return None
    return [str(m.get("id")) for m in data.get("data", [])]


def answers(port: int, key: str) -> bool:
    return get_models(port, key) == ["alvislab/tiny-ok", "lab-ok"]


def master_pid(lab: Any, control: str, host: str) -> int | None:
    """Pid of the ssh master on a control socket (``ssh -O check``), or None."""
    proc = subprocess.run(
        ["ssh", "-F", str(lab.ssh_config), "-S", control, "-O", "check", host],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    match = re.search(r"pid=(\d+)", proc.stderr + proc.stdout)
    return int(match.group(1)) if proc.returncode == 0 and match else None


def tunnel_ssh_seen(tool: Tool, control: str) -> list[str]:
    """Tunnel ssh processes as ps sees them (their argv names ``-S <control>``),
    for failure messages: one that runs but does not answer on its socket is
    invisible to the tool."""
    return [line for line in ssh_clients(str(tool.state_dir)) if f"-S {control} " in line]


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def port_listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def expect_after(child: pexpect.spawn, pattern: str, deadline: float, exact: bool = True) -> None:
    """expect with a deadline on the monotonic clock (not a fresh timeout)."""
    left = max(0.05, deadline - time.monotonic())
    if exact:
        child.expect_exact(pattern, timeout=left)
    else:
        child.expect(pattern, timeout=left)


def start_tunneled(tool: Tool, model: str = "lab-ok") -> tuple[pexpect.spawn, int, str]:
    """`start -m MODEL` until it streams logs; returns (child, local port, job id)."""
    port = free_port()
    child = tool.spawn("start", "-m", model, "--port", str(port), timeout=90)
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Streaming logs")
    return child, port, job_id


def ctrl_c_cleans(child: pexpect.spawn, job_id: str, status: int = 0) -> None:
    interrupt(child)
    child.expect_exact(f"Cleaned up job {job_id} successfully", timeout=60)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert exit_status(child) == status, child.logfile_read.text[-3000:]


# -- 1. the tunnel ssh killed 20 times ------------------------------------------------
def test_tunnel_ssh_killed_20_times(lab: Any, tool: Tool) -> None:
    child, port, job_id = start_tunneled(tool)
    record = session(tool)
    key, control = record["api_key"], record["tunnel_control_path"]
    assert control.endswith(".t")
    times: list[float] = []
    survived = 0
    try:
        for i in range(TUNNEL_KILLS):
            old = master_pid(lab, control, lab.node)
            assert old, f"kill {i + 1}: no tunnel master answers on {control}: " + repr(
                tunnel_ssh_seen(tool, control)
            )
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            deadline = t0 + RECOVERY_LIMIT_S
            expect_after(child, DROPPED.pattern, deadline, exact=False)
            expect_after(child, BACK_UP + str(port), deadline)

            def recovered(old: int = old) -> bool:
                pid = master_pid(lab, control, lab.node)
                return bool(pid and pid != old and answers(port, key))

            while not recovered():
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"kill {i + 1}: the tunnel is not back (answering, with a master on "
                        f"{control}) within {RECOVERY_LIMIT_S:.0f} s; master: "
                        f"{master_pid(lab, control, lab.node)}, answers: {answers(port, key)}, "
                        f"tunnel ssh seen by ps: {tunnel_ssh_seen(tool, control)}"
                    )
                time.sleep(0.05)
            times.append(time.monotonic() - t0)
            assert session(tool)["job_id"] == job_id
            assert lab.job_state(job_id) == "RUNNING"
            assert tool_jobs(lab, tool) == [job_id]  # never a second job
            survived += 1
            time.sleep(0.2)
        assert answers(port, key)
        ctrl_c_cleans(child, job_id)
    finally:
        report(
            "tunnel ssh SIGKILLed (one session)",
            TUNNEL_KILLS,
            survived,
            max(times) if times else None,
            recoveries_s=[round(t, 3) for t in times],
            note="recovery = SIGKILL -> /v1/models answers through a new tunnel whose control"
            " socket answers `ssh -O check` (so the tool can still find and close it)",
        )
    assert not port_listening(port)
    assert_nothing_left(lab, tool)


# -- 2. the login node's sshd down for 10 s ----------------------------------------------
def sshd_tree(lab: Any) -> list[int]:
    """The login sshd listener (its pid file) and every process below it."""
    listener = int((lab.root / "run" / "sshd-login.pid").read_text().split()[0])
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    ).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    tree, todo = [], [listener]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def restore_login_sshd(lab: Any) -> None:
    """`tests/lab/up` restarts a dead daemon with its usual command line."""
    subprocess.run(["bash", str(LAB_UP)], capture_output=True, text=True, timeout=120, check=True)
    wait_until("the login sshd to answer", lambda: port_listening(22022), timeout=10)


# the login sshd (every stream's) is killed and restarted by tests/lab/up; holds every GPU
@pytest.mark.exclusive
def test_login_sshd_down_10s_while_pending(lab: Any, tool: Tool) -> None:
    survived, recovery = 0, None
    restored = False
    try:
        with lab.blocker() as blocker:
            port = free_port()
            child = tool.spawn("start", "-m", "lab-ok", "--port", str(port), timeout=120)
            child.expect(r"Job submitted: (\d+)")
            job_id = child.match.group(1)
            child.expect_exact("Waiting for job to start")
            control = session(tool)["control_path"]
            old_master = master_pid(lab, control, lab.login_host)
            assert old_master
            assert lab.job_state(job_id) == "PENDING"

            t_down = time.monotonic()
            tree = kill_login_sshd(lab)
            assert len(tree) >= 3, tree  # listener + at least our session's [priv] and child
            # The shared connection really dropped: its master exits.
            wait_until(
                "the shared connection's master to exit",
                lambda: not os.path.exists(f"/proc/{old_master}"),
                timeout=20,
            )
            assert not port_listening(22022)
            time.sleep(max(0.0, t_down + SSHD_OUTAGE_S - time.monotonic()))
            assert lab.job_state(job_id) == "PENDING"  # an outage never touches the job
            restore_login_sshd(lab)
            restored = True
            t_up = time.monotonic()
            new_master = wait_until(
                "the tool to reopen its shared connection",
                lambda: master_pid(lab, control, lab.login_host),
                timeout=30,
                interval=0.05,
            )
            recovery = time.monotonic() - t_up
            assert new_master != old_master
            lab.stop_blockers()
            assert blocker not in lab.jobs()
            child.expect_exact(CONNECTED + str(port), timeout=90)
            child.expect_exact("Streaming logs")
            record = session(tool)
            assert record["job_id"] == job_id
            assert tool_jobs(lab, tool) == [job_id]
            assert answers(port, record["api_key"])
            survived = 1
            ctrl_c_cleans(child, job_id)
    finally:
        if not restored:
            restore_login_sshd(lab)
        report(
            f"login sshd stopped {SSHD_OUTAGE_S:.0f} s while pending",
            1,
            survived,
            recovery,
            note="recovery = login sshd back -> shared connection reopened",
        )
    assert_nothing_left(lab, tool)


def kill_login_sshd(lab: Any) -> list[int]:
    """SIGKILL the login sshd's listener and all its session children."""
    tree = sshd_tree(lab)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return tree


# the login sshd (every stream's) is killed and restarted by tests/lab/up
@pytest.mark.exclusive
def test_login_sshd_down_10s_while_tunneled(lab: Any, tool: Tool) -> None:
    """The tunnel rides on the shared connection: both drop, the log stream
    too; all come back once the login node does, with the same job."""
    survived, recovery = 0, None
    restored = False
    try:
        child, port, job_id = start_tunneled(tool)
        record = session(tool)
        key = record["api_key"]
        old_master = master_pid(lab, record["control_path"], lab.login_host)
        t_down = time.monotonic()
        assert len(kill_login_sshd(lab)) >= 3
        expect_after(child, DROPPED.pattern, t_down + 10, exact=False)
        assert not answers(port, key)
        time.sleep(max(0.0, t_down + SSHD_OUTAGE_S - time.monotonic()))
        assert lab.job_state(job_id) == "RUNNING"
        restore_login_sshd(lab)
        restored = True
        t_up = time.monotonic()
        wait_until("the tunnel to answer again", lambda: answers(port, key), 60, 0.05)
        recovery = time.monotonic() - t_up
        child.expect_exact(BACK_UP + str(port), timeout=30)
        new_master = master_pid(lab, record["control_path"], lab.login_host)
        assert new_master and new_master != old_master
        assert master_pid(lab, record["tunnel_control_path"], lab.node)
        # The log stream is back as well: a new request's access line is shown
        # (the stream restarts with only new lines, so ask until one shows).
        deadline = time.monotonic() + 15
        while True:
            assert answers(port, key)
            try:
                child.expect(r"GET /v1/models", timeout=1)
                break
            except pexpect.TIMEOUT:
                assert time.monotonic() < deadline, "the log stream did not come back"
        assert session(tool)["job_id"] == job_id
        assert tool_jobs(lab, tool) == [job_id]
        survived = 1
        ctrl_c_cleans(child, job_id)
    finally:
        if not restored:
            restore_login_sshd(lab)
        report(
            f"login sshd stopped {SSHD_OUTAGE_S:.0f} s while tunneled",
            1,
            survived,
            recovery,
            note="recovery = login sshd back -> /v1/models answers through the tunnel again",
        )
    assert_nothing_left(lab, tool)


# -- 3. vLLM dies after it was ready ----------------------------------------------------
def test_vllm_dies_after_ready(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn("start", "-m", "lab-die", "--port", str(port), timeout=90)
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    delay = None
    try:
        child.expect(r"\[ERROR\] [^\n]*vLLM exited", timeout=60)
        t_error = time.time()
        child.expect(pexpect.EOF, timeout=60)
        t_exit = time.time()
        child.close()
        out = child.logfile_read.text
        run_dir = Path(session(tool, "lab-die")["run_dir"])
        exit_file = run_dir / "vllm.exit"
        assert exit_file.is_file(), f"no {exit_file}"
        died = exit_file.stat().st_mtime
        delay = t_exit - died
        assert t_error - died <= DETECT_LIMIT_S
        assert delay <= DETECT_LIMIT_S, f"exited {delay:.1f} s after vLLM did"
        assert exit_status(child) == 6, out[-3000:]
        assert (
            "CUDA error: an illegal memory access" in out
            or "EngineCore encountered a fatal error" in out
        ), out[-3000:]
        assert f"Cancelling job {job_id}" in out or f"Cleaned up job {job_id}" in out
        assert wait_jobs_gone(lab, [job_id]) == []
    finally:
        report(
            "vLLM dies after ready (lab-die)",
            1,
            int(delay is not None and delay <= DETECT_LIMIT_S),
            delay,
            note="recovery = vllm.exit written -> tool exited (code 6)",
        )
    assert not port_listening(port)
    assert_nothing_left(lab, tool)


# -- 4. the client killed while tunneled -------------------------------------------------
def test_client_sigkill_then_resume(lab: Any, tool: Tool) -> None:
    survived, recovery = 0, None
    try:
        child, port, job_id = start_tunneled(tool)
        key = session(tool)["api_key"]
        child.kill(signal.SIGKILL)
        child.expect(pexpect.EOF)
        child.close()
        assert exit_status(child) == 128 + signal.SIGKILL
        time.sleep(1)
        assert lab.job_state(job_id) == "RUNNING"  # a killed client cancels nothing

        t0 = time.monotonic()
        resumed = tool.spawn("resume", timeout=90)
        resumed.expect_exact(f"Resuming session 'lab-ok' (job {job_id}, tunneled)")
        resumed.expect_exact(CONNECTED + str(port))
        recovery = time.monotonic() - t0
        resumed.expect_exact("Streaming logs")
        assert "Job submitted" not in resumed.logfile_read.text
        assert session(tool)["job_id"] == job_id
        assert tool_jobs(lab, tool) == [job_id]
        assert answers(port, key)
        survived = 1
        ctrl_c_cleans(resumed, job_id)
    finally:
        report(
            "client SIGKILLed while tunneled, then resume",
            1,
            survived,
            recovery,
            note="recovery = resume started -> connection verified",
        )
    assert_nothing_left(lab, tool)


# -- 5. Ctrl+C in each live state ---------------------------------------------------------
LIVE_STATES = ["submitted", "running", "serving", "tunneled"]


@pytest.mark.parametrize(
    "where",
    [
        # submitted: lab.blocker() holds every GPU of both nodes
        pytest.param(w, marks=pytest.mark.exclusive) if w == "submitted" else w
        for w in LIVE_STATES
    ],
)
def test_ctrl_c_in_each_live_state(lab: Any, tool: Tool, where: str) -> None:
    model = {"running": "lab-hang"}.get(where, "lab-ok")
    hit = ""
    cleaned_in = None
    blocker = contextlib.nullcontext("") if where != "submitted" else lab.blocker()
    try:
        with blocker as blocker_id:
            port = free_port()
            child = tool.spawn("start", "-m", model, "--port", str(port), timeout=90)
            child.expect(r"Job submitted: (\d+)")
            job_id = child.match.group(1)
            if where == "submitted":
                child.expect_exact("Waiting for job to start")
                assert lab.job_state(job_id) == "PENDING"
            elif where == "running":
                child.expect_exact("Job is running on node")
            elif where == "serving":
                # SERVING lasts from READY until the tunnel is verified: a few
                # ms, since the tunnel is opened while vLLM loads. "Testing
                # connection..." is printed in that state, so this is as close
                # as a terminal can get; where it lands is recorded below.
                child.expect_exact("Testing connection...")
            else:
                child.expect_exact("Streaming logs")
            hit = session(tool, model)["state"]
            t0 = time.monotonic()
            interrupt(child)
            child.expect_exact(f"Cleaned up job {job_id} successfully", timeout=60)
            child.expect(pexpect.EOF, timeout=30)
            cleaned_in = time.monotonic() - t0
            child.close()
            out = child.logfile_read.text
            # Ctrl+C ends a streaming session normally (0), interrupts a start-up (130).
            if where == "serving":
                # The interrupt may land on either side of the move to tunneled.
                assert exit_status(child) in (0, 130), out[-3000:]
                if CONNECTED in out:
                    assert exit_status(child) == 0, out[-3000:]
            else:
                assert exit_status(child) == (0 if where == "tunneled" else 130), out[-3000:]
            if where in ("submitted", "running"):
                assert hit == where
            assert wait_jobs_gone(lab, [job_id]) == []
            if blocker_id:
                # Someone else's job is untouched (by id: tests/lab/blocker may
                # submit it as another user than this stream's).
                assert lab.job_state(blocker_id) == "RUNNING"
        assert not port_listening(port)
        assert_nothing_left(lab, tool)
    finally:
        report(
            f"Ctrl+C while {where}",
            1,
            int(cleaned_in is not None),
            cleaned_in,
            state_hit=hit,
            note="recovery = Ctrl+C -> cleaned and exited",
        )


# -- 6. a changed compute-node host key ------------------------------------------------------
def test_changed_node_host_key_is_refused(lab: Any, tool: Tool, tmp_path: Path) -> None:
    keyfile = tmp_path / "throwaway"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "throwaway", "-f", str(keyfile)],
        check=True,
        capture_output=True,
    )
    kind, blob = Path(f"{keyfile}.pub").read_text().split()[:2]
    node_port = lab.values.get("LAB_NODE_PORT", "22023")
    refused = False
    try:
        lab.reset_known_hosts()
        with lab.known_hosts.open("a") as handle:
            handle.write(f"[{lab.node}]:{node_port} {kind} {blob}\n")
        port = free_port()
        status, out = tool.run("start", "-m", "lab-ok", "--port", str(port), timeout=120)
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in out, out[-3000:]
        assert status == 4, out[-3000:]
        job_id = re.search(r"Job submitted: (\d+)", out)
        assert job_id, out
        assert f"Cancelling job {job_id.group(1)}" in out
        assert CONNECTED not in out
        assert not port_listening(port)
        assert wait_jobs_gone(lab, [job_id.group(1)]) == []
        # The wrong key is still what known_hosts says: never overwritten.
        assert blob in lab.known_hosts.read_text()
        refused = True
    finally:
        lab.reset_known_hosts()
        report(
            "changed compute-node host key",
            1,
            int(refused),
            None,
            note="refused with OpenSSH's warning, job cancelled, exit 4",
        )
    assert_nothing_left(lab, tool)


# -- 7. the API key on no command line; file modes; loopback only ---------------------------
def _argv_everywhere(ns_pid: str) -> list[str]:
    """Every process's argv, as ps shows it on the host and inside the node's
    namespace, plus /proc/*/cmdline read directly."""
    lines: list[str] = []
    for argv in (
        ["ps", "-ww", "-eo", "args="],
        ["nsenter", "-t", ns_pid, "-m", "-u", "ps", "-ww", "-eo", "args="],
    ):
        lines += subprocess.run(
            argv, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                lines.append(
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                )
    return lines


class Sampler(threading.Thread):
    """Samples every command line on the machine (both sides of the lab)
    until stopped, noting the session's state at each sample."""

    def __init__(self, tool: Tool, ns_pid: str, name: str) -> None:
        super().__init__(daemon=True)
        self.tool, self.ns_pid, self.name = tool, ns_pid, name
        self.stop = threading.Event()
        self.samples: dict[str, int] = {}
        self.leaks: list[str] = []
        self.leaky_samples = 0
        self.saw_tool = 0  # samples that saw the tool's own ssh (the sampling works)
        self.key = ""

    def run(self) -> None:
        path = self.tool.state_dir / "sessions" / f"{self.name}.json"
        while not self.stop.is_set():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            self.key = self.key or data.get("api_key", "")
            if not self.key:
                time.sleep(0.05)
                continue
            lines = _argv_everywhere(self.ns_pid)
            state = data.get("state", "?")
            self.samples[state] = self.samples.get(state, 0) + 1
            leaks = [f"[{state}] {line[:300]}" for line in lines if self.key in line]
            self.leaks += leaks
            self.leaky_samples += bool(leaks)
            self.saw_tool += any(str(self.tool.state_dir) in line for line in lines)
            time.sleep(0.1)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_api_key_never_on_a_command_line(lab: Any, tool: Tool) -> None:
    # A state dir the tool must create itself, so its mode is the tool's doing.
    state_dir = tool.state_dir / "state"
    tool.env["ALVIS_FSM_SESSION__STATE_DIR"] = str(state_dir)
    tool.state_dir = state_dir
    ns_pid = (lab.root / "run" / "node-ns.pid").read_text().strip()
    sampler = Sampler(tool, ns_pid, "lab-ok")
    sampler.start()
    try:
        port = free_port()
        child = tool.spawn("start", "-m", "lab-ok", "--port", str(port), timeout=90)
        child.expect(r"Job submitted: (\d+)")
        job_id = child.match.group(1)
        child.expect_exact(CONNECTED + str(port))
        child.expect_exact("Streaming logs")
        wait_until("5 samples while tunneled", lambda: sampler.samples.get("tunneled", 0) >= 5, 30)
        record = session(tool)
        key = record["api_key"]
        assert key and sampler.key == key
        env = tool.run_piped("env")
        assert env.returncode == 0, env.stderr
        assert f"export OPENAI_API_KEY={key}" in env.stdout

        # The key reaches vLLM through its environment, not its argv.
        vllm = [
            p
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and b"vllm\0serve" in _read(p / "cmdline")
            and record["run_dir"].encode() in _read(p / "environ") + _read_link(p / "cwd")
        ]
        assert vllm, "the vLLM stand-in of this session was not found"
        assert any(f"VLLM_API_KEY={key}".encode() in _read(p / "environ") for p in vllm)

        # Modes: state dir 0700 (and what is in it), state file 0600.
        assert _mode(state_dir) == 0o700
        assert _mode(state_dir / "sessions") == 0o700
        state_file = state_dir / "sessions" / "lab-ok.json"
        assert _mode(state_file) == 0o600
        ctl = Path(record["control_path"]).parent
        assert _mode(ctl) == 0o700
        # Login side (checked as root): run dir 0700, api_key 0600, owned by
        # the cluster user; nothing in the run dir readable by others.
        run_dir = Path(record["run_dir"])
        assert _mode(run_dir) == 0o700
        assert _mode(run_dir / "api_key") == 0o600
        assert (run_dir / "api_key").read_text().strip() == key
        import pwd

        assert pwd.getpwuid(run_dir.stat().st_uid).pw_name == lab.user
        loose = [p.name for p in run_dir.iterdir() if _mode(p) & 0o077]
        assert loose == [], f"readable by others in {run_dir}: {loose}"

        # The tunnel listens on loopback only.
        listeners = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split("\n")
        local = [line.split()[3] for line in listeners if line.strip()]
        assert local and all(a == f"127.0.0.1:{port}" for a in local), local
        others = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        for address in others:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family) as sock:
                sock.settimeout(2)
                assert sock.connect_ex((address, port)) != 0, f"the tunnel answers on {address}"
        ctrl_c_cleans(child, job_id)
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
        leaked = len(sampler.leaks)
        total = sum(sampler.samples.values())
        report(
            "API key on a command line (ps sampling, both sides)",
            total,
            total - sampler.leaky_samples,
            None,
            leaked_keys=leaked,
            samples_by_state=sampler.samples,
            note="a try = one sample of every argv on the host and in the node namespace",
        )
    assert sampler.leaks == [], "\n".join(sampler.leaks[:10])
    assert sampler.samples.get("running", 0) >= 1, sampler.samples  # sampled while loading
    assert sampler.saw_tool >= sum(sampler.samples.values()) // 2
    assert_nothing_left(lab, tool)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _read_link(path: Path) -> bytes:
    try:
        return os.readlink(path).encode()
    except OSError:
        return b""
