"""The tunnel from localhost to vLLM on the compute node, and its checks.

Route "jump" (the default): ``ssh -L 127.0.0.1:LOCAL:/path/vllm.sock NODE``
with the login node as jump host: vLLM listens on a unix socket in a 0700
directory on the node (see jobscript.sh), so only this user can reach it,
and sshd on the node connects to it as this user. The jump goes through the session's shared
connection (``ProxyCommand ssh -S <control> -W %h:%p``), so it costs one login
on the node and none on the login node. The tunnel ssh is itself a control
master with its own socket: whether it was started by this process or by a
``start --detach`` long gone, we can find its pid, check it and stop it. It
runs a small command on the node (``HOLD``) rather than none (``-N``), so
that the node's sshd sends each answer at once (see ``HOLD``).

Route "login": the forward is added to the shared connection itself
(``ssh -O forward``): no new login at all, but the login node can only reach
a TCP port on the node, which every cluster user can reach too.

The local ends: every session has a unix socket in the private state
directory (``local_socket``: its directory is 0700, and ssh binds it with
``StreamLocalBindMask`` 0177, so only this user can connect); ``start``'s
sessions also have a TCP port on ``bind`` (``local_port``, what the user's
clients are given), the gateway's have none (their clients never see the
tunnel). One ssh holds both forwards, the port first: when the port cannot
be had, there is no socket either (the jump tunnel exits, ExitOnForwardFailure;
route login asks the shared connection for the socket only once it holds
the port). A loopback port
is open to every process on the laptop, and after a drop any of them may
take it; the tool's own checks (``health``, ``verify``) therefore go through
the socket, never the port: a live socket means our ssh is up and holds the
port too, and nothing the server answers has to be trusted for that (a
proof the server signed could be relayed from another listener holding the
key, issue 31).

Every local HTTP check goes through httpx with ``trust_env=False``: a proxy
named in the environment (``http_proxy``, ``ALL_PROXY``, any case) or the
system's is never used, so the API key only ever goes to our tunnel.

The node's host key is unknown the first time (hundreds of nodes):
``StrictHostKeyChecking=accept-new`` records it, and a *changed* key is
still refused with OpenSSH's warning. Never ``StrictHostKeyChecking=no``."""

from __future__ import annotations

import contextlib
import shlex
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from alvis_fsm.cluster.ssh import Connection, common_args, socket_alive, ssh_error
from alvis_fsm.errors import ConnectionLost, LocalPortBusy, ServerError, SSHError

# The tunnel runs this on the node rather than nothing (-N): sshd turns
# Nagle's algorithm off on its connection only once a session runs
# (OpenSSH before 10.1), and without that every answer vLLM writes in two
# parts (headers, then body) waits ~40 ms for a delayed ACK. It ends by
# itself once its parent, the connection's sshd, is gone. Plain sh, started
# with exec from whatever the user's login shell is (bash, zsh, csh, fish).
HOLD = "exec sh -c 'while kill -0 $PPID 2>/dev/null; do sleep 5; done'"

# How long the tunnel ssh may take to log in to the node and listen.
OPEN_TIMEOUT_S = 60


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


@dataclass(frozen=True)
class Address:
    """Where vLLM listens on the node, from the job's handshake file."""

    host: str
    port: int = 0  # TCP (route login)
    socket: str = ""  # unix socket path (route jump)

    def __str__(self) -> str:
        return f"{self.host}:{self.socket or self.port}"


def parse_address(text: str) -> Address:
    """``HOST:PORT`` or ``HOST:/abs/path/vllm.sock`` (rundir.ADDRESS).

    Host names hold no ':', so the first one splits; a socket path may hold
    any character but must be absolute."""
    host, sep, rest = text.strip().partition(":")
    if not sep or not host or any(c.isspace() for c in host):
        raise ServerError(f"The job wrote an unreadable server address: {text.strip()!r}")
    if rest.startswith("/"):
        return Address(host=host, socket=rest)
    if rest.isascii() and rest.isdigit() and 0 < int(rest) < 65536:
        return Address(host=host, port=int(rest))
    raise ServerError(f"The job wrote an unreadable server address: {text.strip()!r}")


@dataclass
class Tunnel:
    conn: Connection
    route: str  # "jump" or "login"
    bind: str
    local_port: int
    node: str
    remote_port: int
    control: Path  # the tunnel ssh's own control socket (route jump)
    remote_socket: str = ""  # vLLM's unix socket on the node (route jump)
    local_socket: str = ""  # the local end as a unix socket, instead of bind:local_port

    @property
    def forwards(self) -> list[str]:
        """The ``-L`` specs: the user's port first (``start``), then the
        private socket (every session but those of an older version).
        OpenSSH forwards a local TCP port or unix socket to a remote TCP
        port or unix socket with the same syntax: LOCAL_ADDR:LOCAL_PORT or
        /local/path, then :/remote/path or :HOST:PORT."""
        remote = self.remote_socket or f"{self.node}:{self.remote_port}"
        ends = [f"{self.bind}:{self.local_port}"] if self.local_port else []
        ends += [self.local_socket] if self.local_socket else []
        return [f"{end}:{remote}" for end in ends]

    def _forward_args(self) -> list[str]:
        return [arg for spec in self.forwards for arg in ("-L", spec)]

    @property
    def local(self) -> str:
        """The local end, for messages."""
        return (
            f"local port {self.local_port}"
            if self.local_port
            else f"local socket {self.local_socket}"
        )

    def _clear_stale_socket(self) -> None:
        """A socket file left by a tunnel that was killed would make ssh's bind
        fail; one that still answers belongs to a live tunnel and is kept."""
        if self.local_socket and not socket_alive(Path(self.local_socket)):
            with contextlib.suppress(FileNotFoundError):
                Path(self.local_socket).unlink()

    def open(self) -> str:
        """Open the tunnel; returns what ssh said (e.g. 'Permanently added …')."""
        if self.route == "login":
            self._open_on_login_node()
            return ""
        argv = self._jump_argv()
        self.conn.prompter.command(shlex.join(argv))
        # A socket left by a tunnel ssh that was killed would make the new one
        # "disable multiplexing": it would run on, but alive() and close()
        # (which go through the socket) could no longer see or stop it.
        if not socket_alive(self.control):
            with contextlib.suppress(FileNotFoundError):
                self.control.unlink()
        self._clear_stale_socket()
        # -f: ssh returns once authenticated and the forward is listening
        # (ExitOnForwardFailure makes a failed bind an error, not a warning).
        # BatchMode: the tunnel is re-opened unattended; a prompt there
        # would hang, so a node that wants one is an error instead.
        # stderr goes to a file, not a pipe: the backgrounded ssh may keep
        # the descriptor open, and reading a pipe to EOF would then block.
        # A time-out, ssh's own (ConnectTimeout) or ours, is ConnectionLost:
        # the node or the way to it did not answer in time, which is also what
        # a laptop that slept through the handshake sees on waking. The
        # caller tries again (TunnelKeeper); a refusal is final.
        with tempfile.TemporaryFile(mode="w+") as err:
            try:
                tun = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                    check=False,
                    timeout=OPEN_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired as exc:
                raise ConnectionLost(
                    f"The tunnel to {self.node} did not open within {OPEN_TIMEOUT_S} s"
                ) from exc
            err.seek(0)
            said = err.read().strip()
        if tun.returncode != 0:
            raise self._not_opened(said)
        return said

    def _open_on_login_node(self) -> None:
        """Route login: a forward on the shared connection to the login node."""
        if self.remote_socket:
            # The login node's sshd would look for the path on the login node.
            raise SSHError(
                "Route login cannot reach a unix socket on the compute node",
                hint="This session's server listens on a unix socket: use route jump.",
            )
        self._clear_stale_socket()
        # One forward at a time, the port first: given both, the master adds
        # every one it can, the private socket too when the port is another
        # process's, and the tool's checks would call that port ours.
        for i, spec in enumerate(self.forwards):
            proc = subprocess.run(
                [
                    *common_args(self.conn.opts),
                    "-S",
                    str(self.conn.control),
                    "-O",
                    "forward",
                    "-L",
                    spec,
                    self.conn.opts.host,
                ],
                capture_output=True,
                text=True,
                start_new_session=True,
                check=False,
            )
            if proc.returncode != 0:
                if i:
                    self.close()
                raise SSHError("Could not open the tunnel", details=proc.stderr.strip() or None)

    def _jump_argv(self) -> list[str]:
        """Route jump: ssh to the node through the shared connection, holding
        the forward, as a master of its own (``control``)."""
        opts = self.conn.opts
        jump = shlex.join(
            [
                *common_args(opts),
                "-S",
                str(self.conn.control),
                "-o",
                "ControlMaster=no",
                "-o",
                "ProxyCommand=false",
                "-W",
                "%h:%p",
                opts.host,
            ]
        )
        return [
            *common_args(opts),
            "-M",
            "-S",
            str(self.control),
            "-f",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ProxyCommand={jump}",
            *(["-o", "StreamLocalBindMask=0177"] if self.local_socket else []),
            *self._forward_args(),
            self.node,
            HOLD,
        ]

    def _not_opened(self, said: str) -> SSHError | LocalPortBusy:
        """Why the tunnel ssh failed, from what it said."""
        busy = "Address already in use" in said or "cannot listen" in said
        if self.local_socket and busy and (not self.local_port or self.local_socket in said):
            return SSHError(f"Could not listen on {self.local_socket}", details=said)
        if busy:
            return LocalPortBusy(
                f"Local port {self.local_port} is already in use",
                hint=port_busy_hint(self.local_port),
                details=said,
            )
        return ssh_error(self.node, said, "no tunnel was opened")

    def up(self) -> bool:
        """Is this tunnel already there (left by a detached or killed client)?"""
        if self.route == "login":
            if self.local_socket:  # held with the port, if any, by one ssh
                return socket_alive(self.conn.control) and socket_alive(Path(self.local_socket))
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
                [
                    *common_args(self.conn.opts),
                    "-S",
                    str(self.conn.control),
                    "-O",
                    "cancel",
                    *self._forward_args(),
                    self.conn.opts.host,
                ],
                capture_output=True,
                start_new_session=True,
                check=False,
            )
        else:
            subprocess.run(
                [*common_args(self.conn.opts), "-S", str(self.control), "-O", "exit", self.node],
                capture_output=True,
                start_new_session=True,
                check=False,
            )
        # ssh leaves its listening socket file behind.
        self._clear_stale_socket()


def close_tunnel_socket(conn: Connection, control: Path, node: str) -> None:
    """Stop a route-jump tunnel known only by its control socket (stop/resume)."""
    subprocess.run(
        [*common_args(conn.opts), "-S", str(control), "-O", "exit", node or "node"],
        capture_output=True,
        start_new_session=True,
        check=False,
    )


def http_client(api_key: str | None, timeout: float, local_socket: str = "") -> httpx.Client:
    """A client for our own tunnel only: ``trust_env=False`` ignores proxy
    variables (any case), netrc and SSL variables, so the key is sent to
    127.0.0.1 (or the tunnel's local socket) and nowhere else."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Plain HTTP to our own end only, so no CA bundle is loaded (httpx's
    # default costs ~40 ms per client, on start's critical path): an empty
    # context that would refuse any TLS server, were one ever asked.
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    transport = httpx.HTTPTransport(uds=local_socket or None, verify=tls)
    return httpx.Client(
        trust_env=False,
        timeout=timeout,
        headers=headers,
        follow_redirects=False,
        transport=transport,
        verify=tls,
    )


def local_base(local_port: int, local_socket: str = "") -> str:
    """The base URL of the tunnel's local end (with a socket, the host is
    only a name: the transport connects to the socket)."""
    return "http://localhost" if local_socket else f"http://127.0.0.1:{local_port}"


@dataclass(frozen=True)
class Verified:
    """What the connection test saw: the served models, and how long a
    1-token completion took (the first token, end to end, through the tunnel)."""

    models: list[str]
    first_token_s: float


def _refused_key(exc: httpx.HTTPStatusError, what: str) -> ServerError:
    return ServerError(
        "The server refused our API key",
        details=f"{what}: HTTP {exc.response.status_code} {exc.response.text[:200]}",
    )


class TunnelDied(SSHError):
    """The tunnel's ssh ended while its server was being checked through it:
    a drop like any other, known at once rather than at the deadline."""


def verify(
    local_port: int,
    api_key: str | None,
    deadline_s: float,
    served_name: str = "",
    local_socket: str = "",
    alive: Callable[[], bool] | None = None,
) -> Verified:
    """Through the tunnel, with the key: ``/v1/models`` lists the served model
    and a 1-token completion succeeds. ``/v1/models`` alone is not enough: the
    API server answers it even when its engine is dead.

    Connection errors are retried until the deadline (the forward is up
    before vLLM listens); an HTTP error from the completion is final. With
    ``alive`` (the tunnel's own check), a connection error while the tunnel
    is gone raises ``TunnelDied`` at once: a drop during recovery is a drop."""
    base = local_base(local_port, local_socket)
    end = time.monotonic() + deadline_s
    with http_client(api_key, timeout=5, local_socket=local_socket) as client:
        check = _Check(client, base, end, deadline_s, alive)
        models = check.models(served_name)
        return check.first_token(models, served_name or (models[0] if models else ""))


@dataclass
class _Check:
    """One connection test through the tunnel (``verify``), step by step."""

    client: httpx.Client
    base: str
    end: float  # time.monotonic() deadline
    deadline_s: float
    alive: Callable[[], bool] | None
    last: str = ""  # the last failure, for the message at the deadline

    def _failed(self, exc: Exception, what: str) -> None:
        """A connection error, retried; but if the tunnel is gone, a drop."""
        self.last = str(exc) or type(exc).__name__
        if self.alive is not None and not self.alive():
            raise TunnelDied(
                "The tunnel closed while the server was being checked",
                details=f"{what}: {self.last}",
            )

    def models(self, served_name: str) -> list[str]:
        """``/v1/models``, until it lists ``served_name`` (any model if "")."""
        url = f"{self.base}/v1/models"
        while True:
            try:
                response = self.client.get(url)
                response.raise_for_status()
                data = response.json()
                if isinstance(data, dict) and isinstance(data.get("data"), list):
                    models = [str(m.get("id")) for m in data["data"] if isinstance(m, dict)]
                    if not served_name or served_name in models:
                        return models
                    raise ServerError(
                        f"The server does not serve {served_name}",
                        details=f"GET {url} lists: {', '.join(models) or 'nothing'}",
                    )
                self.last = f"unexpected answer: {str(data)[:200]}"
            except httpx.HTTPStatusError as exc:
                self.last = f"HTTP {exc.response.status_code} {exc.response.reason_phrase}"
                if exc.response.status_code in (401, 403):
                    raise _refused_key(exc, f"GET {url}") from exc
            except (httpx.HTTPError, ValueError) as exc:
                self._failed(exc, f"GET {url}")
            if time.monotonic() >= self.end:
                raise ServerError(
                    f"The server did not answer through the tunnel within {self.deadline_s:.0f} s",
                    details=f"GET {url}: {self.last}",
                )
            time.sleep(0.2)

    def first_token(self, models: list[str], model: str) -> Verified:
        """A 1-token completion of ``model``: the engine behind the API works."""
        body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
        url = f"{self.base}/v1/completions"
        while True:
            # The first request after start-up may be slow (warm-up): give it
            # what is left of the deadline, and never less than 10 s.
            budget = max(10.0, self.end - time.monotonic())
            started = time.monotonic()
            try:
                response = self.client.post(url, json=body, timeout=budget)
                elapsed = time.monotonic() - started
                response.raise_for_status()
                data = response.json()
                choices = data.get("choices") if isinstance(data, dict) else None
                if isinstance(choices, list) and choices:
                    return Verified(models=models, first_token_s=elapsed)
                raise ServerError(
                    "The server answered a 1-token completion without any choice",
                    details=f"POST {url}: {str(data)[:300]}",
                )
            except httpx.HTTPStatusError as exc:
                raise _cannot_generate(exc, model, url) from exc
            except (httpx.HTTPError, ValueError) as exc:
                self._failed(exc, f"POST {url}")
            if time.monotonic() >= self.end:
                raise ServerError(
                    f"vLLM lists {model} but a 1-token completion did not succeed "
                    f"within {self.deadline_s:.0f} s",
                    details=f"POST {url}: {self.last}",
                )
            time.sleep(0.2)


def _cannot_generate(exc: httpx.HTTPStatusError, model: str, url: str) -> ServerError:
    if exc.response.status_code in (401, 403):
        return _refused_key(exc, f"POST {url}")
    return ServerError(
        f"vLLM lists {model} but cannot generate: a 1-token completion failed "
        f"with HTTP {exc.response.status_code}",
        hint="The inference engine is probably dead; the log above may say why.",
        details=f"POST {url}: {exc.response.text[:300]}",
    )


def health(
    local_port: int, *, api_key: str | None, timeout: float = 3, local_socket: str = ""
) -> bool:
    """True when our own server answers ``/health`` through the tunnel.

    Through the private socket (``local_socket``) when the session has one:
    only this user can listen there, and our ssh holds it together with the
    session's port, so a live socket is our tunnel and the key may go at
    once (one request). The key never goes to the public port: a local
    process may hold it after a drop, and whatever it answers, even a proof
    relayed from another listener holding the key, proves nothing (issue
    31). A session without a socket (started by an older version) and with
    a key is not known to be ours: False. Without a key there is nothing to
    give away, and the port is asked."""
    if api_key and not local_socket:
        return False
    base = local_base(local_port, local_socket)
    try:
        with http_client(api_key, timeout, local_socket) as client:
            return client.get(f"{base}/health").status_code == 200
    except httpx.HTTPError:
        return False
