#!/usr/bin/env python3
"""Benchmark `alvis-fsm batch` on the lab cluster (tests/lab), issue 23.

    python bench/batch.py [--smoke] [--lines N] [--out bench/results-batch.md]

One run, with the lab lock held throughout (tests and other benchmarks wait):

  1. scale-out: the same work on `lab-slow` (each request 0.25 s, at most 4
     at once per server: the figure is the tool's, not this machine's two
     cores) with 1, 2 and 4 shards; throughput from the first to the last
     result (start-ups excluded), goal >= 0.9 x N of one shard
  2. a shard requeued (`scontrol requeue`) at 50 %: lines lost (goal 0),
     written twice (goal 0), and redone (sent again; goal <= the runner's
     concurrency), from the shard's own run records
  3. N short lines (default 20 000, --lines 100000 as the issue asks) on the
     instant stand-in (`lab-ok`): time per request end to end on the node
     (an upper bound of the runner's own overhead), and the laptop's peak
     memory for `batch submit` and `batch results` at N/4 and N lines
  4. against `vllm run-batch` on the real vLLM (`tiny-real`, the lab's
     /opt/alvis-lab-vllm): the same chat input (--real-lines lines, each
     --real-tokens tokens with ignore_eos, so both generate the same tokens)
     through the batch runner (one shard) and through `vllm run-batch` in a
     job on the same node with the same server arguments; requests/s and
     generated tokens/s excluding both start-ups (goal >= 0.95x run-batch's).
     Both over the same stretch: from the moment C answers were in to the
     last answer, where C is what run-batch's progress bar (refreshed every
     5 s, each refresh stamped with the node's clock on arrival) first shows
     above 0; the runner's from its results' times. So both start-ups and the
     first request's warm-up (a compile on this CPU build) are excluded.
     tokens/s = requests/s x the mean generated tokens per line (from the
     answers' usage). Run --real-runs times (default 3): each figure is
     the median run's, with every run's ratio beside it, since the lab's two
     cores are shared and one run moves with the load. Skipped
     when the lab has no real vLLM. `--real-only` runs this part alone and
     replaces its rows in the results file
  5. local only (no lab): the laptop's peak memory (RSS) of validating N/4
     and N lines and merging their results from shard files, in a child
     process each (`--local-only` runs just this part, without root)

Each batch is submitted with the CLI and then left alone (no client runs
while it works); the benchmark reads the result files on the cluster as the
cluster user. Exit status: 0 when the tool worked (missed goals are
reported), 1 when it failed (a batch not completed, a line lost or
duplicated, jobs left), 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))

from conftest import Lab, bring_up_lab, lab_lock  # noqa: E402
from tool import tool_argv  # noqa: E402

from alvis_fsm.engine.batch.service import CONCURRENCY  # noqa: E402

REAL_VLLM = Path("/opt/alvis-lab-vllm/bin/vllm")
REAL_MODEL = "tiny-real"
REAL_ROW = "| vs `vllm run-batch` on the real vLLM"
SLOW_RATE = 16.0  # lab-slow: 4 at once, 0.25 s each


class Client:
    """The CLI as a user runs it: its own HOME and state dir."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.root = root
        (root / "home").mkdir(parents=True, exist_ok=True)
        self.state = Path(tempfile.mkdtemp(prefix="afsm-b-", dir="/tmp"))
        self.env = {
            **lab.env,
            "HOME": str(root / "home"),
            "ALVIS_FSM_SESSION__STATE_DIR": str(self.state),
            "TERM": "dumb",
            "NO_COLOR": "1",
        }

    def run(self, *args: str, timeout: float = 600) -> tuple[str, int]:
        """(stdout, 0) of one CLI run; raises on failure."""
        proc = subprocess.run(
            [*tool_argv(), *args],
            env=self.env,
            cwd=self.root,
            text=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"alvis-fsm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        return proc.stdout, 0

    def run_dirs(self) -> list[str]:
        out = []
        for path in (self.state / "batches").glob("batch_*.json"):
            out.append(str(json.loads(path.read_text())["run_dir"]))
        return out

    def status(self, batch_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("batch", "status", batch_id, "--json")[0])
        return data


def peak_rss(client: Client, *args: str) -> tuple[str, int]:
    """Run the CLI and return (stdout, its peak RSS in KiB): the child's own
    VmHWM, sampled every 50 ms until it exits (wait4's ru_maxrss would
    include this benchmark's RSS at the fork: Linux keeps the larger across
    execve); ru_maxrss where there is no /proc."""
    proc = subprocess.Popen(
        [*tool_argv(), *args],
        env=client.env,
        cwd=client.root,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    hwm = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            try:
                with open(f"/proc/{proc.pid}/status") as status:
                    hwm[0] = max(
                        hwm[0], *(int(x.split()[1]) for x in status if x.startswith("VmHWM:"))
                    )
            except (OSError, ValueError, TypeError):
                continue

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err: list[str] = []
    reader = threading.Thread(
        target=lambda: err.append(proc.stderr.read() if proc.stderr else ""), daemon=True
    )
    reader.start()
    out = proc.stdout.read()
    reader.join()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"alvis-fsm {' '.join(args)} failed ({proc.returncode}):\n{''.join(err)[-2000:]}"
        )
    return out, hwm[0] or usage.ru_maxrss


LOCAL_CHILD = """
import json, sys
from pathlib import Path
from alvis_fsm.engine.batch import service as batch_service
from alvis_fsm.engine.batch.input import validate
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.results import write_results
src, raw, out, err = map(Path, sys.argv[1:5])
resolve = {"lab-ok": ("lab-ok", "alvislab/tiny-ok")}
valid = validate(batch_service.read_input(src), resolve)
with raw.open(encoding="utf-8") as lines:
    counts = write_results(valid.iter_ids(), lines, BatchStatus.COMPLETED, out, err)
# The child's own peak (VmHWM): ru_maxrss would include the parent's RSS at
# the fork (Linux keeps the larger of the two across execve).
try:
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
except (OSError, StopIteration):
    import resource
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"total": valid.total, "ok": counts[0], "errors": counts[1], "hwm_kib": hwm}))
"""


def local_memory(root: Path, lines: int) -> dict[str, Any]:
    """Peak RSS (MiB) of validate + merge, as `batch submit` and `batch
    results` do them, for N/4 and N lines: no network, so the figure is the
    streaming's alone. The shards' raw results come in completion order
    (reversed within each of 4 shards)."""
    result: dict[str, Any] = {}
    for n in (lines // 4, lines):
        src = root / f"local-{n}.jsonl"
        ids = write_input(src, n, "lab-ok")
        raw = root / f"local-{n}.raw"
        with raw.open("w") as handle:
            for k in range(4):
                for i in reversed(range(k * n // 4, (k + 1) * n // 4)):
                    handle.write(
                        json.dumps(
                            {
                                "id": f"batch_req_{i}",
                                "custom_id": ids[i],
                                "_i": i,
                                "error": None,
                                "response": {
                                    "status_code": 200,
                                    "request_id": str(i),
                                    "body": {"choices": [{"text": "ok"}]},
                                },
                            }
                        )
                        + "\n"
                    )
        del ids
        started = time.monotonic()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LOCAL_CHILD,
                str(src),
                str(raw),
                str(root / "lo.jsonl"),
                str(root / "le.jsonl"),
            ],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait()
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"local validate+merge failed:\n{err[-2000:]}")
        counts = json.loads(out)
        hwm = counts.pop("hwm_kib")
        if counts != {"total": n, "ok": n, "errors": 0}:
            raise RuntimeError(f"local validate+merge: {counts}, expected {n} ok")
        result[str(n)] = {"rss_mib": hwm / 1024, "seconds": seconds}
    return result


def write_input(path: Path, n: int, model: str) -> list[str]:
    ids = [f"r{i:07d}" for i in range(n)]
    with path.open("w") as handle:
        for cid in ids:
            handle.write(
                json.dumps(
                    {
                        "custom_id": cid,
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": {"model": model, "prompt": cid, "max_tokens": 5},
                    }
                )
                + "\n"
            )
    return ids


def jobs_of(lab: Lab, batch_id: str) -> list[str]:
    out = lab.run(
        ["squeue", "-h", "-u", lab.user, "-n", f"alvis-fsm-{batch_id}", "-o", "%i"]
    ).stdout
    return out.split()


def wait_gone(lab: Lab, batch_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while jobs_of(lab, batch_id):
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {batch_id} still has jobs after {timeout:.0f} s")
        time.sleep(1)


def cluster_rows(lab: Lab, run_dir: str) -> list[dict[str, Any]]:
    text = lab.login(f"cat {run_dir}/results/shard-*.jsonl", timeout=300).stdout
    return [json.loads(x) for x in text.splitlines() if x]


def cluster_runs(lab: Lab, run_dir: str) -> list[dict[str, Any]]:
    text = lab.login(f"cat {run_dir}/results/shard-*.runs", check=False).stdout
    return [json.loads(x) for x in text.splitlines() if x]


def throughput(rows: list[dict[str, Any]]) -> float:
    times = sorted(float(r["_t"]) for r in rows)
    return (
        (len(times) - 1) / (times[-1] - times[0])
        if len(times) > 1 and times[-1] > times[0]
        else 0.0
    )


def submit(client: Client, path: Path, *args: str) -> str:
    out, _ = client.run("batch", "submit", str(path), *args)
    return out.strip()


def check_complete(
    client: Client, lab: Lab, batch_id: str, ids: list[str]
) -> tuple[list[dict[str, Any]], str]:
    data = client.status(batch_id)
    if data["status"] != "completed":
        raise RuntimeError(f"batch {batch_id} ended {data['status']}: {data.get('errors')}")
    rows = cluster_rows(lab, data["run_dir"])
    written = [r["custom_id"] for r in rows]
    if sorted(written) != ids:
        lost = len(set(ids) - set(written))
        raise RuntimeError(
            f"batch {batch_id}: {lost} lost, {len(written) - len(set(written))} written twice"
        )
    return rows, data["run_dir"]


def scale_out(client: Client, lab: Lab, per_shard: int) -> list[tuple[int, float]]:
    out = []
    for shards in (1, 2, 4):
        ids = write_input(client.root / f"slow-{shards}.jsonl", per_shard * shards, "lab-slow")
        batch_id = submit(
            client, client.root / f"slow-{shards}.jsonl", "--jobs", str(shards), "-t", "15"
        )
        wait_gone(lab, batch_id, 600)
        rows, _ = check_complete(client, lab, batch_id, ids)
        out.append((shards, throughput(rows)))
    return out


def requeue(client: Client, lab: Lab, lines: int) -> dict[str, Any]:
    ids = write_input(client.root / "requeue.jsonl", lines, "lab-slow")
    batch_id = submit(client, client.root / "requeue.jsonl", "-t", "15")
    deadline = time.monotonic() + 300
    while True:
        data = client.status(batch_id)
        if data["request_counts"]["completed"] >= lines // 2:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the requeue batch did not reach 50 %")
        time.sleep(0.5)
    at = data["request_counts"]["completed"]
    lab.run(["scontrol", "requeue", data["job_id"]])
    wait_gone(lab, batch_id, 600)
    data = client.status(batch_id)
    rows = cluster_rows(lab, data["run_dir"])
    written = [r["custom_id"] for r in rows]
    runs = cluster_runs(lab, data["run_dir"])
    return {
        "status": data["status"],
        "at": at,
        "lost": len(set(ids) - set(written)),
        "twice": len(written) - len(set(written)),
        "runs": len(runs),
        "redone": sum(int(r["sent"]) for r in runs) - lines,
    }


def overhead(client: Client, lab: Lab, lines: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for n in (lines // 4, lines):
        path = client.root / f"short-{n}.jsonl"
        ids = write_input(path, n, "lab-ok")
        out, submit_rss = peak_rss(client, "batch", "submit", str(path), "-t", "30")
        batch_id = out.strip()
        wait_gone(lab, batch_id, 1800)
        rows, _ = check_complete(client, lab, batch_id, ids)
        _, results_rss = peak_rss(
            client,
            "batch",
            "results",
            batch_id,
            "-o",
            str(client.root / "o.jsonl"),
            "--errors",
            str(client.root / "e.jsonl"),
        )
        rate = throughput(rows)
        result[str(n)] = {
            "rate": rate,
            "per_request_ms": 1000 / rate if rate else None,
            "submit_rss_mib": submit_rss / 1024,
            "results_rss_mib": results_rss / 1024,
        }
    return result


def write_chat_input(path: Path, n: int, model: str, tokens: int) -> list[str]:
    ids = [f"c{i:06d}" for i in range(n)]
    with path.open("w") as handle:
        for cid in ids:
            body = {
                "model": model,
                "max_tokens": tokens,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Say something about {cid}"}],
            }
            handle.write(
                json.dumps(
                    {
                        "custom_id": cid,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                + "\n"
            )
    return ids


# `vllm run-batch` in a job on the node the runner used, with the server
# arguments of the batch's own job script (its variables, read from job.sh),
# each output line stamped with the node's clock on arrival.
RUN_BATCH_JOB = """#!/usr/bin/env bash
#SBATCH --job-name alvis-fsm-bench-run-batch
#SBATCH --time 20
#SBATCH --nodes 1
#SBATCH --nodelist {node}
#SBATCH --output run-batch.slurm
{sbatch}
set -u
cd {run_dir}
STAMP={stamp}
eval "$(grep -E '^(HF_MODEL|MODEL_NAME|SIF_IMAGE|MAX_MODEL_LEN|EXTRA)=' job.sh)"
export XDG_CACHE_HOME="${{TMPDIR:-/tmp}}/xdg-cache" VLLM_CACHE_ROOT="${{TMPDIR:-/tmp}}/vllm-cache"
apptainer exec "$SIF_IMAGE" vllm run-batch -i input.jsonl -o run-batch-output.jsonl \\
    --model "$HF_MODEL" --served-model-name "$MODEL_NAME" --max-model-len "$MAX_MODEL_LEN" \\
    --tensor-parallel-size "${{SLURM_GPUS_ON_NODE:-1}}" "${{EXTRA[@]}}" 2>&1 \\
    | python3 -u -c "$STAMP" >run-batch.log
echo "exit ${{PIPESTATUS[0]}}" >>run-batch.log
"""
# Each line (and each tqdm refresh, which ends in a carriage return) with the
# node's clock at its arrival.
STAMP = r"""
import sys, time
buf = b""
while chunk := sys.stdin.buffer.read1(65536):
    buf += chunk.replace(b"\r", b"\n")
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if line.strip():
            sys.stdout.write("%.3f %s\n" % (time.time(), line.decode(errors="replace")))
"""


def vs_run_batch(client: Client, lab: Lab, lines: int, tokens: int) -> dict[str, Any]:
    path = client.root / "real.jsonl"
    ids = write_chat_input(path, lines, REAL_MODEL, tokens)
    batch_id = submit(client, path, "--jobs", "1", "-t", "20")
    wait_gone(lab, batch_id, 900)
    rows, run_dir = check_complete(client, lab, batch_id, ids)
    runner_tokens = sum(int(r["response"]["body"]["usage"]["completion_tokens"]) for r in rows)
    times = sorted(float(r["_t"]) for r in rows)
    events = lab.login(f"cat {run_dir}/shards/0/events").stdout
    node = [line.split()[-1] for line in events.splitlines() if " start job " in line][-1]
    header = lab.login(f"cat {run_dir}/job.sh").stdout.splitlines()
    sbatch = "\n".join(
        line
        for line in header
        if line.startswith("#SBATCH")
        and line.split()[1].split("=")[0] in ("--account", "--gpus-per-node", "--partition")
    )
    job = RUN_BATCH_JOB.format(node=node, sbatch=sbatch, run_dir=run_dir, stamp=shlex.quote(STAMP))
    lab.run([*lab.ssh_argv(lab.login_host), "--", f"cat > {run_dir}/run-batch.sh"], input=job)
    job_id = (
        lab.login(f"cd {run_dir} && sbatch --parsable run-batch.sh").stdout.strip().split(";")[0]
    )
    deadline = time.monotonic() + 900
    while lab.job_state(job_id):
        if time.monotonic() > deadline:
            lab.run(["scancel", job_id], check=False)
            raise RuntimeError(f"vllm run-batch (job {job_id}) did not end in 900 s")
        time.sleep(2)
    log = lab.login(f"cat {run_dir}/run-batch.log", check=False).stdout
    # Its tqdm bar ("Running batch: ... | 37/400 [...]"), as the runner's
    # results: from the first answer seen to the last (warm-up excluded).
    seen = [
        (float(m[1]), int(m[2]))
        for m in re.finditer(r"^(\S+) Running batch:.*?\| *(\d+)/(\d+)", log, re.M)
    ]
    done = [(t, n) for t, n in seen if n > 0]
    if not log.rstrip().endswith("exit 0") or not done or done[-1][1] != lines:
        raise RuntimeError(f"vllm run-batch failed:\n{log[-3000:]}")
    first = done[0]
    last = next((t, n) for t, n in done if n == lines)
    if first[1] >= lines:
        raise RuntimeError(
            "vllm run-batch's progress showed no answer before the last: give it more lines"
        )
    out = [
        json.loads(x)
        for x in lab.login(f"cat {run_dir}/run-batch-output.jsonl").stdout.splitlines()
        if x
    ]
    if sorted(r["custom_id"] for r in out) != ids or any(
        r["response"]["status_code"] != 200 for r in out
    ):
        raise RuntimeError("vllm run-batch did not answer every line with 200")
    rb_tokens = sum(int(r["response"]["body"]["usage"]["completion_tokens"]) for r in out)
    # The same stretch for both: from the moment `first[1]` answers were in
    # (run-batch's first refresh after its first answer) to the last answer.
    since = max(first[1], 1)
    spans = {"runner": times[-1] - times[since - 1], "run_batch": last[0] - first[0]}
    used = {"runner": runner_tokens, "run_batch": rb_tokens}
    result: dict[str, Any] = {
        "lines": lines,
        "tokens_per_line": tokens,
        "node": node,
        "from_answers": since,
    }
    for who, span in spans.items():
        rate = (lines - since) / span
        result[who] = {
            "span_s": span,
            "req_s": rate,
            "tok_s": rate * used[who] / lines,
            "tokens": used[who],
        }
    # The whole batch, from its start to the last answer (the server's
    # start-up excluded, the warm-up and every request's preparation in the
    # API server included): the runner from its start (its run record, once
    # the server is ready), run-batch from its bar's first refresh (0/N: made
    # just before it awaits every request at once). The stretch above leaves
    # out what run-batch prepares before its first answer (all N requests'
    # chat template and tokens) but not what the runner's server prepares
    # after (the requests it sends as slots free up).
    started = min(float(r["started"]) for r in cluster_runs(lab, run_dir))
    whole = {"runner": times[-1] - started, "run_batch": last[0] - seen[0][0]}
    result["whole"] = {who: {"span_s": span, "req_s": lines / span} for who, span in whole.items()}
    return result


def ratios(run: dict[str, Any]) -> dict[str, float]:
    """One comparison's runner / run-batch ratios: requests/s and tokens/s
    first answer to last, requests/s over the whole batch."""
    runner, rb = run["runner"], run["run_batch"]
    out = {"req": runner["req_s"] / rb["req_s"], "tok": runner["tok_s"] / rb["tok_s"]}
    if "whole" in run:
        out["whole"] = run["whole"]["runner"]["req_s"] / run["whole"]["run_batch"]["req_s"]
    return out


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ratio `key` is the median (the lower middle of an even count)."""
    ranked = sorted((r for r in runs if key in ratios(r)), key=lambda r: ratios(r)[key])
    return ranked[(len(ranked) - 1) // 2]


def real_rows(real: dict[str, Any] | None, why: str = "") -> list[str]:
    """The run-batch rows: each figure is the median run's, with every run's
    ratio beside it (the lab's two cores are shared, so one run is noise)."""
    if real is None:
        return [f"{REAL_ROW} | not run: {why} | >= 0.95x | — |"]
    runs = real["runs"]
    first = runs[0]
    what = (
        f"{first['lines']} chat lines x {first['tokens_per_line']} tokens, tiny-real, one node; "
        f"median of {len(runs)} run(s)"
    )
    rows = []
    for key, label, unit, fmt in (
        ("req", "requests/s", "req_s", ".1f"),
        ("tok", "generated tokens/s", "tok_s", ".0f"),
    ):
        mid = median_run(runs, key)
        ratio = ratios(mid)[key]
        each = ", ".join(f"{ratios(r)[key]:.2f}x" for r in runs)
        rows.append(
            f"{REAL_ROW} ({what}): {label} | runner {mid['runner'][unit]:{fmt}}, run-batch "
            f"{mid['run_batch'][unit]:{fmt}} ({ratio:.2f}x; each run: {each}) | >= 0.95x | "
            f"{'yes' if ratio >= 0.95 else 'no'} |"
        )
    if all("whole" in r for r in runs):
        mid = median_run(runs, "whole")
        w_r, w_b = mid["whole"]["runner"], mid["whole"]["run_batch"]
        ratio = ratios(mid)["whole"]
        each = ", ".join(f"{ratios(r)['whole']:.2f}x" for r in runs)
        rows.append(
            f"{REAL_ROW} ({what}): requests/s over the whole batch (start to last answer, warm-up and "
            f"request preparation included) | runner {w_r['req_s']:.1f} ({w_r['span_s']:.0f} s), run-batch "
            f"{w_b['req_s']:.1f} ({w_b['span_s']:.0f} s) ({ratio:.2f}x; each run: {each}) | >= 0.95x | "
            f"{'yes' if ratio >= 0.95 else 'no'} |"
        )
    return rows


def local_rows(local: dict[str, Any]) -> list[str]:
    sizes = list(local.values())
    flat = len(sizes) < 2 or sizes[-1]["rss_mib"] <= 1.2 * sizes[0]["rss_mib"]
    return [
        f"| {n} lines, local only: peak RSS of validate + merge (as submit / results) | "
        f"{v['rss_mib']:.0f} MiB ({v['seconds']:.1f} s) | flat (<= 1.2x from N/4 to N) | "
        f"{'yes' if flat else 'no'} |"
        for n, v in local.items()
    ]


def report(
    args: argparse.Namespace,
    scale: list[tuple[int, float]],
    rq: dict[str, Any],
    ov: dict[str, Any],
    real: dict[str, Any] | None,
    why: str,
    local: dict[str, Any],
) -> str:
    one = scale[0][1] if scale else 0.0
    rows = ["| measure | value | goal | met |", "| --- | --- | --- | --- |"]
    for shards, rate in scale:
        ratio = rate / one if one else 0.0
        goal = 0.9 * shards
        rows.append(
            f"| scale-out, {shards} shard(s), lab-slow | {rate:.1f} req/s ({ratio:.2f}x one; "
            f"ideal {SLOW_RATE * shards:.0f}) | >= {goal:.1f}x one | "
            f"{'yes' if shards == 1 or ratio >= goal else 'no'} |"
        )
    rows.append(
        f"| requeue at 50 % ({rq['at']} of {args.requeue_lines} done) | lost {rq['lost']}, "
        f"written twice {rq['twice']}, redone {rq['redone']} (in {rq['runs']} runs) | 0, 0, "
        f"<= {CONCURRENCY} | {'yes' if rq['lost'] == 0 and rq['twice'] == 0 and rq['redone'] <= CONCURRENCY else 'no'} |"
    )
    sizes = list(ov.values())
    flat = len(sizes) < 2 or all(
        sizes[-1][k] <= 1.2 * sizes[0][k] for k in ("submit_rss_mib", "results_rss_mib")
    )
    for n, v in ov.items():
        per = v["per_request_ms"]
        rows.append(
            f"| {n} short lines on lab-ok: time per request on the node | "
            f"{per:.3f} ms ({v['rate']:.0f} req/s) | (runner + stand-in, 2 cores) | — |"
        )
        rows.append(
            f"| {n} lines: laptop peak RSS, submit / results | {v['submit_rss_mib']:.0f} MiB / "
            f"{v['results_rss_mib']:.0f} MiB | flat (<= 1.2x from N/4 to N) | "
            f"{'yes' if flat else 'no'} |"
        )
    rows.extend(local_rows(local))
    rows.extend(real_rows(real, why))
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"# Batch benchmark ({'smoke' if args.smoke else 'full'})\n\nWritten by `bench/batch.py` "
        f"on {when}; do not edit by hand.\n\n" + "\n".join(rows) + "\n\n"
        f"Details: {json.dumps({'scale_out': scale, 'requeue': rq, 'short_lines': ov, 'run_batch': real, 'local': local})}\n"
    )


def replace_real_rows(text: str, real: dict[str, Any]) -> str:
    """The results file with its run-batch rows replaced (--real-only)."""
    lines = [line for line in text.splitlines() if not line.startswith(REAL_ROW)]
    at = max(i for i, line in enumerate(lines) if line.startswith("|")) + 1
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines[at:at] = real_rows(real)
    lines = [line for line in lines if not line.startswith("Details of the run-batch comparison")]
    lines.append(
        f"Details of the run-batch comparison ({when}, `bench/batch.py --real-only`): {json.dumps(real)}"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--lines", type=int, default=0, help="short lines on lab-ok (default 20000; smoke 4000)"
    )
    parser.add_argument(
        "--real-only", action="store_true", help="only the comparison with vllm run-batch"
    )
    parser.add_argument(
        "--real-lines", type=int, default=0, help="chat lines on tiny-real (default 400; smoke 100)"
    )
    parser.add_argument("--real-tokens", type=int, default=16, help="tokens per line (ignore_eos)")
    parser.add_argument(
        "--real-runs",
        type=int,
        default=0,
        help="comparisons with run-batch, the median reported (default 3; smoke 1)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--local-only",
        action="store_true",
        help="only the laptop's memory of validate + merge (no lab, no root)",
    )
    args = parser.parse_args(argv)
    lines = args.lines or (4000 if args.smoke else 20000)
    real_lines = args.real_lines or (100 if args.smoke else 400)
    real_runs = args.real_runs or (1 if args.smoke else 3)
    if args.local_only:
        with tempfile.TemporaryDirectory(prefix="afsm-bench-local-") as tmp:
            local = local_memory(Path(tmp), lines)
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        text = (
            f"# Batch benchmark (local only)\n\nWritten by `bench/batch.py --local-only` on {when}; "
            "do not edit by hand.\n\n| measure | value | goal | met |\n| --- | --- | --- | --- |\n"
            + "\n".join(local_rows(local))
            + f"\n\nDetails: {json.dumps({'local': local})}\n"
        )
        (args.out or BENCH / "results-batch-local.md").write_text(text)
        print(text)
        return 0
    per_shard = 120 if args.smoke else 320
    args.requeue_lines = 240 if args.smoke else 480
    out = args.out or BENCH / ("results-batch-smoke.md" if args.smoke else "results-batch.md")
    if os.geteuid() != 0:
        print("bench/batch.py needs root (the lab does)", file=sys.stderr)
        return 2
    if args.real_only and not (REAL_VLLM.exists() and out.exists()):
        print(
            f"--real-only needs {REAL_VLLM} (tests/lab/up installs it) and {out} of a full run",
            file=sys.stderr,
        )
        return 2
    scale: list[tuple[int, float]] = []
    rq: dict[str, Any] = {}
    local: dict[str, Any] = {}
    ov: dict[str, Any] = {}
    real: dict[str, Any] | None = None
    why = "" if REAL_VLLM.exists() else f"the lab has no real vLLM ({REAL_VLLM})"
    with lab_lock(Path(os.environ.get("ALVIS_LAB_ROOT", "/var/lib/alvis-lab"))):
        lab = bring_up_lab()
        with tempfile.TemporaryDirectory(prefix="afsm-bench-batch-") as tmp:
            client = Client(lab, Path(tmp))
            try:
                if not args.real_only:
                    scale = scale_out(client, lab, per_shard)
                    rq = requeue(client, lab, args.requeue_lines)
                    ov = overhead(client, lab, lines)
                    local = local_memory(Path(tmp), lines)
                if not why:
                    runs = []
                    for i in range(real_runs):
                        runs.append(vs_run_batch(client, lab, real_lines, args.real_tokens))
                        print(
                            f"run-batch comparison {i + 1} of {real_runs}: {ratios(runs[-1])}",
                            flush=True,
                        )
                    real = {"runs": runs}
            except RuntimeError as exc:
                print(f"FAILED: {exc}", file=sys.stderr)
                lab.cancel_all()
                return 1
            finally:
                # What this benchmark made: its batches' run dirs, its state dir.
                for run_dir in client.run_dirs():
                    if "/batch_" in run_dir:
                        lab.login(f"rm -rf -- '{run_dir}'", check=False)
                subprocess.run(["rm", "-rf", "--", str(client.state)], check=False)
    if args.real_only:
        assert real is not None
        text = replace_real_rows(out.read_text(), real)
    else:
        text = report(args, scale, rq, ov, real, why, local)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
