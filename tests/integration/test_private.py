"""Private by construction (issue 12), on the lab cluster.

* Route jump: every listener of the session's vLLM process (TCP ports and
  unix sockets, read from /proc) is tried by a second cluster user
  (``kovacs``, logged in to the compute node over ssh with its own key) with
  ``/invocations``, ``/tokenize`` and ``/v1/completions``: nothing answers
  200. The same probe run as the owner on the node does get answers (so the
  listeners were found and the probe works), and the owner's tunnel answers
  with the key.
* Route login still works and warns that its TCP port is open to the
  cluster; the second user's probe shows the warning is true. A local
  process that takes the laptop's port after a drop and relays it to that
  TCP port is not taken for the server and never receives the key (issue 31).
* A server whose engine is dead while ``/v1/models`` answers is refused with
  a clear error and cleaned up.
* Proxies in the environment are never used for the checks.
* The vLLM stand-in itself follows vLLM 0.11 (no lab needed for those).

When ``ALVIS_RELIABILITY_RESULTS`` names a file, the isolation test appends
its result to it for ``tools/reliability.py``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest
from tool import Tool, assert_nothing_left, ctrl_c_leaves_nothing, exit_status, free_port, interrupt

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
RESULTS_ENV = "ALVIS_RELIABILITY_RESULTS"
REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "lab" / "bin" / "vllm"
PATHS = ("/invocations", "/tokenize", "/v1/completions")
LOGIN_WARNING = "[WARN] Route login: vLLM listens on a TCP port of the compute node"

# Run on the compute node (python3 on stdin): try every listener with every
# path, print one JSON line per try: [kind, where, path, HTTP status or error].
# With a key, it is sent; the Host header is the one given.
PROBE = r"""
import json, socket, sys
targets, paths, model, key, host_header = json.loads(sys.argv[1])
auth = b"Authorization: Bearer " + key.encode() + b"\r\n" if key else b""
for kind, where in targets:
    for path in paths:
        body = {"model": model, "prompt": "hi", "max_tokens": 1}
        data = json.dumps(body).encode()
        try:
            if kind == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(where)
            else:
                host, port = where.rsplit(":", 1)
                s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST " + path.encode() + b" HTTP/1.0\r\nHost: " + host_header.encode() + b"\r\n"
                      + auth + b"Content-Type: application/json\r\nContent-Length: "
                      + str(len(data)).encode() + b"\r\n\r\n" + data)
            answer = b""
            while chunk := s.recv(65536):  # HTTP/1.0: the server closes when done
                answer += chunk
            s.close()
            head = answer[:64].decode("latin-1")
            parts = head.split()
            result = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "no HTTP answer"
        except OSError as exc:
            result = type(exc).__name__ + ": " + str(exc.strerror or exc)
        print(json.dumps([kind, where, path, result]), flush=True)
"""


def report(fault: str, tries: int, survived: int, **extra: Any) -> None:
    """Append the isolation result to $ALVIS_RELIABILITY_RESULTS (if set)."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    row = {"fault": fault, "tries": tries, "survived": survived, "worst_recovery_s": None, **extra}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


# -- the session's vLLM process and its listeners ---------------------------------


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def vllm_pids(owner: str, served: str) -> list[int]:
    """The owner's `vllm serve` processes serving ``served``, and their children.
    The node is a mount+uts namespace: its pids are the host's."""
    uid = _uid(owner)
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != uid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and served.encode() in argv and any(b"vllm" in a for a in argv[:2]):
            found.append(int(proc.name))
    children = []
    for pid in found:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                text = (task / "children").read_text().split()
                children += [int(c) for c in text]
    return sorted(set(found + children))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def listeners(pids: list[int], node: str) -> list[tuple[str, str]]:
    """Every listening TCP socket and unix socket held by ``pids``:
    [("tcp", "HOST:PORT"), ("unix", "/path")], from /proc/net (the node
    shares the host's network namespace)."""
    inodes: set[str] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    found: list[tuple[str, str]] = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                port = int(cols[1].rsplit(":", 1)[1], 16)
                found.append(("tcp", f"{node}:{port}"))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        cols = line.split()
        # Flags 00010000: __SO_ACCEPTCON, i.e. listen() was called.
        if len(cols) >= 8 and cols[6] in inodes and int(cols[3], 16) & 0x10000:
            found.append(("unix", cols[7]))
    return found


def probe_as(
    lab: Any,
    user: str,
    targets: list[tuple[str, str]],
    model: str,
    key: str = "",
    host: str = "localhost",
) -> list[list[Any]]:
    """Run PROBE on the compute node as ``user`` (kovacs over ssh with its own
    key; the owner inside the node's namespace)."""
    arg = json.dumps([targets, list(PATHS), model, key, host])
    if user == lab.user:
        proc = lab.node_exec(f"python3 -c {shlex.quote(PROBE)} {shlex.quote(arg)}", timeout=60)
    else:
        argv = [
            "ssh",
            "-F",
            lab.values["LAB_USER2_SSH_CONFIG"],
            "-o",
            "BatchMode=yes",
            lab.node,
            "--",
            f"python3 - {shlex.quote(arg)}",
        ]
        proc = lab.run(argv, input=PROBE, timeout=60)
        assert proc.stdout, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def session(tool: Tool, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tool.state_dir / "sessions" / f"{name}.json").read_text())
    return data


def through_tunnel(port: int, key: str | None, path: str, body: dict[str, Any]) -> int:
    with httpx.Client(trust_env=False, timeout=10) as client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return client.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers).status_code


def assert_guarded(port: int, key: str, served: str) -> None:
    """Issue 22, finding 1, on the laptop's port: every path wants the key
    (vLLM's own check covers only /v1), a Host that is not loopback (DNS
    rebinding) and a page of another origin are refused, a cross-origin
    preflight gets no CORS grant; with the key, each path answers."""
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    ask = {"model": served, "prompt": "hi", "max_tokens": 1}
    tries = [
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("POST", "/invocations", ask),
        ("POST", "/tokenize", {"model": served, "prompt": "hi"}),
        ("GET", "/v1/models", None),
    ]
    with httpx.Client(trust_env=False, timeout=10) as client:
        for method, path, body in tries:
            bare = client.request(method, base + path, json=body)
            assert bare.status_code == 401, (path, bare.status_code, bare.text)
            assert bare.json()["error"]["code"] == "invalid_api_key"
            assert served not in bare.text
            for extra in (
                {"Host": "rebind.attacker.test:58000"},
                {"Origin": "http://evil.example"},
            ):
                refused = client.request(method, base + path, json=body, headers={**auth, **extra})
                assert refused.status_code == 403, (path, extra, refused.status_code)
                assert not [h for h in refused.headers if h.startswith("access-control")]
            ok = client.request(method, base + path, json=body, headers=auth)
            assert ok.status_code == 200, (path, ok.status_code, ok.text)
        for headers in ({}, auth):
            preflight = client.options(
                base + "/invocations",
                headers={
                    **headers,
                    "Origin": "http://evil.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert preflight.status_code in (401, 403), preflight.status_code
            assert not [h for h in preflight.headers if h.startswith("access-control")]


# -- route jump: nobody but the owner ----------------------------------------------------


def test_second_user_reaches_no_listener(lab: Any, tool: Tool) -> None:
    user2 = lab.values["LAB_USER2"]
    port = free_port()
    child = tool.spawn("start", "-m", "lab-ok", "--port", str(port), timeout=90)
    child.expect(r"\[INFO\] Server address: alvis7-07:(/\S+/vllm\.sock)")
    socket_path = child.match.group(1)
    child.expect_exact(CONNECTED + str(port))
    child.expect(r"First token: +\d+(\.\d+)? m?s \(a 1-token completion")
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact("[INFO] Streaming logs")
    record = session(tool, "lab-ok")
    assert record["remote_socket"] == socket_path and record["port"] == 0
    served = record["served_name"]

    pids = vllm_pids(lab.user, served)
    assert pids, "the session's vLLM process was not found"
    found = listeners(pids, lab.node)
    # No TCP port at all: the only listener is the socket the job named.
    assert found == [("unix", socket_path)], found
    sock_dir = str(Path(socket_path).parent)
    mode = lab.node_exec(f"stat -c '%U %a' {shlex.quote(sock_dir)}").stdout.split()
    assert mode == [lab.user, "700"]

    theirs = probe_as(lab, user2, found, served)
    answered = [r for r in theirs if r[3] == 200]
    # Reported before the asserts, so a failure is measured too.
    report(
        "isolation: a second cluster user tries every listener of vLLM (route jump)",
        len(theirs),
        len(theirs) - len(answered),
        note=(
            f"{len(found)} listener(s) of the session's vLLM ({', '.join(k for k, _ in found)}), "
            f"each tried by `{user2}` on the compute node with {', '.join(PATHS)}: "
            f"{len(answered)} answered 200"
        ),
    )
    assert len(theirs) == len(found) * len(PATHS)
    assert answered == [], f"{user2} got answers: {answered}"
    assert all(isinstance(r[3], str) and "PermissionError" in r[3] for r in theirs), theirs

    # Control: the same probe as the owner on the node does reach vLLM, and
    # the guard asks for the key on every path (vLLM itself only under /v1)
    # and refuses a Host that is not loopback (issue 22, finding 1).
    mine = {r[2]: r[3] for r in probe_as(lab, lab.user, found, served, key)}
    assert mine == {"/invocations": 200, "/tokenize": 200, "/v1/completions": 200}, mine
    mine = {r[2]: r[3] for r in probe_as(lab, lab.user, found, served)}
    assert mine == {"/invocations": 401, "/tokenize": 401, "/v1/completions": 401}, mine
    mine = {r[2]: r[3] for r in probe_as(lab, lab.user, found, served, key, host="node")}
    assert mine == {"/invocations": 403, "/tokenize": 403, "/v1/completions": 403}, mine
    assert_guarded(port, key, served)

    # The owner's tunnel answers with the key, and refuses without it.
    body = {"model": served, "prompt": "hi", "max_tokens": 1}
    assert through_tunnel(port, key, "/v1/completions", body) == 200
    assert through_tunnel(port, None, "/v1/completions", body) == 401

    ctrl_c_leaves_nothing(child, lab, tool)


# -- route login: works, and says what it exposes ------------------------------------------


def test_route_login_works_and_warns(lab: Any, tool: Tool) -> None:
    port = free_port()
    child = tool.spawn("start", "-m", "lab-ok", "--route", "login", "--port", str(port), timeout=90)
    child.expect_exact(LOGIN_WARNING)
    child.expect(r"\[INFO\] Server address: alvis7-07:(\d+)\s")
    node_port = int(child.match.group(1))
    child.expect_exact(CONNECTED + str(port))
    child.expect(r"export OPENAI_API_KEY=(\S+)")
    key = child.match.group(1)
    child.expect_exact("[INFO] Streaming logs")
    out = child.logfile_read.text
    assert out.count(LOGIN_WARNING) == 1
    # One line, before anything is submitted.
    assert out.index(LOGIN_WARNING) < out.index("Job submitted")
    assert "/invocations" in out.split(LOGIN_WARNING, 1)[1].splitlines()[0]

    served = session(tool, "lab-ok")["served_name"]
    body = {"model": served, "prompt": "hi", "max_tokens": 1}
    assert through_tunnel(port, key, "/v1/completions", body) == 200
    assert through_tunnel(port, None, "/v1/completions", body) == 401
    # The warning is true: another user on the cluster can connect, and
    # only the key keeps them out, on every path (issue 22, finding 1).
    user2, target = lab.values["LAB_USER2"], [("tcp", f"{lab.node}:{node_port}")]
    theirs = {r[2]: r[3] for r in probe_as(lab, user2, target, served)}
    assert theirs == {"/invocations": 401, "/tokenize": 401, "/v1/completions": 401}, theirs
    theirs = {
        r[2]: r[3] for r in probe_as(lab, user2, target, served, host=f"{lab.node}:{node_port}")
    }
    assert theirs == {"/invocations": 403, "/tokenize": 403, "/v1/completions": 403}, theirs
    assert_guarded(port, key, served)

    ctrl_c_leaves_nothing(child, lab, tool)


class _Relay:
    """A local process that takes the laptop's port once the tunnel is gone
    and relays every connection, byte for byte, to the node's TCP listener of
    route login (which every cluster user can reach; the lab's node shares
    the host's network, so 127.0.0.1 reaches it), keeping what it was sent."""

    def __init__(self, port: int, target: int) -> None:
        self.target, self.seen, self.listener = target, bytearray(), socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        end = time.monotonic() + 10
        while True:  # the dead ssh's listener may take a moment to go
            try:
                self.listener.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.01)
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)
                threading.Thread(
                    target=self._pump, args=(conn, upstream, True), daemon=True
                ).start()
                threading.Thread(
                    target=self._pump, args=(upstream, conn, False), daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, keep: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if keep:
                    self.seen += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(
            OSError
        ):  # wakes the accept (a bare close would not free the port)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def test_a_relayed_port_never_receives_the_key(lab: Any, tool: Tool) -> None:
    """Issue 31, item 7: route login; the shared connection dies (and with it
    the laptop's forward), a local process takes the port at once and relays
    it to the node's TCP listener, which holds the key. The tool's health
    check (as `status`, the Python API and the gateway call it, from the
    record) must not call that ours, and the key must never reach the
    impostor, before or after the engine tries to reopen the tunnel. Once
    the impostor lets go, the tunnel comes back and answers as before."""
    from alvis_fsm.cluster.tunnel import health

    port = free_port()
    child = tool.spawn("start", "-m", "lab-ok", "--route", "login", "--port", str(port), timeout=90)
    child.expect(r"\[INFO\] Server address: alvis7-07:(\d+)\s")
    node_port = int(child.match.group(1))
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("[INFO] Streaming logs")
    record = session(tool, "lab-ok")
    key = record["api_key"]

    def ours() -> bool:
        return health(
            record["local_port"], api_key=key, local_socket=record.get("local_socket", "")
        )

    assert ours() is True
    check = subprocess.run(
        [
            "ssh",
            "-F",
            str(lab.ssh_config),
            "-S",
            record["control_path"],
            "-O",
            "check",
            record["login_host"],
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    master = int(re.search(r"pid=(\d+)", check.stderr).group(1))  # type: ignore[union-attr]
    os.kill(master, signal.SIGKILL)
    relay = _Relay(port, node_port)
    try:
        end = time.monotonic() + 20  # the engine notices, logs in again, fails to forward the port
        while time.monotonic() < end:
            assert ours() is False, "health() called the impostor's relayed port ours"
            assert key.encode() not in relay.seen, "the impostor received the key"
            time.sleep(0.5)
    finally:
        relay.close()
    assert b"Authorization" not in relay.seen
    # The port was not to be had: the client reopens once it is free again,
    # or (it gave up meanwhile, keeping the job) `resume` does.
    back = child.expect_exact(
        ["Tunnel back up: http://localhost:" + str(port), "`alvis-fsm resume lab-ok` reconnects"],
        timeout=120,
    )
    if back == 1:
        child.expect(pexpect.EOF)
        child.close()
        child = tool.spawn("resume", "lab-ok", timeout=90)
        child.expect_exact(CONNECTED + str(port))
        child.expect_exact("[INFO] Streaming logs")
    assert ours() is True
    served = record["served_name"]
    assert (
        through_tunnel(
            port, key, "/v1/completions", {"model": served, "prompt": "hi", "max_tokens": 1}
        )
        == 200
    )

    ctrl_c_leaves_nothing(child, lab, tool)


# -- verified serving ------------------------------------------------------------------------


def test_dead_engine_is_refused_and_cleaned_up(lab: Any, tool: Tool) -> None:
    status, out = tool.run("start", "-m", "lab-dead", "--port", str(free_port()), timeout=120)
    assert status == 6, out
    assert (
        "[ERROR] vLLM lists alvislab/tiny-dead but cannot generate: "
        "a 1-token completion failed with HTTP 500"
    ) in out
    assert "EngineCore encountered an issue" in out  # vLLM's own answer, verbatim
    assert "Connection successful" not in out
    job_id = re.search(r"Job submitted: (\d+)", out)
    assert job_id, out
    assert f"Cleaned up job {job_id.group(1)} successfully" in out
    assert job_id.group(1) not in lab.jobs()
    assert session(tool, "lab-dead")["state"] == "cleaned"
    assert_nothing_left(lab, tool)


class Recorder:
    """A TCP listener that only records who connected (a stand-in proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.seen.append(conn.recv(4096) or b"(connected)")
                except OSError:
                    self.seen.append(b"(connected)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def test_proxies_in_the_environment_are_never_used(lab: Any, tool: Tool) -> None:
    recorder = Recorder()
    try:
        proxy = f"http://127.0.0.1:{recorder.port}"
        for name in ("no_proxy", "NO_PROXY"):
            tool.env.pop(name, None)
        names = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
        port = free_port()
        child = tool.spawn(
            "start", "-m", "lab-ok", "--port", str(port), timeout=90, **dict.fromkeys(names, proxy)
        )
        child.expect_exact(CONNECTED + str(port))
        child.expect_exact("[INFO] Streaming logs")
        # Control: the recorder does see a client sent through it as a proxy.
        with httpx.Client(proxy=proxy, timeout=3) as client, contextlib.suppress(httpx.HTTPError):
            client.get(f"http://127.0.0.1:{port}/v1/models")
        deadline = time.monotonic() + 3
        while not recorder.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(recorder.seen) == 1, recorder.seen
        interrupt(child)
        child.expect_exact("Cleaned up job")
        child.expect(pexpect.EOF)
        child.close()
        assert exit_status(child) == 0
    finally:
        recorder.close()
    # Only the control's request ever reached the "proxy": nothing of the tool's.
    assert len(recorder.seen) == 1 and b"Bearer" not in recorder.seen[0], recorder.seen
    assert_nothing_left(lab, tool)


# -- the stand-in follows vLLM 0.11 (no lab needed) --------------------------------------------


def _model(tmp_path: Path, mode: str) -> Path:
    model = tmp_path / "models--alvislab--tiny" / "snapshots" / "1"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"max_position_embeddings": 4096}')
    (model / "alvis-lab.json").write_text(json.dumps({"mode": mode, "load_seconds": 1.5}))
    return model


def _spawn(
    model: Path, *listen: str, key: str = "sekret", pythonpath: str = ""
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "PYTHONPATH")}
    env["VLLM_API_KEY"] = key
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.Popen(
        [sys.executable, str(STANDIN), "serve", str(model), *listen, "--served-model-name", "m"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=10)


def _wait_accepting(connect: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect()
            return
        except OSError:
            assert time.monotonic() < deadline, "the stand-in never accepted a connection"
            time.sleep(0.05)


def test_standin_unix_socket_bound_early_listening_late(tmp_path: Path) -> None:
    sock = tmp_path / "vllm.sock"
    proc = _spawn(_model(tmp_path, "ok"), "--uds", str(sock))
    try:
        deadline = time.monotonic() + 5
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        # Bound (the file exists) but not listening while the model loads.
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
            s.connect(str(sock))

        def connect() -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))

        _wait_accepting(connect)
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://node", trust_env=False) as c:
            unauthorized = c.get("/v1/models")
            assert unauthorized.status_code == 401
            assert unauthorized.json() == {"error": "Unauthorized"}
            ok = c.get("/v1/models", headers={"Authorization": "Bearer sekret"})
            assert ok.json()["data"][0]["id"] == "m"
            # Not guarded, as in vLLM: these answer without the key.
            inv = c.post("/invocations", json={"prompt": "hi", "max_tokens": 1})
            assert inv.status_code == 200 and inv.json()["choices"][0]["text"]
            chat = c.post("/invocations", json={"messages": [{"role": "user", "content": "x"}]})
            assert chat.json()["choices"][0]["message"]["content"]
            assert c.post("/tokenize", json={"prompt": "a b c"}).json()["count"] == 3
            assert "vllm:" in c.get("/metrics").text
            assert c.get("/health").status_code == 200
            one = c.post(
                "/v1/completions",
                json={"model": "m", "prompt": "hi", "max_tokens": 1},
                headers={"Authorization": "Bearer sekret"},
            )
            assert one.json()["usage"]["completion_tokens"] == 1
    finally:
        out, err = _stop(proc)
    assert "\x1b[1;36m(APIServer pid=" in out
    assert f"Starting vLLM API server 0 on unix:{sock}" in out
    assert not [line for line in out.splitlines() if "Started server process" in line]
    for line in (
        "Started server process",
        "Waiting for application startup.",
        "Application startup complete.",
    ):
        assert line in err
    assert "Uvicorn running on" not in out + err
    # As the real vLLM 0.11 writes them (test_realvllm_contract.py): uvicorn's
    # lines on stderr carry the API server's prefix too.
    assert all("(APIServer pid=" in line for line in err.splitlines() if "INFO:     " in line), err


def test_standin_tcp_host_and_port(tmp_path: Path) -> None:
    port = free_port()
    proc = _spawn(_model(tmp_path, "ok"), "--host", "127.0.0.1", "--port", str(port))
    try:
        time.sleep(0.5)
        assert proc.poll() is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        _wait_accepting(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as c:
            assert c.post("/invocations", json={"prompt": "hi"}).status_code == 200
            assert c.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
    finally:
        out, _ = _stop(proc)
    assert f"Starting vLLM API server 0 on http://127.0.0.1:{port}" in out


def test_standin_grants_cors_as_vllm_and_honours_the_guard_middleware(tmp_path: Path) -> None:
    """As vLLM 0.11: any origin's preflight is granted and /metrics answers
    without the key; with the job script's ``--middleware`` the stand-in
    applies the shipped guard module's own check first."""
    from alvis_fsm.cluster.remote import guard

    shipped = tmp_path / "guard"
    shipped.mkdir()
    (shipped / f"{guard.MODULE}.py").write_text(guard.source())
    preflight = {
        "Origin": "http://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    for middleware in ((), ("--middleware", guard.MIDDLEWARE)):
        port = free_port()
        proc = _spawn(
            _model(tmp_path / str(len(middleware)), "ok"),
            "--port",
            str(port),
            *middleware,
            pythonpath=str(shipped),
        )
        try:
            _wait_accepting(
                lambda p=port: socket.create_connection(("127.0.0.1", p), timeout=1).close()
            )
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as c:
                granted = c.options("/invocations", headers=preflight)
                metrics = c.get("/metrics", headers={"Origin": "http://evil.example"})
                keyed = c.post(
                    "/invocations",
                    json={"prompt": "hi"},
                    headers={"Authorization": "Bearer sekret"},
                )
                if not middleware:
                    assert granted.headers["access-control-allow-origin"] == "*"
                    assert metrics.status_code == 200 and "vllm:" in metrics.text
                    assert metrics.headers["access-control-allow-origin"] == "*"
                else:
                    assert granted.status_code == 403
                    assert "access-control-allow-origin" not in granted.headers
                    assert metrics.status_code == 403 and "vllm:" not in metrics.text
                    assert c.get("/health").status_code == 401
                    assert c.get("/health", headers={"Host": "evil.example"}).status_code == 403
                assert keyed.status_code == 200
        finally:
            _stop(proc)


def test_standin_dead_engine_lists_models_but_cannot_generate(tmp_path: Path) -> None:
    sock = tmp_path / "vllm.sock"
    proc = _spawn(_model(tmp_path, "engine_dead"), "--uds", str(sock))
    try:

        def connect() -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))

        _wait_accepting(connect)
        auth = {"Authorization": "Bearer sekret"}
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://node", trust_env=False) as c:
            assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == "m"
            failed = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=auth)
            assert failed.status_code == 500
            assert "EngineCore encountered an issue" in failed.text
            assert c.post("/invocations", json={"prompt": "hi"}).status_code == 500
            assert c.get("/health").status_code == 503
        assert proc.poll() is None  # the API server lives on
    finally:
        _stop(proc)
