"""No remote command depends on the login shell (issue 22, finding 2).

sshd hands the command line of every channel to the user's login shell
(``$SHELL -c``). Ours is always the fixed ``BOOTSTRAP``; the program and its
arguments follow on stdin (``frame``). Here the bootstrap runs under every
shell a cluster user may have as login shell, with hostile arguments: each
arrives as the literal word, nothing is executed, and the rest of stdin is
the program's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from alvis_fsm.cluster.ssh import BOOTSTRAP, frame

SHELLS = ["sh", "bash", "zsh", "fish", "tcsh"]
HOSTILE = [
    "models--org--x\\'\";id>pwned;#",  # fish reads \' inside '…' as an escape
    "$(touch pwned)",
    "`touch pwned`",
    "a b\tc",
    "",
    "!!",
    "~",
    "*",
    "x\ny",
    "é\r\x1b[0m",
    "-c",
]


def test_the_bootstrap_is_one_plain_line() -> None:
    # What bash, zsh, fish and tcsh would read differently: a backslash
    # (fish, inside single quotes), "!" (csh history), a line break (csh).
    assert "\\" not in BOOTSTRAP and "!" not in BOOTSTRAP and "\n" not in BOOTSTRAP


@pytest.mark.parametrize("shell", SHELLS)
def test_arguments_arrive_as_data_under_every_login_shell(shell: str, tmp_path: Path) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    tmp_path = tmp_path / "cwd"
    tmp_path.mkdir()
    argv = ["bash", "-c", 'printf "[%s]\\n" "$@"; cat', "agent", *HOSTILE]
    proc = subprocess.run(
        [shell, "-c", BOOTSTRAP],
        input=frame(argv) + b"the rest of stdin\n",
        capture_output=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    expected = "".join(f"[{word}]\n" for word in HOSTILE) + "the rest of stdin\n"
    assert proc.stdout.decode() == expected
    assert list(tmp_path.iterdir()) == []  # no "pwned"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_bad_frame_runs_nothing(shell: str, tmp_path: Path) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    tmp_path = tmp_path / "cwd"
    tmp_path.mkdir()
    for stdin in (b"", b"touch pwned\n", b"0\n", b"x;touch pwned\n"):
        proc = subprocess.run(
            [shell, "-c", BOOTSTRAP],
            input=stdin,
            capture_output=True,
            cwd=tmp_path,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 3, (stdin, proc.stderr)
    assert list(tmp_path.iterdir()) == []


def test_frame_refuses_what_no_argument_can_hold() -> None:
    with pytest.raises(ValueError):
        frame([])
    with pytest.raises(ValueError):
        frame(["echo", "a\x00b"])
    assert frame(["echo", ""]) == b"6\necho\x00\x00"
