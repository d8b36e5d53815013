"""What bench/run.py measured, the targets, and the report it writes.

One dataclass per measurement; ``target_rows`` turns them into the table of
figures with met/missed next to each; ``render_markdown`` writes the file."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from probes import Footprint, RunFiles

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """How much to run: --smoke keeps the whole run under 3 minutes."""

    sessions: int
    crash_runs: int  # per crash model
    pending_s: float  # how long the pending session is kept PENDING
    backoff_after: float  # polling.scheduler_backoff_after given to the tool
    footprint_s: float
    cli_runs: int = 15
    scheduler_interval: float = 5  # the tool's defaults (config/default.toml)
    backoff_interval: float = 30

    @classmethod
    def make(cls, smoke: bool, sessions: int | None) -> Plan:
        if smoke:
            # Backoff after 10 s so that ~25 s of pending still exercises it.
            return cls(sessions or 1, 1, 25, 10, 10)
        return cls(sessions or 5, 2, 180, 120, 30)


# ================================================================ measurements
@dataclass
class SessionResult:
    """One `alvis-fsm start`, from spawn to exit."""

    model: str
    route: str
    job_id: str = ""
    connected: bool = False
    exit_status: int | None = None
    time_to_connected: float | None = None  # spawn -> "Connection successful"
    readiness_latency: float | None = None  # startup line landed -> "Testing connection"
    crash_latency: float | None = None  # vllm.exit mtime -> process exit
    logins_login: int | None = None  # None: not measured (another client was active)
    logins_node: int | None = None
    t_spawn: float | None = None
    t_address: float | None = None  # "Server address" printed
    t_ready: float | None = None  # "Testing connection" printed: readiness noticed
    files: RunFiles | None = None
    footprint: Footprint | None = None
    problem: str = ""  # why this counts as a tool failure ("" = none)

    @property
    def logins(self) -> int:
        return (self.logins_login or 0) + (self.logins_node or 0)

    @property
    def logins_text(self) -> str:
        if self.logins_login is None or self.logins_node is None:
            return "—"
        return f"{self.logins_login}+{self.logins_node}"

    @property
    def pre_submit(self) -> float | None:
        """The tool's own start: spawn -> job script written (just before sbatch)."""
        f = self.files
        return f.submitted - self.t_spawn if f and f.submitted and self.t_spawn else None

    @property
    def tunnel_and_verify(self) -> float | None:
        """From readiness noticed ("Testing connection") to "Connection successful":
        /v1/models answered through the tunnel (opened while vLLM loaded)."""
        if self.time_to_connected is None or self.t_ready is None or self.t_spawn is None:
            return None
        return self.t_spawn + self.time_to_connected - self.t_ready

    @property
    def job_start(self) -> float | None:
        f = self.files
        return f.started - f.submitted if f and f.started and f.submitted else None

    @property
    def model_load(self) -> float | None:
        f = self.files
        return f.ready_line - f.started if f and f.ready_line and f.started else None

    @property
    def floor(self) -> float | None:
        """The best any client could do: job start + model load + 1 s."""
        if self.job_start is None or self.model_load is None:
            return None
        return self.job_start + self.model_load + 1.0

    @property
    def over_floor(self) -> float | None:
        if self.time_to_connected is None or self.floor is None:
            return None
        return self.time_to_connected - self.floor


@dataclass
class BaselineResult:
    """One run of bench/baseline.sh."""

    time_to_connected: float | None = None  # spawn -> its "connected" line
    logins_login: int = 0
    logins_node: int = 0
    exit_status: int | None = None
    problem: str = ""

    @property
    def logins(self) -> int:
        return self.logins_login + self.logins_node


@dataclass
class SchedulerCount:
    """squeue/sacct calls of one caller while its job was PENDING."""

    who: str
    window_s: float = 0.0
    times: list[float] = field(default_factory=list)  # seconds since "Job submitted"
    backoff_after: float = 120.0
    interval: float = 5.0
    backoff_interval: float = 30.0

    def early(self) -> list[float]:
        return [t for t in self.times if t <= self.backoff_after]

    def late(self) -> list[float]:
        # The wait slice begun just before the backoff threshold is still a
        # short one: the long interval applies from one short slice later.
        return [t for t in self.times if t > self.backoff_after + self.interval]

    def early_window(self) -> float:
        return min(self.window_s, self.backoff_after)

    def late_window(self) -> float:
        return max(0.0, self.window_s - self.backoff_after - self.interval)

    @staticmethod
    def max_in(times: list[float], width: float) -> int:
        """Most calls in any window of ``width`` seconds."""
        return max((sum(1 for u in times if t <= u < t + width) for t in times), default=0)

    # 10 % slack: two calls one interval apart may land a little closer,
    # jittered by the ssh channel's round trip.
    def early_max(self) -> int:
        return self.max_in(self.early(), self.interval * 0.9)

    def late_max(self) -> int:
        return self.max_in(self.late(), self.backoff_interval * 0.9)


@dataclass
class CliTiming:
    name: str
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Results:
    plan: Plan
    started: str
    jump: list[SessionResult] = field(default_factory=list)
    login: list[SessionResult] = field(default_factory=list)
    crashes: list[SessionResult] = field(default_factory=list)
    pending: SessionResult | None = None
    baseline: list[BaselineResult] = field(default_factory=list)
    sched: list[SchedulerCount] = field(default_factory=list)
    sched_note: str = ""  # why scheduler queries were not measured
    cli: list[CliTiming] = field(default_factory=list)
    footprint: Footprint | None = None
    failures: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def sched_of(self, who: str) -> SchedulerCount | None:
        return next((c for c in self.sched if c.who == who), None)


# ================================================================ formatting
def secs(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f} s"


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile (the max for n < 10)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    return (
        f"median {statistics.median(values):.2f} s, p90 {p90(values):.2f} s, "
        f"{min(values):.2f}–{max(values):.2f} s (n={len(values)})"
    )


def present(values: list[float | None]) -> list[float]:
    return [x for x in values if x is not None]


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def session_line(r: SessionResult) -> str:
    return (
        f"connected {secs(r.time_to_connected)} (floor {secs(r.floor)}), "
        f"ready noticed {secs(r.readiness_latency, 3)}, "
        f"logins {r.logins_text}, exit {r.exit_status}"
    )


# ================================================================ targets
@dataclass
class Row:
    figure: str
    value: str
    target: str = "—"
    met: bool | None = None  # None: not measured (or nothing to judge)

    @property
    def verdict(self) -> str:
        if self.target == "—":
            return ""
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def target_rows(r: Results) -> list[Row]:
    return [
        *_connect_rows(r),
        *_login_rows(r),
        _readiness_row(r),
        *_sched_rows(r),
        *_crash_rows(r),
        *_cli_rows(r),
        *_footprint_rows(r),
    ]


def _connect_rows(r: Results) -> list[Row]:
    ttc = present([s.time_to_connected for s in r.jump])
    med = median_or_none(ttc)
    bmed = median_or_none(present([b.time_to_connected for b in r.baseline]))
    rows = [Row("Time to connected (route jump)", spread(ttc))]
    login_ttc = present([s.time_to_connected for s in r.login])
    if login_ttc:
        rows.append(Row("Time to connected (route login)", spread(login_ttc)))
    if med is not None and bmed:
        ratio = med / bmed
        rows.append(
            Row(
                "… ÷ baseline (medians)",
                f"{ratio:.2f}× ({med:.2f} s / {bmed:.2f} s)",
                "≤ 0.6×",
                ratio <= 0.6,
            )
        )
    else:
        rows.append(Row("… ÷ baseline (medians)", "—", "≤ 0.6×"))
    over = present([s.over_floor for s in r.jump])
    floors = present([s.floor for s in r.jump])
    if over:
        within = sum(1 for x in over if x <= 0)
        value = (
            f"floor median {statistics.median(floors):.2f} s; tool − floor median "
            f"{statistics.median(over):+.2f} s ({within}/{len(over)} sessions within)"
        )
        rows.append(
            Row(
                "… vs floor (job start + load + 1 s)",
                value,
                "≤ floor (median)",
                statistics.median(over) <= 0,
            )
        )
    else:
        rows.append(Row("… vs floor (job start + load + 1 s)", "—", "≤ floor (median)"))
    return rows


def _login_rows(r: Results) -> list[Row]:
    rows = []
    for route, sessions, limit in (("jump", r.jump, 2), ("login", r.login, 1)):
        done = [s for s in sessions if s.connected]
        if not done:
            rows.append(Row(f"SSH logins per session (route {route})", "—", f"≤ {limit}"))
            continue
        worst = max(done, key=lambda s: s.logins)
        value = f"max {worst.logins} ({worst.logins_login} login node + {worst.logins_node} node)"
        rows.append(
            Row(
                f"SSH logins per session (route {route})",
                value,
                f"≤ {limit}",
                worst.logins <= limit,
            )
        )
    tool = [s.logins for s in r.jump if s.connected]
    base = [b.logins for b in r.baseline if b.time_to_connected is not None]
    if tool and base:
        t, b = statistics.median(tool), statistics.median(base)
        rows.append(Row("… ÷ baseline (route jump, medians)", f"{t / b:.2f}× ({t:g} / {b:g})"))
    return rows


def _readiness_row(r: Results) -> Row:
    ready = present([s.readiness_latency for s in r.jump + r.login])
    return Row(
        "Readiness noticed (startup line → Testing connection)",
        spread(ready),
        "≤ 0.5 s (every session)",
        max(ready) <= 0.5 if ready else None,
    )


def _sched_rows(r: Results) -> list[Row]:
    p = r.plan
    tool, base = r.sched_of("alvis-fsm"), r.sched_of("baseline")
    if tool is None:
        target = f"≤ 1 per {p.scheduler_interval:g} s, then ≤ 1 per {p.backoff_interval:g} s"
        return [Row("Scheduler queries while pending", r.sched_note or "—", target)]
    early, late = tool.early(), tool.late()
    rate = len(early) * p.scheduler_interval / tool.early_window() if tool.early_window() else 0
    rows = [
        Row(
            f"Scheduler queries, first {p.backoff_after:g} s pending",
            f"{len(early)} in {tool.early_window():.0f} s = {rate:.2f} per "
            f"{p.scheduler_interval:g} s; max {tool.early_max()} in any {p.scheduler_interval:g} s",
            f"≤ 1 per {p.scheduler_interval:g} s",
            tool.early_max() <= 1,
        ),
    ]
    if tool.late_window() > 0:
        rate = len(late) * p.backoff_interval / tool.late_window()
        rows.append(
            Row(
                f"Scheduler queries after {p.backoff_after:g} s",
                f"{len(late)} in {tool.late_window():.0f} s = {rate:.2f} per {p.backoff_interval:g} s; "
                f"max {tool.late_max()} in any {p.backoff_interval:g} s",
                f"≤ 1 per {p.backoff_interval:g} s",
                tool.late_max() <= 1,
            )
        )
    if base is not None and base.times:
        ratio = len(tool.times) / len(base.times)
        rows.append(
            Row(
                "… baseline, same window",
                f"{len(base.times)} in {base.window_s:.0f} s (alvis-fsm "
                f"{len(tool.times)} in {tool.window_s:.0f} s: {ratio:.2f}×)",
            )
        )
    return rows


def _crash_rows(r: Results) -> list[Row]:
    rows = []
    for model in ("lab-oom", "lab-die"):
        lat = present([c.crash_latency for c in r.crashes if c.model == model])
        rows.append(
            Row(
                f"Crash → exit ({model})",
                spread(lat),
                "≤ 5 s (every run)",
                max(lat) <= 5 if lat else None,
            )
        )
    return rows


def _cli_rows(r: Results) -> list[Row]:
    return [
        Row(
            f"`alvis-fsm {c.name}`",
            f"median {c.median:.3f} s (n={len(c.times)})",
            "≤ 0.25 s median",
            c.median <= 0.25,
        )
        for c in r.cli
    ]


def _footprint_rows(r: Results) -> list[Row]:
    fp = r.footprint
    if fp is None or not fp.samples:
        return [Row("Client footprint while streaming", "—", "≤ 80 MB, ≤ 1 % CPU")]
    return [
        Row(
            "Client RSS while streaming",
            f"max {fp.max_rss_mb:.1f} MB (its ssh processes: {fp.helpers_max_rss_mb:.1f} MB)",
            "≤ 80 MB",
            fp.max_rss_mb <= 80,
        ),
        Row(
            "Client CPU while streaming",
            f"mean {fp.cpu_pct:.2f} % over {fp.seconds:.0f} s "
            f"(its ssh processes: {fp.helpers_cpu_pct:.2f} %)",
            "≤ 1 %",
            fp.cpu_pct <= 1,
        ),
    ]


# ================================================================ output
def render_table(rows: list[Row]) -> str:
    out = ["| Figure | Measured | Target | |", "| --- | --- | --- | --- |"]
    out += [f"| {row.figure} | {row.value} | {row.target} | {row.verdict} |" for row in rows]
    return "\n".join(out)


def _session_rows(r: Results) -> list[str]:
    head = [
        "| # | model | route | job | connected | pre-submit | job start | load | floor "
        "| ready noticed | verify | crash → exit | logins | exit |",
        "|" + " --- |" * 14,
    ]
    everything = r.jump + r.login + r.crashes + ([r.pending] if r.pending else [])
    body = [
        f"| {i} | {s.model} | {s.route} | {s.job_id or '—'} | {secs(s.time_to_connected)} "
        f"| {secs(s.pre_submit)} | {secs(s.job_start)} | {secs(s.model_load)} | {secs(s.floor)} "
        f"| {secs(s.readiness_latency, 3)} | {secs(s.tunnel_and_verify)} "
        f"| {secs(s.crash_latency)} | {s.logins_text} | {s.exit_status} |"
        for i, s in enumerate(everything, 1)
    ]
    return head + body


def render_details(r: Results) -> str:
    lines = ["## Sessions", "", *_session_rows(r), ""]
    lines.append("Pre-submit: spawn → job script written (the tool's start-up, login, run dir).")
    lines.append("Job start: → `job.started`; load: → startup line in `vllm.err`; verify:")
    lines.append('"Testing connection" → "Connection successful" (the tunnel was opened while')
    lines.append("vLLM loaded). Logins: login node + compute node.")
    lines.append("The last row is the session kept PENDING behind the GPU blocker (logins not")
    lines.append("counted: the baseline ran beside it), then stopped with Ctrl+C.")
    lines += ["", "## Baseline (bench/baseline.sh)", ""]
    lines += ["| # | connected | logins | exit |", "| --- | --- | --- | --- |"]
    for i, b in enumerate(r.baseline, 1):
        logins = f"{b.logins_login}+{b.logins_node}"
        lines.append(f"| {i} | {secs(b.time_to_connected)} | {logins} | {b.exit_status} |")
    lines += ["", "## Scheduler calls while pending (seconds after submit)", ""]
    for c in r.sched:
        when = ", ".join(f"{t:.1f}" for t in c.times)
        lines.append(f"- {c.who} ({len(c.times)} in {c.window_s:.0f} s): {when}")
    if r.sched_note:
        lines.append(f"- {r.sched_note}")
    lines += ["", "## CLI start-up (wall time of each run)", ""]
    for c in r.cli:
        lines.append(f"- `alvis-fsm {c.name}`: " + ", ".join(f"{t:.3f}" for t in c.times))
    return "\n".join(lines)


METHOD = """## How each figure is measured

- **Time to connected**: from spawning `alvis-fsm start -m lab-ok --port P --route R`
  in a pty to the arrival of "Connection successful" on it. The baseline is timed
  the same way (spawn → its `connected` line).
- **Floor**: from the run dir's files, watched from the host every 20 ms: job start
  latency = `job.started` mtime − `job.sh` mtime (written just before sbatch); model
  load = the startup line landing in `vllm.err` − `job.started`; floor = both + 1 s.
  The tool's own start-up and login happen before the submit: the 1 s must cover them.
- **Logins**: `Accepted publickey` lines added to the lab's sshd logs (login node,
  compute node) from spawn to exit, cleanup included; the same for the baseline.
- **Readiness noticed**: arrival of "Testing connection" (the tool's first output once
  it has seen the server ready; the tunnel is already up by then) − the moment the startup line
  landed in `vllm.err` (the file's mtime when the watcher first saw the line).
- **Scheduler queries**: during the pending window only, temporary wrappers
  `/usr/local/bin/{squeue,sacct}` (first in the login shell's PATH) log each call by
  the cluster user; calls with the tool's remote agent as an ancestor are the tool's,
  the others the baseline's (both pending side by side behind `tests/lab/blocker`).
  Window: "Job submitted" → Ctrl+C. "After" starts one short slice past the backoff
  threshold (the slice begun just before it is still a short one); "max in any
  window" allows 10 % jitter.
- **Crash → exit**: the tool's process exit (reaped, ±20 ms) − `vllm.exit` mtime.
- **CLI start-up**: wall time of each run, after one untimed warm-up run.
- **Footprint**: the tool's own process while it streams logs, sampled every 1 s:
  RSS from `ps -o rss=`, CPU from its utime+stime in /proc (`ps -o time=` only has
  1 s resolution). Its ssh processes (master, stream channel, tunnel) are shown apart.
"""


def render_markdown(r: Results, rows: list[Row], smoke: bool) -> str:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        text=True,
        capture_output=True,
        check=False,
    ).stdout.strip()
    p = r.plan
    command = "python bench/run.py" + (" --smoke" if smoke else "")
    lines = [
        "# alvis-fsm benchmark (lab cluster)",
        "",
        f"Generated by `{command}` on {r.started} (commit {commit or '?'}, "
        f"host {os.uname().nodename}); the run took {r.duration_s:.0f} s. "
        "Do not edit by hand: rerun the benchmark.",
        "",
        f"Plan: {p.sessions} session(s) per route, {p.crash_runs} run(s) per crash model, "
        f"{p.sessions} baseline run(s), a {p.pending_s:g} s pending window with backoff after "
        f"{p.backoff_after:g} s, footprint over {p.footprint_s:g} s, {p.cli_runs} CLI runs each.",
        "",
        "## Targets",
        "",
        render_table(rows),
        "",
    ]
    if r.failures:
        lines += ["## Tool failures", "", *[f"- {f}" for f in r.failures], ""]
    return "\n".join([*lines, render_details(r), "", METHOD])
