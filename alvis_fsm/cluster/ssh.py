"""OpenSSH, driven as the user would drive it.

One shared connection (ControlMaster) to the login node per session, opened
through pexpect so that passphrase, password, 2FA and host-key prompts reach
the user once; every remote command afterwards is a channel on it and costs
no new login. The user's own ssh, ssh config, keys and agent apply.

Nothing here prints: questions go through the ``Prompter`` the CLI passes in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from alvis_fsm.errors import ConnectionLost, SessionError, SSHError
from alvis_fsm.paths import packaged_default
from alvis_fsm.retry import Backoff

if TYPE_CHECKING:
    import pexpect

# ssh's own exit status for "could not connect / connection lost".
SSH_FAILURE = 255

# The one command line every channel of ours gives the login shell (sshd runs
# it with ``$SHELL -c``): fixed, on one line, with no backslash, "!" or
# newline, so bash, zsh, fish and tcsh all read it the same way. It starts
# bash, which reads the real argv from stdin (``frame``: a line with the byte
# count, then each word NUL-terminated) and execs it: what we run, and every path or name
# it is given, is data that no shell re-parses. The rest of stdin is the
# program's own.
BOOTSTRAP = (
    "exec bash -c 'IFS= read -r n && [[ $n =~ ^[1-9][0-9]*$ ]] || exit 3; "
    'mapfile -d "" -t a < <(dd bs="$n" count=1 iflag=fullblock status=none); '
    '[ ${#a[@]} -gt 0 ] || exit 3; exec "${a[@]}"\''
)


def frame(argv: Sequence[str]) -> bytes:
    """argv as BOOTSTRAP reads it from stdin: the byte count of the words,
    then each word NUL-terminated (dd reads exactly that many bytes and
    leaves the rest of stdin to the program). A word cannot hold NUL (no
    argument of a program can)."""
    words = [str(word) for word in argv]
    if not words:
        raise ValueError("an empty command")
    if any("\x00" in word for word in words):
        raise ValueError("a remote command's argument holds a NUL byte")
    body = b"".join(w.encode() + b"\x00" for w in words)
    return f"{len(body)}\n".encode() + body


# macOS limits a unix socket path to 104 bytes; ssh appends a random suffix
# of ~17 bytes while it creates the socket.
_MAX_SOCKET_PATH = 80

_HOSTKEY_PROMPT = re.compile(r"(?i)are you sure you want to continue connecting[^\n]*\?")
_PASSPHRASE_PROMPT = re.compile(r"(?i)enter passphrase for[^\n]*: ?")
_PASSWORD_PROMPT = re.compile(r"(?i)(?:^|\n)[^\n]*password[^\n]*: ?")
_OTP_PROMPT = re.compile(r"(?i)(?:verification code|one[- ]time|otp|token|2fa)[^\n]*: ?")
_CHANGED_KEY = "REMOTE HOST IDENTIFICATION HAS CHANGED"


class Prompter(Protocol):
    def interactive(self) -> bool: ...

    def ask(self, prompt: str, secret: bool = False) -> str: ...

    def command(self, text: str) -> None: ...


@dataclass(frozen=True)
class SSHOptions:
    """What ssh needs from the settings (kept separate so this module does not
    import pydantic)."""

    host: str
    user: str = ""
    config_file: str = ""
    # The rest default to the settings' packaged values (ssh.*).
    connect_timeout: int = field(default_factory=lambda: packaged_default("ssh.connect_timeout"))
    keepalive_interval: int = field(
        default_factory=lambda: packaged_default("ssh.keepalive_interval")
    )
    keepalive_count: int = field(default_factory=lambda: packaged_default("ssh.keepalive_count"))
    reconnect_window: float = field(
        default_factory=lambda: packaged_default("ssh.reconnect_window")
    )
    control_persist: int = field(default_factory=lambda: packaged_default("ssh.control_persist"))


def control_path(state_dir: Path, key: str) -> Path:
    """A short, stable socket path for a session's shared connection."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    candidate = state_dir / "ctl" / digest
    if len(str(candidate)) > _MAX_SOCKET_PATH:
        # A long home directory: fall back to a per-user directory in /tmp.
        candidate = Path(tempfile.gettempdir()) / f"alvis-fsm-{os.getuid()}" / digest
    candidate.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private_dir(candidate.parent)
    return candidate


def _check_private_dir(path: Path) -> None:
    """The directory of our control sockets must be ours and closed to others:
    in a shared /tmp another user could have created it first (and would then
    own every connection we multiplex through it)."""
    st = path.lstat()
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SessionError(
            f"{path} is not a directory owned by you; refusing to put ssh sockets there",
            hint=f"Remove it (or set session.state_dir to a shorter path of your own): rm -r {path}",
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, but too open (an old umask): close it


def common_args(opts: SSHOptions) -> list[str]:
    """Options every ssh of ours carries (the login master, channels, tunnels)."""
    args = ["ssh"]
    if opts.config_file:
        args += ["-F", os.path.expanduser(opts.config_file)]
    args += [
        "-o",
        f"ConnectTimeout={opts.connect_timeout}",
        "-o",
        f"ServerAliveInterval={opts.keepalive_interval}",
        "-o",
        f"ServerAliveCountMax={opts.keepalive_count}",
    ]
    if opts.user:
        args += ["-l", opts.user]
    return args


def socket_alive(path: Path) -> bool:
    """Is an ssh master listening on this control socket?

    Cheaper than ``ssh -O check`` (no process) and, unlike signal 0 to a
    pid, not fooled by a master that died but was not yet reaped."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def pid_of_master(output: str) -> int | None:
    """Parse `ssh -O check`'s "Master running (pid=1234)"."""
    match = re.search(r"pid=(\d+)", output)
    return int(match.group(1)) if match else None


@dataclass
class Connection:
    """The shared connection to the login node."""

    opts: SSHOptions
    control: Path
    prompter: Prompter
    _pid: int | None = field(default=None, repr=False)

    # -- the master ---------------------------------------------------------
    def _mux_args(self) -> list[str]:
        # ProxyCommand=false: if the master is gone, fail at once instead of
        # silently logging in again (which would hide a prompt or count a login).
        return [
            *common_args(self.opts),
            "-S",
            str(self.control),
            "-o",
            "ControlMaster=no",
            "-o",
            "ProxyCommand=false",
        ]

    def alive(self) -> bool:
        proc = subprocess.run(
            [*common_args(self.opts), "-S", str(self.control), "-O", "check", self.opts.host],
            capture_output=True,
            text=True,
            start_new_session=True,
            check=False,
        )
        if proc.returncode == 0:
            self._pid = pid_of_master(proc.stderr + proc.stdout)
            return True
        return False

    @property
    def pid(self) -> int | None:
        return self._pid

    def open(self) -> None:
        """Open the shared connection, or reuse one that is already up."""
        if self.alive():
            return
        child = self._spawn_master()
        try:
            transcript = self._log_in(child)
        finally:
            child.close()
        if child.exitstatus == 0 and self.alive():
            return
        raise ssh_error(self.opts.host, transcript)

    def _spawn_master(self) -> pexpect.spawn:
        """ssh as the master, on a terminal of its own (pexpect) so that its
        prompts reach us; a stale control socket is removed first."""
        import pexpect  # only commands that talk to the cluster pay for it

        # ControlPersist: the master goes to the background and outlives this
        # process (a detached session's supervisor takes it over), but only
        # for ``control_persist`` seconds with no channel on it: one left by a
        # client that died ends by itself, never lingers for good (issue 31).
        with_master = [
            *common_args(self.opts),
            "-S",
            str(self.control),
            "-o",
            "ControlMaster=yes",
            "-o",
            f"ControlPersist={self.opts.control_persist}",
            "-N",
            self.opts.host,
        ]
        self.prompter.command(shlex.join(with_master))
        # A socket left by a master that died uncleanly would make ssh
        # "disable multiplexing" and run without one.
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        # pexpect gives ssh a terminal (so prompts reach us) and makes it a
        # session leader; when it exits, the kernel hangs up the terminal's
        # process group, which can include the master still on its way to
        # the background. With SIGHUP ignored (ssh keeps an inherited
        # SIG_IGN), that race cannot kill the master.
        return pexpect.spawn(
            with_master[0],
            with_master[1:],
            encoding="utf-8",
            codec_errors="replace",
            timeout=5,
            preexec_fn=_ignore_sighup,
        )

    def _log_in(self, child: pexpect.spawn) -> str:
        """Answer ssh's prompts (host key, passphrase, 2FA, password) until it
        goes to the background; returns what it printed since the last answer."""
        import pexpect

        transcript = ""
        deadline = time.monotonic() + self.opts.connect_timeout + 120
        while True:
            if time.monotonic() > deadline:
                raise ConnectionLost(
                    f"Timed out logging in to {self.opts.host}",
                    hint="Check your network/VPN and that `ssh " + self.opts.host + "` works.",
                    details=transcript.strip() or None,
                )
            index = child.expect(
                [
                    _HOSTKEY_PROMPT,
                    _PASSPHRASE_PROMPT,
                    _OTP_PROMPT,
                    _PASSWORD_PROMPT,
                    pexpect.EOF,
                    pexpect.TIMEOUT,
                ]
            )
            transcript += child.before or ""
            if index == 0:
                transcript += child.after
                child.sendline(self._answer_host_key(transcript))
                transcript = ""
            elif index in (1, 2, 3):
                answer = self._ask_secret(str(child.after).strip())
                child.sendline(answer)
            elif index == 4:
                return transcript
            # index 5: keep waiting (slow login, 2FA push)

    def _answer_host_key(self, text: str) -> str:
        if not self.prompter.interactive():
            raise SSHError(
                f"The host key of {self.opts.host} is not known, and there is no terminal to ask you.",
                hint=f"Run `ssh {self.opts.host}` once, check the fingerprint, answer yes; then retry.",
                details=text.strip(),
            )
        answer = self.prompter.ask(text.strip() + " ")
        if answer.strip().lower() not in ("yes", "y") and not re.fullmatch(
            r"SHA256:\S+", answer.strip()
        ):
            raise SSHError(f"Host key of {self.opts.host} not accepted; nothing was done.")
        return "yes" if answer.strip().lower() in ("yes", "y") else answer.strip()

    def _ask_secret(self, prompt: str) -> str:
        if not self.prompter.interactive():
            raise SSHError(
                f"ssh asks for '{prompt}' while logging in to {self.opts.host}, and there is no terminal.",
                hint="Load your key into ssh-agent (ssh-add) or run from a terminal.",
            )
        return self.prompter.ask(prompt + " ", secret=True)

    def close(self) -> None:
        """Close the shared connection (and any forwards on it)."""
        subprocess.run(
            [*common_args(self.opts), "-S", str(self.control), "-O", "exit", self.opts.host],
            capture_output=True,
            start_new_session=True,
            check=False,
        )
        self._pid = None

    # -- channels -----------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 60,
        retry: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a remote command over the shared connection.

        ``argv`` travels on stdin, ahead of ``input`` (see BOOTSTRAP): the
        login shell sees only the fixed BOOTSTRAP. When the connection has been
        lost (ssh's 255) it is reopened and, if ``retry``, the command is run
        again; a command that must not run twice (sbatch) passes retry=False
        and gets SSHError, and its caller decides."""
        remote = shlex.join(argv)
        args = [*self._mux_args(), self.opts.host, "--", BOOTSTRAP]
        stdin = frame(argv) + (input.encode() if input is not None else b"")
        self.prompter.command(_short(remote))
        for attempt in range(3):
            try:
                raw = subprocess.run(
                    args,
                    input=stdin,
                    capture_output=True,
                    timeout=timeout,
                    start_new_session=True,  # Ctrl+C is ours to handle, not ssh's
                    check=False,
                )
                # Decoded by hand: text mode would turn a log line's "\r" into
                # a line break (universal newlines).
                proc = subprocess.CompletedProcess(
                    raw.args,
                    raw.returncode,
                    raw.stdout.decode("utf-8", "replace"),
                    raw.stderr.decode("utf-8", "replace"),
                )
            except subprocess.TimeoutExpired as exc:
                raise ConnectionLost(
                    f"A command on {self.opts.host} did not answer within {timeout:.0f} s",
                    details=_short(remote),
                ) from exc
            if proc.returncode != SSH_FAILURE:
                return proc
            if not retry or attempt == 2:
                break
            self.reopen()
        raise ConnectionLost(
            f"Lost the connection to {self.opts.host}",
            hint="Check your network/VPN; `alvis-fsm resume` picks the session up again.",
            details=proc.stderr.strip() or None,
        )

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a long-running remote command (log streaming) on the shared connection.

        Its stdin is a pipe we keep open after the command's frame (see
        BOOTSTRAP): closing it tells the remote side to stop (see agent.sh)."""
        self.prompter.command(_short(shlex.join(argv)))
        proc = subprocess.Popen(
            [*self._mux_args(), self.opts.host, "--", BOOTSTRAP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(frame(argv))
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # ssh died at once: its exit status and stderr say why
        return proc

    def reopen(self) -> None:
        """Reopen a lost shared connection, retrying with backoff for
        ``reconnect_window`` seconds: the network (or the login node's sshd)
        may be coming back. A refused login or changed host key is final."""
        deadline = time.monotonic() + self.opts.reconnect_window
        backoff = Backoff(first=0.5, most=5)
        while True:
            try:
                self.open()
                return
            except ConnectionLost as exc:
                # Only a transient failure (network, DNS, sshd restarting) is
                # worth waiting out; a refused login or a changed host key is
                # an SSHError and goes straight to the caller.
                backoff.failed()
                if time.monotonic() + backoff.delay > deadline:
                    raise ConnectionLost(
                        f"Could not reach {self.opts.host} for {self.opts.reconnect_window:.0f} s",
                        hint=exc.hint,
                        details=exc.details,
                    ) from exc
                backoff.wait()


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _short(text: str, limit: int = 300) -> str:
    # The agent script is long; show its subcommand, not its text.
    if "alvis-fsm-agent" in text:
        _, _, tail = text.rpartition("alvis-fsm-agent")
        text = "bash -c <agent> alvis-fsm-agent" + tail
    return text if len(text) <= limit else text[:limit] + "…"


def ssh_error(host: str, transcript: str, doing: str = "") -> SSHError:
    """What ssh said when it failed, as an error the user can act on.
    ``doing`` names what did not happen (e.g. "no tunnel was opened")."""
    text = transcript.strip()
    if _CHANGED_KEY in text:
        return SSHError(
            f"The host key of {host} has CHANGED; " + (doing or "refusing to connect") + ".",
            hint="If the cluster announced new host keys (or the node was reinstalled), remove "
            f"the old one with `ssh-keygen -R {host}`; otherwise treat this as an attack.",
            details=text,
        )
    if "Permission denied" in text:
        return SSHError(
            f"{host} refused the login (key or password not accepted).",
            hint=f"Check that `ssh {host}` works from this terminal (ssh-add, ~/.ssh/config)."
            + (" Or forward through the login node instead: --route login." if doing else ""),
            details=text,
        )
    if "Could not resolve hostname" in text or "Name or service not known" in text:
        # Also what a laptop that just changed networks sees: transient.
        return ConnectionLost(
            f"Cannot resolve {host}.",
            hint="Check the ssh alias in ~/.ssh/config (settings: ssh.host) and your network.",
            details=text,
        )
    return ConnectionLost(
        f"Cannot connect to {host}.",
        hint="Check your network/VPN (Alvis is reachable from SUNET or through the Chalmers VPN) "
        f"and that `ssh {host}` works.",
        details=text or None,
    )
