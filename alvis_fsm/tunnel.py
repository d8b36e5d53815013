"""The tunnel from localhost to vLLM on the compute node, and its checks.

Route "jump" (the requirements'): ``ssh -L 127.0.0.1:LOCAL:NODE:PORT NODE``
with the login node as jump host. The jump goes through the session's shared
connection (``ProxyCommand ssh -S <control> -W %h:%p``), so it costs one login
on the node and none on the login node. The tunnel ssh is itself a control
master with its own socket: whether it was started by this process or by a
``start --detach`` long gone, we can find its pid, check it and stop it.

Route "login": the forward is added to the shared connection itself
(``ssh -O forward``): no new login at all.

The node's host key is unknown the first time (hundreds of nodes):
``StrictHostKeyChecking=accept-new`` records it, and a *changed* key is
still refused with OpenSSH's warning. Never ``StrictHostKeyChecking=no``."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from alvis_fsm.errors import ServerError, SSHError
from alvis_fsm.ssh import Connection, common_args, socket_alive, ssh_error


def local_port_free(port: int, bind: str = "127.0.0.1") -> bool:
    """True when nothing listens on bind:port (portable: no lsof/ss needed).

    Asks what ssh's own bind needs: ssh sets SO_REUSEADDR on its forward's
    listener, so connections of an earlier tunnel lingering in TIME_WAIT
    (for a minute after a Ctrl+C) do not make the port busy; a listener
    does, on Linux and macOS alike."""
    import socket

    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError:
            return False
    return True


def port_busy_hint(port: int) -> str:
    return (
        f"Find what holds it with `lsof -nP -iTCP:{port} -sTCP:LISTEN` and stop it, "
        f"or pick another port with --port (e.g. --port {port + 1})."
    )


@dataclass
class Tunnel:
    conn: Connection
    route: str  # "jump" or "login"
    bind: str
    local_port: int
    node: str
    remote_port: int
    control: Path  # the tunnel ssh's own control socket (route jump)

    @property
    def forward(self) -> str:
        return f"{self.bind}:{self.local_port}:{self.node}:{self.remote_port}"

    def open(self) -> str:
        """Open the tunnel; returns what ssh said (e.g. 'Permanently added …')."""
        if self.route == "login":
            proc = subprocess.run(
                [*common_args(self.conn.opts), "-S", str(self.conn.control), "-O", "forward",
                 "-L", self.forward, self.conn.opts.host],
                capture_output=True, text=True, start_new_session=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise SSHError("Could not open the tunnel", details=proc.stderr.strip() or None)
            return ""
        opts = self.conn.opts
        jump = shlex.join(
            [*common_args(opts), "-S", str(self.conn.control), "-o", "ControlMaster=no",
             "-o", "ProxyCommand=false", "-W", "%h:%p", opts.host]
        )  # fmt: skip
        argv = [
            *common_args(opts),
            "-M", "-S", str(self.control),
            "-f", "-N",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", "BatchMode=yes",
            "-o", f"ProxyCommand={jump}",
            "-L", self.forward,
            self.node,
        ]  # fmt: skip
        self.conn.prompter.command(shlex.join(argv))
        # A socket left by a tunnel ssh that was killed would make the new one
        # "disable multiplexing": it would run on, but alive() and close()
        # (which go through the socket) could no longer see or stop it.
        if not socket_alive(self.control):
            with contextlib.suppress(FileNotFoundError):
                self.control.unlink()
        # -f: ssh returns once authenticated and the forward is listening
        # (ExitOnForwardFailure makes a failed bind an error, not a warning).
        # BatchMode: the tunnel is re-opened unattended; a prompt there
        # would hang, so a node that wants one is an error instead.
        # stderr goes to a file, not a pipe: the backgrounded ssh may keep
        # the descriptor open, and reading a pipe to EOF would then block.
        with tempfile.TemporaryFile(mode="w+") as err:
            tun = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, check=False, timeout=60,
            )  # fmt: skip
            err.seek(0)
            said = err.read().strip()
        if tun.returncode != 0:
            if "Address already in use" in said or "cannot listen" in said:
                raise SSHError(
                    f"Local port {self.local_port} is already in use",
                    hint=port_busy_hint(self.local_port),
                    details=said,
                )
            raise ssh_error(self.node, said, "no tunnel was opened")
        return said

    def up(self) -> bool:
        """Is this tunnel already there (left by a detached or killed client)?"""
        if self.route == "login":
            return socket_alive(self.conn.control) and not local_port_free(
                self.local_port, self.bind
            )
        return socket_alive(self.control)

    def alive(self) -> bool:
        """Cheap check, called twice a second while streaming."""
        return socket_alive(self.conn.control if self.route == "login" else self.control)

    def close(self) -> None:
        if self.route == "login":
            subprocess.run(
                [*common_args(self.conn.opts), "-S", str(self.conn.control), "-O", "cancel",
                 "-L", self.forward, self.conn.opts.host],
                capture_output=True, start_new_session=True, check=False,
            )  # fmt: skip
            return
        subprocess.run(
            [*common_args(self.conn.opts), "-S", str(self.control), "-O", "exit", self.node],
            capture_output=True, start_new_session=True, check=False,
        )  # fmt: skip


def close_tunnel_socket(conn: Connection, control: Path, node: str) -> None:
    """Stop a route-jump tunnel known only by its control socket (stop/resume)."""
    subprocess.run(
        [*common_args(conn.opts), "-S", str(control), "-O", "exit", node or "node"],
        capture_output=True, start_new_session=True, check=False,
    )  # fmt: skip


def get_json(url: str, api_key: str | None, timeout: float = 5) -> object:
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode() or "null")


def verify(local_port: int, api_key: str | None, deadline_s: float) -> list[str]:
    """GET /v1/models through the tunnel until it answers; returns the model ids."""
    url = f"http://127.0.0.1:{local_port}/v1/models"
    end = time.monotonic() + deadline_s
    last = ""
    while True:
        try:
            data = get_json(url, api_key)
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                return [str(m.get("id")) for m in data["data"] if isinstance(m, dict)]
            last = f"unexpected answer: {str(data)[:200]}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code} {exc.reason}"
            if exc.code in (401, 403):
                raise ServerError(
                    "The server refused our API key", details=f"GET {url}: {last}"
                ) from exc
        except (OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() >= end:
            raise ServerError(
                f"The server did not answer through the tunnel within {deadline_s:.0f} s",
                details=f"GET {url}: {last}",
            )
        time.sleep(0.2)


def health(local_port: int, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local_port}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False
