"""Measuring instruments for bench/run.py, each usable on its own.

Everything here observes from the outside, the way a user or an admin
would: the tool's terminal output (with the time each chunk arrived), the
run directory on shared storage, sshd's logs, the scheduler's command
line tools, ``ps``. Nothing imports or patches alvis_fsm itself."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pexpect

STARTUP_LINE = "Application startup complete."  # uvicorn's, in vllm.err

# The tool's output lines the benchmark times (see README / the brief).
MARKS = {
    "submitted": r"Job submitted: (\d+)",
    "running": r"Job is running on node",
    "address": r"Server address: ",
    "tunnel": r"Establishing SSH tunnel",
    # The tool opens the tunnel while vLLM loads, so the first thing it
    # prints once it has noticed readiness is "Testing connection...".
    "ready": r"Testing connection",
    "connected": r"Connection successful",
    "error": r"\[ERROR\]",
    "cleaned": r"Cleaned up job",
}


# --------------------------------------------------------------------- output
class TimedTranscript:
    """pexpect's ``logfile_read``: all the tool printed, plus when each chunk
    arrived. While we sit in ``expect`` the pty is read as soon as data is
    there, so the arrival time is the print time to within a millisecond."""

    def __init__(self) -> None:
        self.text = ""
        self._chunks: list[tuple[int, float]] = []  # (end offset in text, arrival time)

    def write(self, data: str) -> None:
        self.text += data
        self._chunks.append((len(self.text), time.time()))

    def flush(self) -> None:
        pass

    def time_of(self, pattern: str) -> float | None:
        """Arrival time of the first match of ``pattern`` (None: never printed)."""
        m = re.search(pattern, self.text)
        if m is None:
            return None
        return next((t for end, t in self._chunks if end >= m.end()), None)

    def group(self, pattern: str) -> str | None:
        m = re.search(pattern, self.text)
        return m.group(1) if m else None

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text.replace("\r", "").splitlines()[-lines:])


class ToolRun:
    """One ``alvis-fsm`` process in a pty, as a user runs it."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.transcript = TimedTranscript()
        self.t_spawn = time.time()
        self.child = pexpect.spawn(
            argv[0],
            argv[1:],
            env=env,
            cwd=str(cwd),
            encoding="utf-8",
            codec_errors="replace",
            timeout=30,
            dimensions=(50, 200),
            # Ctrl+C as in a terminal, even when the bench itself runs in the
            # background of a shell without job control (SIGINT inherited ignored).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.child.logfile_read = self.transcript
        self.t_exit: float | None = None
        self.t_interrupt: float | None = None

    @property
    def pid(self) -> int:
        return int(self.child.pid)

    def mark(self, name: str) -> float | None:
        return self.transcript.time_of(MARKS[name])

    def wait_for(self, names: list[str], timeout: float) -> str | None:
        """Read output until one of the named marks (or exit); returns which."""
        patterns = [MARKS[n] for n in names] + [pexpect.EOF, pexpect.TIMEOUT]
        index = self.child.expect(patterns, timeout=timeout)
        if index < len(names):
            return names[index]
        if index == len(names):
            self._note_exit()
        return None

    def pump(self, seconds: float) -> None:
        """Keep reading the pty for ``seconds`` (so the tool never blocks on a
        full terminal buffer while we measure something else)."""
        end = time.monotonic() + seconds
        while self.alive() and (left := end - time.monotonic()) > 0:
            if self.child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=min(left, 0.5)) == 0:
                self._note_exit()
                time.sleep(0.02)

    def alive(self) -> bool:
        if self.t_exit is not None:
            return False
        if self.child.isalive():
            return True
        self._note_exit()
        return False

    def _note_exit(self) -> None:
        # isalive() reaps with WNOHANG, so this is the exit time to ~20 ms.
        if self.t_exit is None and not self.child.isalive():
            self.t_exit = time.time()

    def wait_exit(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > end:
                return False
            with contextlib.suppress(pexpect.ExceptionPexpect):
                if self.child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=0.02) == 0:
                    time.sleep(0.02)
        return True

    def interrupt(self, timeout: float = 60) -> bool:
        """Ctrl+C as the terminal sends it; True when the tool then exited."""
        if not self.alive():
            return True
        self.t_interrupt = time.time()
        self.child.sendintr()
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """Last resort (the tool ignored Ctrl+C): SIGTERM, then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                return
            with contextlib.suppress(OSError):
                self.child.kill(sig)
            self.wait_exit(10)

    def exit_status(self) -> int | None:
        if self.alive():
            return None
        with contextlib.suppress(pexpect.ExceptionPexpect):
            self.child.close()
        if self.child.exitstatus is not None:
            return int(self.child.exitstatus)
        if self.child.signalstatus is not None:
            return 128 + int(self.child.signalstatus)
        return None


# ------------------------------------------------------------------ run dirs
@dataclass
class RunFiles:
    """When the job's files in one run directory appeared (epoch seconds).

    ``submitted`` is job.sh's mtime: the agent writes it right before sbatch.
    ``ready_line`` is when uvicorn's startup line landed in vllm.err: that
    file's mtime when we first saw the line (we poll every 20 ms, and
    nothing else is written to vllm.err until shutdown)."""

    path: Path
    job_id: str = ""
    submitted: float | None = None
    started: float | None = None
    address: float | None = None
    ready_line: float | None = None
    exited: float | None = None
    _err_size: int = -1


class RunDirWatcher:
    """A thread that watches every run directory created under ``root`` after
    it starts, every 20 ms, and notes when each of the job's files appears."""

    POLL = 0.02

    def __init__(self, root: Path) -> None:
        self.root = root
        self._before = set(self._listing())
        self.dirs: dict[Path, RunFiles] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rundir-watcher", daemon=True)

    def _listing(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    def start(self) -> RunDirWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for path in self._listing():
                if path not in self._before:
                    self._look(self.dirs.setdefault(path, RunFiles(path)))
            self._stop.wait(self.POLL)

    @staticmethod
    def _mtime(path: Path) -> float | None:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _look(self, f: RunFiles) -> None:
        if f.exited is not None:
            return  # vLLM is gone: nothing more to see here
        f.submitted = f.submitted or self._mtime(f.path / "job.sh")
        if f.started is None and (t := self._mtime(f.path / "job.started")) is not None:
            with contextlib.suppress(OSError, IndexError):
                f.job_id = (f.path / "job.started").read_text().split()[1]
            f.started = t
        f.address = f.address or self._mtime(f.path / "server_address.txt")
        if f.ready_line is None:
            self._look_for_startup_line(f)
        f.exited = self._mtime(f.path / "vllm.exit")

    def _look_for_startup_line(self, f: RunFiles) -> None:
        err = f.path / "vllm.err"
        try:
            st = err.stat()
            if st.st_size == f._err_size:
                return
            f._err_size = st.st_size
            if STARTUP_LINE in err.read_text(errors="replace"):
                f.ready_line = min(st.st_mtime, time.time())
        except FileNotFoundError:
            pass

    def for_job(self, job_id: str) -> RunFiles | None:
        return next((f for f in self.dirs.values() if f.job_id == job_id), None)


# ------------------------------------------------------------- ssh processes
def ssh_pids(marker: str) -> list[int]:
    """ssh client processes whose command line names ``marker`` (our temp dir)."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,comm=,args="], text=True, capture_output=True, check=False
    ).stdout
    pids = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] == "ssh" and marker in parts[2]:
            pids.append(int(parts[0]))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


# ----------------------------------------------------------------- footprint
def _ps_time(text: str) -> float:
    """ps's cumulative CPU time, ``[[dd-]hh:]mm:ss``, in seconds."""
    days, _, rest = text.rpartition("-")
    secs = 0.0
    for part in rest.split(":"):
        secs = secs * 60 + float(part)
    return secs + (int(days) * 86400 if days else 0)


def rss_and_cpu(pid: int) -> tuple[float, float] | None:
    """(RSS in MB, CPU seconds used so far) of one process.

    RSS comes from ``ps -o rss=,time=`` (portable). CPU time from ps has a
    resolution of one second, far too coarse to tell 0.1 % from 1 % over
    30 s, so on Linux the clock ticks of /proc/PID/stat are used instead."""
    proc = subprocess.run(
        ["ps", "-o", "rss=,time=", "-p", str(pid)], text=True, capture_output=True, check=False
    )
    fields = proc.stdout.split()
    if proc.returncode != 0 or len(fields) != 2:
        return None
    rss_mb = int(fields[0]) / 1024
    cpu = _ps_time(fields[1])
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = stat.rsplit(")", 1)[1].split()
        cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return rss_mb, cpu


@dataclass
class Footprint:
    """The tool's process while it streams logs, sampled once a second."""

    seconds: float = 0.0
    samples: int = 0
    max_rss_mb: float = 0.0
    cpu_pct: float = 0.0
    helpers_max_rss_mb: float = 0.0  # its ssh processes (master, channels, tunnel)
    helpers_cpu_pct: float = 0.0


def sample_footprint(run: ToolRun, seconds: float, marker: str) -> Footprint:
    fp = Footprint()
    first = rss_and_cpu(run.pid)
    helpers0 = {pid: rss_and_cpu(pid) for pid in ssh_pids(marker)}
    t0 = time.monotonic()
    last = first
    while time.monotonic() - t0 < seconds and run.alive():
        run.pump(1.0)
        now = rss_and_cpu(run.pid)
        if now is None:
            break
        last = now
        fp.samples += 1
        fp.max_rss_mb = max(fp.max_rss_mb, now[0])
        helper_rss = sum(s[0] for p in ssh_pids(marker) if (s := rss_and_cpu(p)))
        fp.helpers_max_rss_mb = max(fp.helpers_max_rss_mb, helper_rss)
    fp.seconds = time.monotonic() - t0
    if first and last and fp.seconds > 0:
        fp.cpu_pct = 100 * (last[1] - first[1]) / fp.seconds
    used = 0.0
    for pid, start in helpers0.items():
        end = rss_and_cpu(pid)
        if start and end:
            used += end[1] - start[1]
    fp.helpers_cpu_pct = 100 * used / fp.seconds if fp.seconds else 0.0
    return fp


# ----------------------------------------------------------- scheduler calls
WRAPPED = ("squeue", "sacct")
WRAPPER_DIR = Path("/usr/local/bin")  # before /usr/bin in the login shell's PATH
WRAPPER_MARK = "alvis-fsm bench: scheduler query counter"

_WRAPPER = """#!/bin/bash
# {mark} (temporary: bench/run.py
# removes it when done; a leftover one is safe to delete).
# Logs "<epoch> <user> <caller> <command>", caller = tool when an ancestor
# is the alvis-fsm remote agent, then runs the real {name}.
caller=other
p=$PPID
for _ in 1 2 3 4; do
    case $(tr '\\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) in
        *alvis-fsm-agent*) caller=tool; break ;;
    esac
    p=$(awk '{{print $4}}' "/proc/$p/stat" 2>/dev/null)
    [ -n "$p" ] && [ "$p" -gt 1 ] || break
done
printf '%s %s %s %s\\n' "$(date +%s.%N)" "$(id -un)" "$caller" {name} >>{log} 2>/dev/null
exec {real} "$@"
"""


def ours(path: Path) -> bool:
    try:
        return WRAPPER_MARK in path.read_text(errors="replace")[:300]
    except (FileNotFoundError, IsADirectoryError):
        return False


# The lab's own fault switches (tests/lab/fault) route the cluster users'
# squeue/sacct through a wrapper linked here; the counting wrappers take
# their place during a run and the links are put back after it.
LAB_FAULT_WRAPPER = "slurm-fault-wrapper"


def _lab_link(path: Path) -> bool:
    return path.is_symlink() and Path(os.readlink(path)).name == LAB_FAULT_WRAPPER


def remove_wrappers() -> None:
    """Remove our wrappers (only files carrying our mark), and put the lab's
    fault-switch links back where the lab has them."""
    for name in WRAPPED:
        path = WRAPPER_DIR / name
        if ours(path):
            path.unlink(missing_ok=True)
            if (WRAPPER_DIR / LAB_FAULT_WRAPPER).exists():
                path.symlink_to(LAB_FAULT_WRAPPER)


def install_wrappers(log: Path) -> str | None:
    """Put counting wrappers for squeue/sacct first in PATH; returns why not, or None."""
    remove_wrappers()  # a leftover of an interrupted run
    for name in WRAPPED:
        if _lab_link(WRAPPER_DIR / name):
            (WRAPPER_DIR / name).unlink()  # restored by remove_wrappers()
        if (WRAPPER_DIR / name).exists():
            return f"{WRAPPER_DIR / name} exists and is not ours"
    log.touch()
    log.chmod(0o666)  # the wrappers run as the cluster user
    for name in WRAPPED:
        real = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if real is None:
            remove_wrappers()
            return f"{name} not found"
        path = WRAPPER_DIR / name
        tmp = path.with_name(f".{name}.bench-tmp")
        tmp.write_text(_WRAPPER.format(mark=WRAPPER_MARK, name=name, log=log, real=real))
        tmp.chmod(0o755)
        tmp.replace(path)
    return None


@dataclass
class SchedCall:
    t: float
    user: str
    caller: str
    command: str


def read_sched_log(log: Path, user: str) -> list[SchedCall]:
    calls = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] == user:
            calls.append(SchedCall(float(parts[0]), parts[1], parts[2], parts[3]))
    return calls


# ------------------------------------------------------------------ baseline
@dataclass
class BaselineRun:
    """bench/baseline.sh, its printed events timed by us on arrival."""

    proc: subprocess.Popen[str]
    t_spawn: float
    events: dict[str, float] = field(default_factory=dict)  # event -> arrival time
    job_id: str = ""
    stderr: str = ""
    t_stop: float | None = None
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str]) -> BaselineRun:
        t = time.time()
        proc = subprocess.Popen(
            argv,
            env=env,
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # our Ctrl+C is handled by us
        )
        run = cls(proc=proc, t_spawn=t)
        run._reader = threading.Thread(target=run._read, daemon=True)
        run._reader.start()
        return run

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "BASELINE":
                if parts[1] == "job":
                    self.job_id = parts[2]
                else:
                    self.events.setdefault(parts[1], time.time())

    def wait_event(self, name: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while name not in self.events:
            if self.proc.poll() is not None or time.monotonic() > end:
                return name in self.events
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (its trap cancels the job and kills the tunnel), then wait."""
        if self.proc.poll() is None:
            self.t_stop = time.time()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            rc = None
        if self._reader is not None:
            self._reader.join(timeout=2)
        if self.proc.stderr is not None:
            with contextlib.suppress(ValueError, OSError):
                self.stderr = self.proc.stderr.read()
        return rc

    def since_spawn(self, name: str) -> float | None:
        t = self.events.get(name)
        return None if t is None else t - self.t_spawn


# ------------------------------------------------------------------ timing
def time_command(argv: list[str], env: dict[str, str], cwd: Path, runs: int) -> list[float]:
    """Wall time of ``runs`` runs (after one untimed warm-up run)."""
    times: list[float] = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-500:]}")
        if i:
            times.append(dt)
    return times


def wait_until(check: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(every)
    return True
