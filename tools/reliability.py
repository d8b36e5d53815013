#!/usr/bin/env python3
"""Run the resilience faults on the lab cluster and write docs/concepts/reliability.md.

    python tools/reliability.py                 # all faults, writes docs/concepts/reliability.md
    python tools/reliability.py -k tunnel       # a subset (pytest -k)
    python tools/reliability.py --tool-src DIR  # test the alvis_fsm found in DIR

The faults are the tests of tests/integration/test_resilience.py and
test_faults.py (the scheduler away or busy, scancel failing, the network
gone, the client suspended, a detached tunnel killed), plus the isolation
check of tests/integration/test_private.py (a second cluster user against
every listener of the session's vLLM), run by
pytest (which holds the lab's lock, so runs never mix with other users of
the lab). Each test appends its measurements as one JSON line to the file
named by $ALVIS_RELIABILITY_RESULTS; this script only collects and formats
them, so every number in the report comes from the run. Needs root and the
lab (tests/lab/up, which pytest's fixture runs if needed).

Exit status: pytest's (0 when every fault was survived)."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ISOLATION_TEST = "test_second_user_reaches_no_listener"
TESTS = [
    REPO / "tests" / "integration" / "test_resilience.py",
    REPO / "tests" / "integration" / "test_faults.py",
    REPO / "tests" / "integration" / f"test_private.py::{ISOLATION_TEST}",
]
RESULTS_ENV = "ALVIS_RELIABILITY_RESULTS"


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout + proc.stderr).strip()


def describe_source(src: Path) -> str:
    """Which alvis_fsm was tested: the checkout's commit, and whether the
    tested tree differs from it."""
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO) or "unknown"
    if src.resolve() == REPO:
        changed = _run(
            ["git", "status", "--porcelain", "--", "alvis_fsm", "jobscript.sh"], cwd=REPO
        )
        state = (
            "unmodified"
            if not changed
            else "with uncommitted changes: " + ", ".join(line[3:] for line in changed.splitlines())
        )
        return f"`alvis_fsm` of this checkout, commit {head}, {state}"
    diff = _run(
        ["diff", "-rq", "-x", "__pycache__", str(REPO / "alvis_fsm"), str(src / "alvis_fsm")]
    )
    differs = [line for line in diff.splitlines() if line]
    return (
        f"`alvis_fsm` from `{src}` (compared with commit {head} of this checkout: "
        + (f"{len(differs)} file(s) differ: " + "; ".join(differs) if differs else "identical")
        + ")"
    )


def fingerprint(src: Path) -> str:
    """A hash of the tool's source files, to notice a tree edited during the run."""
    digest = hashlib.sha256()
    for path in sorted((src / "alvis_fsm").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    for name in ("jobscript.sh", "config/default.toml"):
        if (src / name).is_file():
            digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    return digest.hexdigest()[:12]


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test name -> (passed|failed|error|skipped, first line of the message)."""
    out: dict[str, tuple[str, str]] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "?")
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed"}.get(tag, tag)
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0] if text else ""
                break
        out[name] = (status, message)
    return out


# Which test measures which fault (the fault names are the tests' own).
TEST_OF = {
    "tunnel ssh SIGKILLed": "test_tunnel_ssh_killed_20_times",
    "login sshd stopped 10 s while pending": "test_login_sshd_down_10s_while_pending",
    "login sshd stopped 10 s while tunneled": "test_login_sshd_down_10s_while_tunneled",
    "vLLM dies after ready": "test_vllm_dies_after_ready",
    "client SIGKILLed": "test_client_sigkill_then_resume",
    "Ctrl+C while ": "test_ctrl_c_in_each_live_state[{state}]",
    "changed compute-node host key": "test_changed_node_host_key_is_refused",
    "API key on a command line": "test_api_key_never_on_a_command_line",
    "scheduler controller away": "test_scheduler_away_while_streaming_keeps_the_job",
    "squeue and sacct failing while ": "test_scheduler_not_answering_is_unknown[{state}]",
    "scancel failing": "test_failed_scancel_is_not_cleaned_up",
    "status, resume and stop while": "test_stop_status_resume_with_scheduler_away",
    "client suspended": "test_suspended_client_finds_the_session_where_the_cluster_left_it[{last}]",
    "network lost": "test_network_loss_keeps_the_job_then_resume[{last}]",
    "detached session: tunnel ssh": "test_detached_tunnel_is_reopened_by_its_supervisor",
    "isolation: ": ISOLATION_TEST,
}


def test_for(fault: str) -> str:
    for prefix, test in TEST_OF.items():
        if fault.startswith(prefix):
            # {last}: the parametrized case named in the fault's text
            # ("... while pending (timeout 6 s)" -> pending).
            words = fault.replace("(", " ").split()
            last = next(
                (w for w in reversed(words) if w in ("pending", "loading", "streaming")), ""
            )
            return test.format(state=fault.removeprefix(prefix), last=last)
    return ""


def fmt_s(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f} s"


def render(
    rows: list[dict[str, Any]],
    tests: dict[str, tuple[str, str]],
    source: str,
    duration: float,
    command: str,
) -> str:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    ssh_version = _run(["ssh", "-V"]) or "unknown"
    slurm_version = _run(["sinfo", "--version"]) or "unknown"
    passed = sum(1 for s, _ in tests.values() if s == "passed")
    lines = [
        "# Reliability on the lab cluster",
        "",
        f"Generated by `{command}` on {now}. Every number below was measured by that run",
        "(the tests in `tests/integration/test_resilience.py`, `test_faults.py` and the",
        "isolation check of `tests/integration/test_private.py`, each against the real sshd,",
        "SLURM and vLLM stand-in of `tests/lab/`); none is typed by hand. Regenerate with",
        "`python tools/reliability.py` (as root; the lab must be able to come up).",
        "",
        f"* Tool tested: {source}",
        f"* OpenSSH: {ssh_version}; SLURM: {slurm_version}",
        f"* Tests: {passed} of {len(tests)} passed in {duration:.0f} s",
        "",
        "| Fault | Tries | Survived | Worst recovery | Test |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        test = test_for(row["fault"])
        status = tests.get(test, ("not run", ""))[0] if test else "?"
        lines.append(
            f"| {row['fault']} | {row['tries']} | {row['survived']}/{row['tries']} "
            f"| {fmt_s(row.get('worst_recovery_s'))} | `{test}`: {status} |"
        )
    reported = {test_for(r["fault"]) for r in rows}
    for test, (status, _) in sorted(tests.items()):
        if test not in reported:
            lines.append(f"| (no measurement reported) | – | – | – | `{test}`: {status} |")
    lines.append("")

    fates = [r for r in rows if "jobs_lost" in r]
    if fates:
        total = {
            k: sum(int(r.get(k, 0)) for r in fates)
            for k in ("jobs_kept", "jobs_lost", "orphaned", "false_cleanup")
        }
        lines += [
            "### The job's fate under each fault",
            "",
            "Asked of the scheduler itself (root's `squeue`, which the fault switches never",
            'touch) when the fault was over; a "cleaned up" claim is false when the job was',
            "still running when the tool printed it.",
            "",
            '| Fault | Tries | Jobs kept | Jobs lost | Orphaned jobs | False "cleaned up" |',
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in fates:
            lines.append(
                f"| {r['fault']} | {r['tries']} | {r.get('jobs_kept', 0)} | {r.get('jobs_lost', 0)} "
                f"| {r.get('orphaned', 0)} | {r.get('false_cleanup', 0)} |"
            )
        lines += [
            f"| **all** | {sum(int(r['tries']) for r in fates)} | {total['jobs_kept']} "
            f"| **{total['jobs_lost']}** | **{total['orphaned']}** | **{total['false_cleanup']}** |",
            "",
        ]

    keys = [r for r in rows if "leaked_keys" in r]
    if keys:
        leaked = sum(int(r["leaked_keys"]) for r in keys)
        samples = sum(int(r["tries"]) for r in keys)
        by_state = ", ".join(
            f"{s}: {n}" for r in keys for s, n in r.get("samples_by_state", {}).items()
        )
        lines += [
            f"**Leaked keys: {leaked}** — the session's API key was looked for in every",
            f"process's argv on both sides ({samples} samples of `ps -ww -eo args` on the host,",
            "the same inside the compute node's namespace, and `/proc/*/cmdline`), by session",
            f"state: {by_state}.",
            "",
        ]
    else:
        lines += ["**Leaked keys: not measured** (the API key test did not run).", ""]

    isolation = [r for r in rows if test_for(r["fault"]) == ISOLATION_TEST]
    if isolation:
        tries = sum(int(r["tries"]) for r in isolation)
        answered = sum(int(r["tries"]) - int(r["survived"]) for r in isolation)
        lines += [
            f"**Isolation: {answered} of {tries} tries answered 200** — as a second cluster user",
            "on the compute node, every listener (TCP port or unix socket) of the session's vLLM",
            "process was sent `/invocations`, `/tokenize` and `/v1/completions` (route `jump`).",
            "",
        ]
    else:
        lines += ["**Isolation: not measured** (the isolation test did not run).", ""]

    for r in rows:
        times = r.get("recoveries_s") or []
        if len(times) > 1:
            lines += [
                f"{r['fault']}: {len(times)} recoveries, min {min(times):.2f} s, median "
                f"{statistics.median(times):.2f} s, max {max(times):.2f} s.",
                "",
            ]

    lines += ["## What is measured", ""]
    for row in rows:
        if row.get("note"):
            state = f" (state when interrupted: {row['state_hit']})" if row.get("state_hit") else ""
            lines.append(f"* {row['fault']}: {row['note']}{state}.")
    lines += [
        "* Every test ends by checking that no job of the session is left in squeue and no",
        "  ssh process of the tool is still running.",
        "",
    ]
    failed = [(t, m) for t, (s, m) in sorted(tests.items()) if s in ("failed", "error")]
    if failed:
        lines += ["## Failures", ""]
        for test, message in failed:
            lines.append(f"* `{test}`: {message[:400]}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "concepts" / "reliability.md")
    parser.add_argument(
        "--tool-src",
        type=Path,
        default=REPO,
        help="directory whose alvis_fsm the tests run (default: this checkout)",
    )
    parser.add_argument("-k", dest="select", default="", help="pytest -k expression")
    parser.add_argument("--results", type=Path, help="keep the raw JSON lines here")
    args = parser.parse_args(argv)
    if args.tool_src.resolve() != REPO and shutil.which("alvis-fsm"):
        # tests/integration/tool.py prefers an installed console script.
        print(
            f"warning: alvis-fsm is installed; the tests may run it, not {args.tool_src}",
            file=sys.stderr,
        )

    with tempfile.TemporaryDirectory(prefix="afsm-reliability-") as tmp:
        results = args.results or Path(tmp) / "results.jsonl"
        results.unlink(missing_ok=True)
        junit = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *map(str, TESTS),
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfE",
            f"--junitxml={junit}",
            f"--rootdir={REPO}",
        ]
        if args.select:
            cmd += ["-k", args.select]
        env = {**os.environ, RESULTS_ENV: str(results)}
        source = describe_source(args.tool_src)
        before = fingerprint(args.tool_src)
        t0 = time.monotonic()
        # The tool runs as `python -m alvis_fsm` from the working directory.
        status = subprocess.run(cmd, cwd=args.tool_src, env=env, check=False).returncode
        duration = time.monotonic() - t0
        rows = (
            [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
            if results.exists()
            else []
        )
        tests = outcomes(junit)

    command = "python tools/reliability.py" + (f" -k {args.select!r}" if args.select else "")
    if args.tool_src.resolve() != REPO:
        command += f" --tool-src {args.tool_src}"
    after = fingerprint(args.tool_src)
    source += f" (source hash {before})"
    if after != before:
        # Someone edited the tool while the faults ran: the numbers mix versions.
        source += f" — CHANGED DURING THE RUN (now {after}); rerun for numbers of one version"
        status = status or 1
    text = render(rows, tests, source, duration, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({len(rows)} faults measured; pytest exit {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
