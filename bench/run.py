#!/usr/bin/env python3
"""Benchmark alvis-fsm on the lab cluster (tests/lab) against the obvious design.

    python bench/run.py [--sessions N] [--smoke] [--out bench/results.md]

One run measures, with the lab lock held throughout (so test runs and other
benchmarks wait instead of mixing their jobs and ssh logins with ours):

  1. time to "Connection successful" over N sessions (route jump), and the
     floor per session: job start latency + model load + 1 s, from run-dir files
  2. ssh logins per session (sshd logs), routes jump and login
  3. readiness notice latency: startup line in vllm.err -> "Testing connection"
  4. scheduler queries while a job is pending (counting squeue/sacct wrappers)
  5. crash latency: vllm.exit written -> the tool's process exit (lab-oom, lab-die)
  6. CLI start-up: `--help` and `status --offline`
  7. client footprint while streaming: RSS and CPU of the tool's process
  8. bench/baseline.sh (new ssh per action, sleep-5 polling) in the same run

It prints a table and writes it, with the details, to bench/results.md
(bench/results-smoke.md with --smoke). Exit status: 0 when the tool worked
(missed targets are reported, not fatal), 1 when the tool failed (never
connected, a crash not noticed, jobs or ssh processes left behind), 2 when
the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pwd
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))

import probes  # noqa: E402
from conftest import Lab, bring_up_lab, lab_lock  # noqa: E402
from probes import BaselineRun, SchedCall, ToolRun  # noqa: E402
from report import (  # noqa: E402
    BaselineResult,
    CliTiming,
    Plan,
    Results,
    SchedulerCount,
    SessionResult,
    render_markdown,
    render_table,
    secs,
    session_line,
    target_rows,
)
from tool import free_port, tool_argv  # noqa: E402

MODEL = "lab-ok"
CONNECT_TIMEOUT = 120  # s, a lab-ok session connects in well under 10 s
EXIT_TIMEOUT = 60  # s, for the tool to clean up and exit after Ctrl+C or a crash


# ================================================================ the bench
def delta(after: tuple[int, int], before: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


class Bench:
    """Runs every measurement in turn and collects a ``Results``."""

    def __init__(self, lab: Lab, plan: Plan, tmp: Path) -> None:
        self.lab = lab
        self.plan = plan
        self.tmp = tmp  # every ssh we cause names it: how leftovers are found
        self.home = tmp / "home"
        self.state = tmp / "state"  # the tool's state dir (its ssh control sockets)
        self.home.mkdir()
        self.state.mkdir()
        self.results = Results(plan=plan, started=dt.datetime.now().isoformat(timespec="seconds"))
        runs_root = Path(pwd.getpwnam(lab.user).pw_dir) / ".alvis-vllm" / "runs"
        self.watcher = probes.RunDirWatcher(runs_root)
        entry = json.loads((lab.client / "models.json").read_text())[MODEL]
        self.model_path, self.model_len = entry["path"], int(entry["max_model_len"])
        self.jobs_seen: set[str] = set()

    # -- helpers ----------------------------------------------------------------
    def tool_env(self, **extra: str) -> dict[str, str]:
        return {
            **self.lab.env,
            "HOME": str(self.home),
            "ALVIS_FSM_SESSION__STATE_DIR": str(self.state),
            "TERM": "dumb",  # plain [INFO] lines, no spinner
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def logins(self) -> tuple[int, int]:
        return self.lab.count_accepted("login"), self.lab.count_accepted("node")

    def fail(self, what: str) -> None:
        print(f"  !! {what}", flush=True)
        self.results.failures.append(what)

    def spawn(self, route: str, model: str = MODEL, **env: str) -> ToolRun:
        port = str(free_port())
        argv = [*tool_argv(), "start", "-m", model, "--port", port, "--route", route]
        return ToolRun(argv, self.tool_env(**env), REPO)

    # -- one session ------------------------------------------------------------
    def session(self, route: str, footprint_s: float = 0) -> SessionResult:
        """start -> "Connection successful" -> (footprint) -> Ctrl+C -> exit."""
        res = SessionResult(model=MODEL, route=route)
        before = self.logins()
        run = self.spawn(route)
        try:
            run.wait_for(["connected", "error"], CONNECT_TIMEOUT)
            t_connected = run.mark("connected")
            if t_connected is None:
                res.problem = f"{route}: no 'Connection successful'\n{run.transcript.tail()}"
            else:
                res.connected = True
                res.time_to_connected = t_connected - run.t_spawn
                if footprint_s:
                    res.footprint = probes.sample_footprint(run, footprint_s, str(self.tmp))
                run.pump(0.3)  # a moment of streaming before Ctrl+C, as a user would
        finally:
            self._finish(run, res)
        res.logins_login, res.logins_node = delta(self.logins(), before)
        cleaned = run.mark("cleaned") is not None and res.exit_status == 0
        if res.connected and not res.problem and not cleaned:
            res.problem = (
                f"{route}: Ctrl+C while streaming should print 'Cleaned up job' "
                f"and exit 0 (exit {res.exit_status})\n{run.transcript.tail()}"
            )
        self._read_files(run, res)
        return res

    def crash_session(self, model: str) -> SessionResult:
        """lab-oom dies while loading, lab-die 5 s after ready: the tool must
        notice on its own and exit (status 6); we never press Ctrl+C."""
        res = SessionResult(model=model, route="jump")
        before = self.logins()
        run = self.spawn("jump", model)
        try:
            if not run.wait_exit(CONNECT_TIMEOUT):
                res.problem = f"{model}: still running {CONNECT_TIMEOUT} s after start"
        finally:
            self._finish(run, res)
        res.logins_login, res.logins_node = delta(self.logins(), before)
        self._read_files(run, res)
        f = res.files
        if f and f.exited and run.t_exit:
            res.crash_latency = run.t_exit - f.exited
        elif not res.problem:
            res.problem = f"{model}: no vllm.exit seen\n{run.transcript.tail()}"
        if not res.problem and res.exit_status != 6:
            res.problem = f"{model}: exit status {res.exit_status}, expected 6"
        return res

    def _finish(self, run: ToolRun, res: SessionResult) -> None:
        """Ctrl+C if still running; then nothing of ours may be left."""
        if not run.interrupt(EXIT_TIMEOUT):
            res.problem = res.problem or f"{res.model}: ignored Ctrl+C for {EXIT_TIMEOUT} s"
            run.kill()
        res.exit_status = run.exit_status()
        res.job_id = run.transcript.group(probes.MARKS["submitted"]) or ""
        if res.job_id:
            self.jobs_seen.add(res.job_id)
            if not probes.wait_until(lambda: res.job_id not in self.lab.jobs(), 20):
                res.problem = res.problem or f"{res.model}: job {res.job_id} left in squeue"
        marker = str(self.state)
        if not probes.wait_until(lambda: not probes.ssh_pids(marker), 5):
            left = probes.ssh_pids(marker)
            res.problem = res.problem or f"{res.model}: ssh processes left: {left}"
            probes.kill_pids(left)

    def _read_files(self, run: ToolRun, res: SessionResult) -> None:
        time.sleep(3 * probes.RunDirWatcher.POLL)  # let the watcher take a last look
        res.files = self.watcher.for_job(res.job_id) if res.job_id else None
        res.t_spawn, res.t_address = run.t_spawn, run.mark("address")
        res.t_ready = run.mark("ready")
        if res.files and res.files.ready_line and res.t_ready:
            res.readiness_latency = res.t_ready - res.files.ready_line

    # -- measurements -------------------------------------------------------------
    def measure_cli(self) -> None:
        for name, args in (("--help", ["--help"]), ("status --offline", ["status", "--offline"])):
            argv = [*tool_argv(), *args]
            times = probes.time_command(argv, self.tool_env(), REPO, self.plan.cli_runs)
            self.results.cli.append(CliTiming(name, times))
            print(f"  {name}: median {statistics.median(times):.3f} s", flush=True)

    def measure_sessions(self, route: str) -> None:
        into = self.results.jump if route == "jump" else self.results.login
        for i in range(self.plan.sessions):
            # The footprint is sampled during the first jump session only.
            footprint_s = self.plan.footprint_s if route == "jump" and i == 0 else 0
            res = self.session(route, footprint_s)
            into.append(res)
            self.results.footprint = self.results.footprint or res.footprint
            print(f"  {route} #{i + 1}: {session_line(res)}", flush=True)
            if res.problem:
                self.fail(res.problem)

    def measure_crashes(self) -> None:
        for model in ("lab-oom", "lab-die"):
            for _ in range(self.plan.crash_runs):
                res = self.crash_session(model)
                self.results.crashes.append(res)
                latency = secs(res.crash_latency)
                print(f"  {model}: crash -> exit {latency}, exit {res.exit_status}", flush=True)
                if res.problem:
                    self.fail(res.problem)

    def baseline(self, max_wait: float = 300) -> BaselineRun:
        argv = [
            "bash",
            str(BENCH / "baseline.sh"),
            "--max-wait",
            str(max_wait),
            str(self.lab.ssh_config),
            self.model_path,
            str(self.model_len),
            str(free_port()),
        ]
        # TMPDIR: its throwaway known_hosts, named on its tunnel's command line.
        env = {**self.lab.env, "TMPDIR": str(self.tmp), "BASELINE_ACCOUNT": self.lab.account}
        return BaselineRun.start(argv, env)

    def measure_baseline(self) -> None:
        for i in range(self.plan.sessions):
            before = self.logins()
            run = self.baseline()
            res = BaselineResult()
            try:
                run.wait_event("cleaned", CONNECT_TIMEOUT)
            finally:
                res.exit_status = run.stop()
                self.jobs_seen.add(run.job_id)
            res.time_to_connected = run.since_spawn("connected")
            res.logins_login, res.logins_node = delta(self.logins(), before)
            self.results.baseline.append(res)
            logins = f"{res.logins_login}+{res.logins_node}"
            print(
                f"  baseline #{i + 1}: connected {secs(res.time_to_connected)}, "
                f"logins {logins}, exit {res.exit_status}",
                flush=True,
            )
            if res.time_to_connected is None or res.exit_status != 0:
                # Not the tool's failure: shown in the report, does not fail the run.
                res.problem = f"baseline did not connect: {run.stderr.strip()[-300:]}"
                print(f"  {res.problem}", flush=True)

    def measure_pending(self) -> None:
        """The tool and the baseline, both PENDING behind the GPU blocker, side by
        side, with squeue/sacct wrappers logging every call."""
        log = self.tmp / "sched" / "calls.log"
        log.parent.mkdir()
        log.parent.chmod(0o711)  # the wrappers run as the cluster user
        why = probes.install_wrappers(log)
        if why:
            self.results.sched_note = f"not measured: {why}"
            print(f"  scheduler queries {self.results.sched_note}", flush=True)
            return
        try:
            with self.lab.blocker():
                self._pending_window(log)
        finally:
            probes.remove_wrappers()

    def _pending_window(self, log: Path) -> None:
        p = self.plan
        res = SessionResult(model=MODEL, route="jump")
        env = {"ALVIS_FSM_POLLING__SCHEDULER_BACKOFF_AFTER": f"{p.backoff_after:g}"}
        run = self.spawn("jump", **env)
        base = self.baseline(max_wait=p.pending_s + 120)
        try:
            if run.wait_for(["submitted"], 60) is None:
                res.problem = f"pending: no 'Job submitted'\n{run.transcript.tail()}"
                return
            base.wait_event("submitted", 30)
            print(
                f"  pending for {p.pending_s:g} s (backoff after {p.backoff_after:g} s)...",
                flush=True,
            )
            run.pump(p.pending_s)
            if not run.alive():
                res.problem = f"pending: the tool exited while pending\n{run.transcript.tail()}"
        finally:
            base.stop()
            self.jobs_seen.add(base.job_id)
            self._finish(run, res)
            self.results.pending = res
            if res.problem:
                self.fail(res.problem)
        calls = probes.read_sched_log(log, self.lab.user)
        self._count_calls("alvis-fsm", calls, "tool", run.mark("submitted"), run.t_interrupt)
        self._count_calls("baseline", calls, "other", base.events.get("submitted"), base.t_stop)

    def _count_calls(
        self, who: str, calls: list[SchedCall], caller: str, t0: float | None, t1: float | None
    ) -> None:
        if t0 is None or t1 is None:
            return
        p = self.plan
        count = SchedulerCount(
            who=who,
            window_s=t1 - t0,
            backoff_after=p.backoff_after,
            interval=p.scheduler_interval,
            backoff_interval=p.backoff_interval,
            times=[c.t - t0 for c in calls if c.caller == caller and t0 <= c.t <= t1],
        )
        self.results.sched.append(count)
        n, window = len(count.times), count.window_s
        when = ", ".join(f"{t:.1f}" for t in count.times)
        print(f"  {who}: {n} scheduler queries in {window:.0f} s pending (at {when} s)", flush=True)

    # -- the whole run --------------------------------------------------------------
    def run(self) -> Results:
        n = self.plan.sessions
        steps: list[tuple[str, Callable[[], None]]] = [
            ("CLI start-up", self.measure_cli),
            (f"{n} session(s), route jump", lambda: self.measure_sessions("jump")),
            (f"{n} session(s), route login", lambda: self.measure_sessions("login")),
            ("crashes", self.measure_crashes),
            (f"{n} baseline run(s)", self.measure_baseline),
            ("scheduler queries while pending", self.measure_pending),
        ]
        t0 = time.monotonic()
        self.watcher.start()
        try:
            for title, step in steps:
                print(f"== {title}", flush=True)
                step()
        finally:
            self.watcher.stop()
            self.sweep()
            self.results.duration_s = time.monotonic() - t0
        return self.results

    def sweep(self) -> None:
        """Whatever happened: no job, ssh process or wrapper of ours left."""
        probes.remove_wrappers()
        left = [j for j in self.lab.jobs() if j in self.jobs_seen]
        if left:
            self.fail(f"jobs left behind: {left} (cancelled now)")
            self.lab.run(["scancel", *left], check=False)
        pids = probes.ssh_pids(str(self.tmp))
        if pids:
            self.fail(f"ssh processes left behind: {pids} (killed now)")
            probes.kill_pids(pids)
        # The tool keeps each session's run dir; the benchmark's are only noise.
        for f in self.watcher.dirs.values():
            shutil.rmtree(f.path, ignore_errors=True)


# ================================================================ main
@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl+C, so every cleanup below runs."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def clear_stale_jobs(lab: Lab) -> None:
    """Jobs of the lab user before we start hold GPUs and skew every figure.
    We hold the lab lock, so they are leftovers of an interrupted run."""
    if lab.jobs() and not probes.wait_until(lambda: not lab.jobs(), 20):
        print(f"note: cancelling leftover jobs of {lab.user} from an earlier run: {lab.jobs()}")
        lab.cancel_all()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, help="sessions per route (default 5, 1 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="short run (≤ 3 min) for CI")
    ap.add_argument(
        "--out", type=Path, help="report file (default bench/results.md, or results-smoke.md)"
    )
    args = ap.parse_args(argv)
    if args.sessions is not None and args.sessions < 1:
        ap.error("--sessions must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (the lab cluster does)", file=sys.stderr)
        return 2
    plan = Plan.make(args.smoke, args.sessions)
    out = args.out or BENCH / ("results-smoke.md" if args.smoke else "results.md")
    # A short temp dir: the tool's ssh control sockets live below it.
    tmp = Path(tempfile.mkdtemp(prefix="afsm-bench-", dir="/tmp"))
    tmp.chmod(0o711)  # the wrappers (run as the cluster user) write a log below it
    try:
        with signals_as_interrupt():
            lab = bring_up_lab()
            with lab_lock(lab.root):
                print(f"lab lock held; tool: {' '.join(tool_argv())}; temp {tmp}", flush=True)
                clear_stale_jobs(lab)
                results = Bench(lab, plan, tmp).run()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up; no report written", file=sys.stderr)
        return 130
    except Exception as exc:  # the benchmark (or the lab), not the tool
        traceback.print_exc()
        print(f"bench/run.py could not run: {exc!r}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = target_rows(results)
    print("\n" + render_table(rows))
    out.write_text(render_markdown(results, rows, args.smoke) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if results.failures:
        print("tool failures:\n  " + "\n  ".join(results.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
