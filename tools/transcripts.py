#!/usr/bin/env python3
"""Re-record docs/getting-started/transcript-clean-run.md, docs/getting-started/transcript-pending.md and
docs/getting-started/transcript-first-run.md on the lab cluster.

    python tools/transcripts.py              # record all three, rewrite their files
    python tools/transcripts.py --only first-run   # record (and rewrite) just that one
    python tools/transcripts.py --no-write   # record, print the markdown instead
    python tools/transcripts.py --raw DIR    # also keep the raw pane captures in DIR

Each transcript is what a user sees in a 160x50 tmux pane (TERM=xterm-256color)
when typing `alvis-fsm start -m lab-ok --port P` at a `$ ` prompt:

  clean run  the job starts at once; after `Connection successful` and a few
             `[VLLM ...]` lines, Ctrl+C; then `echo "exit status: $?"`.
  pending    all lab GPUs are held first (tests/lab/blocker start), so the job
             pends; about 20 s later they are released (blocker stop), the job
             starts, the session connects; Ctrl+C as above.
  first-run  a new user: a HOME of its own with no settings file, so no
             slurm.account; `alvis-fsm start --port P` (the default model).
             The lab user has two SLURM accounts, so the tool asks which one
             (answered 1) and whether to save it (answered with Enter); then
             "Charging ...", the ready block, Ctrl+C as above. Only the lab's
             ssh config is given, as ALVIS_FSM_SSH__CONFIG_FILE.

The live spinner line is transient (erased when the wait ends), so it is never
in the final pane: while the tool waits, the visible pane is captured about
once a second, and each distinct status text is kept once (ignoring the
spinner glyph and the elapsed clock; the frame shown is the first one seen,
with its clock). Those frames are inserted, marked as such, where the spinner
was drawn.

Needs root and the lab cluster (tests/lab/up, run here; it is idempotent).
The lab's lock (run/users.lock) is held for the whole recording, so a test run
or benchmark on the same machine is waited for (up to 20 minutes) instead of
mixing its jobs with ours. The tool runs with a temporary HOME and session
state dir under /tmp, on local ports 58350-58359. Whatever happens, the tmux
server of this script is killed, the GPUs are released, and no job or ssh
process of this script is left behind.

Exit status: 0 when the transcripts were recorded as expected and written;
1 otherwise (the markdown files are then left untouched)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAB_DIR = REPO / "tests" / "lab"
DOCS = REPO / "docs" / "getting-started"
CLEAN_DOC = DOCS / "transcript-clean-run.md"
PENDING_DOC = DOCS / "transcript-pending.md"
FIRST_DOC = DOCS / "transcript-first-run.md"
RUNS = ("clean", "pending", "first-run")
# What the first run is asked, and what the recording answers.
FIRST_ANSWERS = [("Charge which one?", "1"), ("as slurm.account in", "")]

MODEL = "lab-ok"
PORTS = range(58350, 58360)
WIDTH, HEIGHT = 160, 50
LOCK_WAIT = 20 * 60  # s: a CI run may hold the lab
PENDING_FOR = 20.0  # s: how long the job is kept pending
POLL = 1.0  # s: spinner sampling interval

# A spinner frame as rich draws it: "<braille glyph> <text> (m:ss)".
SPINNER_RE = re.compile(r"^([\u2800-\u28ff]) (.*) \((\d+:\d{2}(?::\d{2})?)\)$")
JOB_RE = re.compile(r"^Job submitted: (\d+)$", re.M)
EXIT_RE = re.compile(r"^exit status: (\d+)$", re.M)


def log(msg: str) -> None:
    print(f"[transcripts] {msg}", file=sys.stderr, flush=True)


class RecordingError(Exception):
    pass


# --------------------------------------------------------------------- lab
def lab_up() -> dict[str, str]:
    """Bring the lab up (idempotent) and return lab.env's values."""
    proc = subprocess.run(
        ["bash", str(LAB_DIR / "up")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise RecordingError(f"tests/lab/up failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    client = Path(lines[-1].strip())
    values: dict[str, str] = {}
    for line in (client / "lab.env").read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value.strip().strip("'\"")
    values.setdefault("LAB_ROOT", str(client.parent))
    values.setdefault("LAB_USER", "pradas")
    values.setdefault("ALVIS_FSM_CONFIG", str(client / "alvis-fsm.toml"))
    return values


@contextlib.contextmanager
def lab_lock(root: Path, timeout: float = LOCK_WAIT) -> Iterator[None]:
    """Exclusive flock on the lab's users.lock (what the integration tests hold)."""
    path = root / "run" / "users.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RecordingError(
                        f"the lab lock {path} was not free within {timeout:.0f} s"
                    ) from None
                if not said:
                    log(f"waiting for the lab lock {path} (another run holds it)...")
                    said = True
                time.sleep(2)
        log("holding the lab lock")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def blocker(action: str) -> str:
    proc = subprocess.run(
        ["bash", str(LAB_DIR / "blocker"), action], capture_output=True, text=True, timeout=90
    )
    if proc.returncode != 0:
        raise RecordingError(f"blocker {action} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def user_jobs(user: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-u", user, "-o", "%i"], capture_output=True, text=True, timeout=30
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def ssh_clients(marker: str) -> list[tuple[int, str]]:
    """ssh client processes whose command line names ``marker`` (our state dir)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,comm=,args="], capture_output=True, text=True
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] == "ssh" and marker in parts[2]:
            rows.append((int(parts[0]), parts[2]))
    return rows


def free_ports(count: int) -> list[int]:
    found = []
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RecordingError(f"fewer than {count} free local ports in {PORTS.start}-{PORTS.stop - 1}")


# -------------------------------------------------------------------- tmux
class Pane:
    """One tmux session on a tmux server (socket) of our own."""

    def __init__(self, socket_name: str, name: str, conf: Path, env: dict[str, str]) -> None:
        self.base = ["tmux", "-u", "-L", socket_name, "-f", str(conf)]
        self.name = name
        self.env = env

    def tmux(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, env=self.env, timeout=30
        )
        if check and proc.returncode != 0:
            raise RecordingError(f"tmux {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, cwd: Path, rcfile: Path) -> None:
        shell = shlex.join(["bash", "--noprofile", "--rcfile", str(rcfile), "-i"])
        self.tmux(
            "new-session",
            "-d",
            "-s",
            self.name,
            "-x",
            str(WIDTH),
            "-y",
            str(HEIGHT),
            "-c",
            str(cwd),
            shell,
        )

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", text)
        self.tmux("send-keys", "-t", self.name, "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", self.name, key)

    def screen(self) -> list[str]:
        """The visible pane, wrapped lines joined, trailing blanks removed."""
        return _lines(self.tmux("capture-pane", "-p", "-J", "-t", self.name))

    def history(self) -> list[str]:
        """Everything the pane has shown (scrollback included)."""
        return _lines(self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name))

    def at_prompt(self) -> bool:
        lines = self.screen()
        return bool(lines) and lines[-1] == "$"

    def kill(self) -> None:
        """End the session and this pane's tmux server (its socket is ours alone)."""
        self.tmux("kill-session", "-t", self.name, check=False)
        self.tmux("kill-server", check=False)


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def wait_for(what: str, cond: Callable[[], bool], timeout: float, step: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise RecordingError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


# --------------------------------------------------------------- recording
@dataclass
class Frame:
    glyph: str
    text: str
    clock: str
    episode: str  # what is waited for: the text before " — "
    anchor: str = ""  # the line above the spinner when this episode was last seen

    def render(self) -> str:
        return f"{self.glyph} {self.text} ({self.clock})"


@dataclass
class Recording:
    port: int
    lines: list[str] = field(default_factory=list)  # the final transcript, frames inserted
    frames: list[Frame] = field(default_factory=list)
    exit_status: int | None = None
    job_ids: list[str] = field(default_factory=list)
    pending_seconds: float = 0.0  # from `start` typed to the GPUs' release
    raw: str = ""


def spinner_frames(screen: list[str]) -> list[tuple[Frame, str]]:
    out = []
    for i, line in enumerate(screen):
        m = SPINNER_RE.match(line)
        if m:
            glyph, text, clock = m.groups()
            above = next((s for s in reversed(screen[:i]) if s), "")
            out.append((Frame(glyph, text, clock, text.split(" — ")[0]), above))
    return out


def record(
    pane: Pane,
    port: int,
    cwd: Path,
    rcfile: Path,
    pending: bool,
    command: str = "",
    answers: list[tuple[str, str]] | None = None,
) -> Recording:
    rec = Recording(port=port)
    seen: dict[str, Frame] = {}
    anchors: dict[str, str] = {}
    todo = list(answers or [])
    pane.start(cwd, rcfile)
    wait_for("the shell prompt", pane.at_prompt, 15)
    if pending:
        log(f"blocker start: job {blocker('start')} holds all GPUs")
    typed = time.monotonic()
    command = command or f"alvis-fsm start -m {MODEL} --port {port}"
    pane.type(command)
    log(f"typed: {command}")

    first_pending: float | None = None
    released = not pending
    deadline = typed + (420 if pending else 240)
    while True:
        tick = time.monotonic()
        for frame, above in spinner_frames(pane.screen()):
            key = frame.text
            if key not in seen:
                seen[key] = frame
                log(f"frame: {frame.render()}")
            anchors[frame.episode] = above
            if first_pending is None and frame.text.startswith("Waiting for job"):
                first_pending = tick
        history = pane.history()
        if todo and any(todo[0][0] in line for line in pane.screen()):
            question, reply = todo.pop(0)
            pane.type(reply)
            log(f"answered {reply!r} to {question!r}")
        if any(line.startswith("✓ Connection successful") for line in history):
            break
        # Release the GPUs ~20 s after `start` was typed, once the pending
        # job has been seen (or, failing that, after twice as long).
        waited = tick - typed
        if not released and (
            (waited >= PENDING_FOR and first_pending is not None) or waited >= 2 * PENDING_FOR
        ):
            blocker("stop")
            released = True
            rec.pending_seconds = time.monotonic() - typed
            log(f"blocker stop after {rec.pending_seconds:.0f} s")
        if tick > typed + 3 and pane.at_prompt():
            raise RecordingError("the tool exited before it connected:\n" + "\n".join(history))
        if tick >= deadline:
            raise RecordingError("no `Connection successful` in time:\n" + "\n".join(history))
        time.sleep(max(0.05, POLL - (time.monotonic() - tick)))
    if not released:  # connected although the GPUs were held: reported by check()
        blocker("stop")
    log("connected")

    # A few log lines, and the pane quiet for 3 s (the startup logs are out).
    state = {"text": "", "since": time.monotonic()}

    def logs_settled() -> bool:
        lines = pane.history()
        text = "\n".join(lines)
        if text != state["text"]:
            state["text"], state["since"] = text, time.monotonic()
        vllm = sum(line.startswith("[VLLM") for line in lines)
        return vllm >= 3 and time.monotonic() - float(state["since"]) >= 3

    wait_for("vLLM log lines", logs_settled, 90, step=0.5)
    pane.key("C-c")
    log("sent Ctrl+C")
    wait_for(
        "`Cleaned up job`",
        lambda: any("Cleaned up job" in line for line in pane.history()),
        90,
    )
    wait_for("the prompt after the tool exited", pane.at_prompt, 60)
    pane.type('echo "exit status: $?"')
    wait_for("the exit status", lambda: bool(EXIT_RE.search("\n".join(pane.screen()))), 15)

    history = pane.history()
    rec.raw = "\n".join(history) + "\n"
    text = "\n".join(history)
    rec.job_ids = JOB_RE.findall(text)
    m = EXIT_RE.search(text)
    rec.exit_status = int(m.group(1)) if m else None
    for frame in seen.values():
        frame.anchor = anchors.get(frame.episode, "")
    rec.frames = list(seen.values())
    rec.lines = transcript(history, rec.frames)
    return rec


FRAME_NOTES = {
    "Waiting for job": ("the job pends", "the job starts"),
    "Waiting for vLLM": ("vLLM loads", "the server answers"),
}


def transcript(history: list[str], frames: list[Frame]) -> list[str]:
    """The pane from the typed command to the exit status, spinner frames inserted."""
    start = next(i for i, line in enumerate(history) if line.startswith("$ alvis-fsm "))
    end = next(i for i, line in enumerate(history) if EXIT_RE.match(line))
    lines = history[start : end + 1]
    episodes: dict[str, list[Frame]] = {}
    for frame in frames:
        episodes.setdefault(frame.episode, []).append(frame)
    pos = 0
    for episode, group in episodes.items():
        anchor = group[0].anchor
        at = next((i for i in range(pos, len(lines)) if lines[i] == anchor), None)
        if at is None:
            log(f"no place found for the frames of {episode!r} (line above: {anchor!r})")
            continue
        during, erased = next(
            (v for k, v in FRAME_NOTES.items() if episode.startswith(k)), ("it waits", "it ends")
        )
        block = [
            "",
            "# ── the live status line while " + during + " (one frame per distinct text; it is",
            f"# ── redrawn in place 8 times a second and erased once {erased}) ──",
            *(f.render() for f in group),
            "",
        ]
        lines[at + 1 : at + 1] = block
        pos = at + 1 + len(block)
    return lines


def check(rec: Recording, pending: bool, first_run: bool = False) -> list[str]:
    problems = []
    text = "\n".join(rec.lines)
    if "[INFO] Charging " not in text:
        problems.append("no `Charging` line")
    if first_run and "SLURM accounts:" not in text:
        problems.append("the first run did not ask for the account")
    if "✓ Connection successful" not in text:
        problems.append("no `Connection successful`")
    if not re.search(r"^\[VLLM ", text, re.M):
        problems.append("no [VLLM ...] line")
    if "Cleaned up job" not in text:
        problems.append("no `Cleaned up job`")
    if rec.exit_status != 0:
        problems.append(f"exit status {rec.exit_status}")
    job_frames = [f for f in rec.frames if f.episode.startswith("Waiting for job")]
    if pending and not any(" — " in f.text for f in job_frames):
        problems.append("no spinner frame of a pending job was seen")
    if not pending and any(" — " in f.text for f in job_frames):
        problems.append("the job did not start at once (it pended)")
    return problems


# ---------------------------------------------------------------- markdown
def _fence(lines: list[str]) -> str:
    return "```console\n" + "\n".join(lines) + "\n```\n"


def clean_doc(rec: Recording, config: str) -> str:
    spinner = (
        "The job started at once, so no spinner was drawn."
        if not rec.frames
        else "The job started at once; the frames of the spinner line drawn meanwhile\n"
        "are shown where it stood (it is erased when the wait ends)."
    )
    return (
        "# Transcript: a clean run\n\n"
        "Recorded by [`tools/transcripts.py`](../../tools/transcripts.py) on the\n"
        "[lab cluster](../../tests/lab/README.md) in tmux (160×50,\n"
        f"`TERM=xterm-256color`) with `ALVIS_FSM_CONFIG={config}`.\n"
        f"{spinner} Ctrl+C while the logs stream\n"
        "is the normal end of a session: the job is cancelled, the tunnel closed, "
        f"exit status {rec.exit_status}.\n"
        "The API key is a throwaway key of that lab session, dead since.\n\n" + _fence(rec.lines)
    )


def pending_doc(rec: Recording) -> str:
    text = "\n".join(rec.lines)
    m = re.search(r"No (\S+) GPUs free right now \((\d+) in all\)", text)
    words = {"1": "one", "2": "two", "3": "three", "4": "four", "8": "eight"}
    held = f"All {words.get(m.group(2), m.group(2))} lab GPUs" if m else "All lab GPUs"
    gpu = m.group(1) if m else "A40"
    seconds = max(5, round(rec.pending_seconds / 5) * 5)
    week = ""
    for f in rec.frames:
        est = re.search(r"expected start (\d{4}-\d{2}-\d{2} \d{2}:\d{2})", f.text)
        if est:
            days = (dt.datetime.strptime(est.group(1), "%Y-%m-%d %H:%M") - dt.datetime.now()).days
            if days >= 6:
                week = (
                    "\n(The lab's blocking job runs with the partition's 7-day limit, "
                    "hence the estimate a week away.)"
                )
            break
    return (
        "# Transcript: pending → running → connected\n\n"
        "Recorded by [`tools/transcripts.py`](../../tools/transcripts.py) on the\n"
        "[lab cluster](../../tests/lab/README.md) in tmux (160×50,\n"
        f"`TERM=xterm-256color`). {held} were held by another job\n"
        "(`bash tests/lab/blocker start`) before `alvis-fsm start`; "
        f"about {seconds} s later\n"
        "they were released (`bash tests/lab/blocker stop`), the job started, and the\n"
        f"session connected. Ctrl+C then ended it (exit status {rec.exit_status}).\n"
        "The API key is a throwaway key of that lab session, dead since.\n\n"
        "Before submitting, `start` says whether GPUs of the requested type are free.\n"
        "While the job pends, a spinner line shows the scheduler's reason in words\n"
        f'(`Resources` → "waiting for a free {gpu}") with SLURM\'s own estimate of the\n'
        "start time (in the cluster's time zone), and the elapsed time. The spinner is\n"
        "drawn only on a terminal; piped or with `NO_COLOR` set, only the `[INFO]` lines\n"
        "are printed. The SSH tunnel is opened as soon as the server's address is known,\n"
        "while vLLM is still loading."
        f"{week}\n\n" + _fence(rec.lines)
    )


def first_run_doc(rec: Recording) -> str:
    return (
        "# Transcript: a first run\n\n"
        "Recorded by [`tools/transcripts.py`](../../tools/transcripts.py) on the\n"
        "[lab cluster](../../tests/lab/README.md) in tmux (160×50,\n"
        "`TERM=xterm-256color`), as a new user: an empty HOME, no settings file, so\n"
        "no `slurm.account` (there is no packaged default). The lab's ssh alias is\n"
        "the only thing given (`ALVIS_FSM_SSH__CONFIG_FILE`, not shown).\n\n"
        "Once logged in, `start` asks the cluster which SLURM accounts the user has\n"
        "(`sacctmgr`, one round trip on the shared connection). The lab user has two,\n"
        "so it asks which one to charge (answered `1`) and whether to save it\n"
        "(answered with Enter: yes); with only one it would use it and say so, and\n"
        "without a terminal it would list them and stop. Then it says what it\n"
        "charges, as every `start` does, and goes on as usual: the ready block,\n"
        f"the logs, Ctrl+C (exit status {rec.exit_status}).\n"
        "The API key is a throwaway key of that lab session, dead since.\n\n" + _fence(rec.lines)
    )


# -------------------------------------------------------------------- main
def tool_command(python: str) -> list[str]:
    script = Path(python).parent / "alvis-fsm"
    return [str(script)] if script.exists() else [python, "-m", "alvis_fsm"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the markdown instead")
    parser.add_argument("--raw", type=Path, help="keep the raw pane captures in this dir")
    parser.add_argument(
        "--only",
        choices=RUNS,
        action="append",
        help="record only this run (repeatable); the others' docs are kept",
    )
    args = parser.parse_args()
    runs = args.only or list(RUNS)
    if os.geteuid() != 0:
        log("needs root (the lab cluster)")
        return 1
    for tool in ("tmux", "squeue", "ps"):
        if not shutil.which(tool):
            log(f"{tool} not found")
            return 1

    lab = lab_up()
    user = lab["LAB_USER"]
    root = Path(tempfile.mkdtemp(prefix="afsm-tr-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    bindir = root / "bin"
    bindir.mkdir()
    wrapper = bindir / "alvis-fsm"
    wrapper.write_text("#!/bin/sh\nexec " + shlex.join(tool_command(sys.executable)) + ' "$@"\n')
    wrapper.chmod(0o755)
    conf = root / "tmux.conf"
    conf.write_text(
        'set -g default-terminal "xterm-256color"\nset -g history-limit 20000\nset -g status off\n'
    )
    rcfile = root / "bashrc"  # bash takes no PS1 from the environment
    rcfile.write_text("PS1='$ '\n")
    socket_name = f"afsm-transcripts-{os.getpid()}"
    base_env = {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        "HISTFILE": str(home / ".bash_history"),
        **lab,
    }
    state_dirs: list[Path] = []
    sockets: list[str] = []
    recs: dict[str, Recording] = {}
    all_jobs: set[str] = set()
    problems: list[str] = []
    try:
        with lab_lock(Path(lab["LAB_ROOT"])):
            try:
                ports = free_ports(len(runs))
                for name, port in zip(runs, ports, strict=True):
                    pending = name == "pending"
                    state_dir = root / f"s-{name}"
                    state_dirs.append(state_dir)
                    env = {**base_env, "ALVIS_FSM_SESSION__STATE_DIR": str(state_dir)}
                    command, answers, cwd = "", None, home
                    if name == "first-run":
                        # A new user: a HOME of its own, no settings file at all.
                        cwd = root / "home-first-run"
                        cwd.mkdir()
                        env = {k: v for k, v in env.items() if k != "ALVIS_FSM_CONFIG"}
                        env.update(
                            HOME=str(cwd),
                            HISTFILE=str(cwd / ".bash_history"),
                            ALVIS_FSM_SSH__CONFIG_FILE=f"{lab['LAB_CLIENT']}/ssh_config",
                        )
                        command, answers = f"alvis-fsm start --port {port}", FIRST_ANSWERS
                    # A tmux server per run: a server's environment is the one it
                    # was started with, and each run has a state dir of its own.
                    pane = Pane(f"{socket_name}-{name}", f"afsm-{name}", conf, env)
                    sockets.append(f"{socket_name}-{name}")
                    log(f"recording the {name} run (port {port}, state dir {state_dir})")
                    try:
                        rec = record(pane, port, cwd, rcfile, pending, command, answers)
                    except RecordingError:
                        if args.raw:
                            args.raw.mkdir(parents=True, exist_ok=True)
                            with contextlib.suppress(Exception):
                                (args.raw / f"{name}.failed.txt").write_text(
                                    "\n".join(pane.history()) + "\n"
                                )
                        raise
                    finally:
                        all_jobs.update(_session_jobs(state_dir))
                        _stop_tool(pane)
                        pane.kill()
                        if pending:
                            blocker("stop")
                    all_jobs.update(rec.job_ids)
                    recs[name] = rec
                    problems += [f"{name}: {p}" for p in check(rec, pending, name == "first-run")]
                    if args.raw:
                        args.raw.mkdir(parents=True, exist_ok=True)
                        (args.raw / f"{name}.txt").write_text(rec.raw)
            finally:
                problems += cleanup(sockets, base_env, state_dirs, all_jobs, user)
    except RecordingError as exc:
        log(f"FAILED: {exc}")
        for p in problems:
            log(f"PROBLEM: {p}")
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if problems:
        for p in problems:
            log(f"PROBLEM: {p}")
        log("docs not written")
        return 1

    def clean_run_doc(rec: Recording) -> str:
        return clean_doc(rec, lab["ALVIS_FSM_CONFIG"])

    writers: dict[str, tuple[Path, Callable[[Recording], str]]] = {
        "clean": (CLEAN_DOC, clean_run_doc),
        "pending": (PENDING_DOC, pending_doc),
        "first-run": (FIRST_DOC, first_run_doc),
    }
    docs = {writers[name][0]: writers[name][1](rec) for name, rec in recs.items()}
    for path, text in docs.items():
        if args.no_write:
            print(f"===== {path.relative_to(REPO)}\n{text}")
        else:
            path.write_text(text)
            log(f"wrote {path.relative_to(REPO)}")
    return 0


def _session_jobs(state_dir: Path) -> set[str]:
    ids = set()
    for path in (state_dir / "sessions").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            job = json.loads(path.read_text()).get("job_id")
            if job:
                ids.add(str(job))
    return ids


def _stop_tool(pane: Pane) -> None:
    """If the tool still runs in the pane (a step failed half-way), give it the
    Ctrl+C a user would and time to cancel its job."""
    with contextlib.suppress(Exception):
        if not pane.at_prompt():
            pane.key("C-c")
            wait_for("the tool to exit after Ctrl+C", pane.at_prompt, 60)


def cleanup(
    sockets: list[str], env: dict[str, str], state_dirs: list[Path], jobs: set[str], user: str
) -> list[str]:
    """Kill our tmux server, release the GPUs, make sure none of our jobs and
    ssh processes remain. Returns what had to be cleaned up by force."""
    problems = []
    for name in sockets:
        subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True, env=env)
    with contextlib.suppress(Exception):
        blocker("stop")
    for state_dir in state_dirs:
        jobs |= _session_jobs(state_dir)
    deadline = time.monotonic() + 20
    left = [j for j in user_jobs(user) if j in jobs]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [j for j in user_jobs(user) if j in jobs]
    if left:
        problems.append(f"jobs left in squeue, cancelled: {left}")
        subprocess.run(["scancel", *left], capture_output=True)
    for state_dir in state_dirs:
        deadline = time.monotonic() + 5
        procs = ssh_clients(str(state_dir))
        while procs and time.monotonic() < deadline:
            time.sleep(0.2)
            procs = ssh_clients(str(state_dir))
        for pid, argv in procs:
            problems.append(f"ssh left running, killed: {pid} {argv}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    remaining = user_jobs(user)
    log(f"cleanup done; squeue -h -u {user}: {remaining or 'empty'}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
