"""GPUs chosen for the model, on the lab's two GPU types (issue 15).

The lab has one A40 node (alvis7-07, 4 × 48 GB) and one A100fat node
(alvis4-01, 4 × 80 GB) in one partition, snapshots with real models'
config.json and sparse weights of their real sizes, and a vllm stand-in
that fails as vLLM does when the weights or the context do not fit the GPUs
it was given. ``slurm.gpus`` is ``auto`` by default: the fewest GPUs of the
first type in ``fit.auto_types`` (A40, A100, A100fat) that fit and that some
node has free now. Blockers (tests/lab/blocker) make each case deterministic.

lab-qwen-32b: Qwen2.5-32B-Instruct, 65.5 GB of bf16 weights, 8192 tokens:
two A40s (32.8 GB each + KV) or one A100fat (65.5 GB + 2.1 GB of KV ≤ 69 GB).
lab-llama-405b: Llama-3.1-405B-Instruct, 812 GB: fits no node of the lab."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pexpect
import pytest
from tool import Tool, assert_nothing_left, exit_status, free_port, interrupt, tool_jobs

CONNECTED = "✓ Connection successful! Server available at http://localhost:"
NEED_32B = "66 GB of weights + 2.1 GB of KV cache for 8192 tokens"


def _gres(lab: Any, job_id: str) -> str:
    """The job's GPU request as the scheduler (root) sees it."""
    return str(lab.run(["squeue", "-h", "-j", job_id, "-o", "%b"]).stdout.strip())


def _serve_and_stop(
    lab: Any, tool: Tool, model: str, choice: str, node: str, loaded: str = ""
) -> str:
    """Start with the default --gpus (auto), expect ``choice`` on ``node``,
    reach serving (and, when given, the ``loaded`` log line: the log stream
    delivers it after "Streaming logs"), stop with Ctrl+C; the whole transcript."""
    port = free_port()
    child = tool.spawn("start", "-m", model, "--port", str(port), timeout=180)
    child.expect_exact(f"GPUs (--gpus auto): {choice}")
    child.expect(r"Job submitted: (\d+)")
    job_id = child.match.group(1)
    child.expect_exact(f"Job is running on node: {node}")
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Streaming logs")
    # The load log is not replayed after the ready block: `logs` shows it.
    load_log = tool.run_piped("logs", model, "-n", "200").stdout if loaded else ""
    assert loaded in load_log, load_log[-3000:]
    gres = _gres(lab, job_id)
    interrupt(child)
    child.expect_exact(f"Cleaned up job {job_id} successfully", timeout=60)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    out: str = child.logfile_read.text + load_log
    assert exit_status(child) == 0, out[-3000:]
    spec = choice.split(" ", 1)[0]
    assert gres.endswith(f"gpu:{spec}"), gres  # what was asked of SLURM
    record = json.loads((tool.state_dir / "sessions" / f"{model}.json").read_text())
    assert record["gpus"] == spec
    return out


# holds the four A100fats with a blocker, and wants all four A40s free
@pytest.mark.exclusive
def test_65gb_model_gets_two_a40s_while_the_a100fat_node_is_busy(lab: Any, tool: Tool) -> None:
    with lab.blocker("A100fat"):
        out = _serve_and_stop(
            lab,
            tool,
            "lab-qwen-32b",
            f"A40:2 — {NEED_32B}; 4 of 4 A40 free now on {lab.node}",
            lab.node,
            loaded="Model loading took 30.51 GiB",
        )
    # The stand-in loaded half of the weights on each of its two GPUs.
    assert "Model loading took 30.51 GiB" in out, out[-3000:]
    assert_nothing_left(lab, tool)


# holds the four A40s with a blocker, and wants all four A100fats free
@pytest.mark.exclusive
def test_65gb_model_gets_one_80gb_gpu_while_the_a40s_are_busy(lab: Any, tool: Tool) -> None:
    with lab.blocker("A40"):
        out = _serve_and_stop(
            lab,
            tool,
            "lab-qwen-32b",
            f"A100fat:1 — {NEED_32B}; 4 of 4 A100fat free now on {lab.node2}",
            lab.node2,
            loaded="Model loading took 61.03 GiB",
        )
    assert "Model loading took 61.03 GiB" in out, out[-3000:]
    assert_nothing_left(lab, tool)


def test_model_too_large_for_any_count_is_refused_before_submitting(lab: Any, tool: Tool) -> None:
    since = (dt.datetime.now() - dt.timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S")
    status, out = tool.run("start", "-m", "lab-llama-405b", "--port", str(free_port()))
    assert status == 3, out[-3000:]  # ExitCode.CONFIG
    assert (
        "The model does not fit on one node of any GPU type: it needs 812 GB of weights"
        " + 4.2 GB of KV cache for 8192 tokens"
    ) in out, out
    # The numbers of every allowed type, at its largest count.
    assert (
        "A40:4: 161 GB usable (4 × 48 GB × 0.9 − 3 GB margin each); the weights alone do not fit"
        in out
    )
    assert (
        "A100fat:4: 276 GB usable (4 × 80 GB × 0.9 − 3 GB margin each); the weights alone do not fit"
        in out
    )
    assert "Job submitted" not in out
    # Nothing reached the scheduler: no job of the user in root's squeue or in accounting.
    assert lab.jobs() == []
    names = lab.run(
        ["sacct", "-u", lab.user, "-X", "-n", "-P", "-S", since, "-o", "JobName"]
    ).stdout
    assert "lab-llama-405b" not in names, names
    assert_nothing_left(lab, tool)


def test_explicit_gpus_too_small_warns_then_fails_with_the_oom(lab: Any, tool: Tool) -> None:
    status, out = tool.run(
        "start", "-m", "lab-qwen-32b", "--gpus", "A40:1", "--port", str(free_port()), timeout=180
    )
    assert status == 6, out[-3000:]  # ExitCode.SERVER
    warning = "A40:1 cannot hold the weights: 66 GB against 40 GB usable; expect CUDA out of memory"
    assert warning in out, out[-3000:]
    assert out.index(warning) < out.index("Job submitted")  # said before submitting
    assert "GPUs (--gpus auto)" not in out  # the explicit choice was kept
    assert "torch.OutOfMemoryError: CUDA out of memory" in out
    assert "GPU 0 has a total capacity of 44.35 GiB" in out  # one A40, as torch sees it
    assert "Cleaned up job" in out
    assert tool_jobs(lab, tool) == []
    assert_nothing_left(lab, tool)


def test_computed_kv_refusal_is_retried_with_the_length_that_fits(lab: Any, tool: Tool) -> None:
    """The stand-in computes what fits (no fixed fault length): on one A100fat
    with vLLM given 80 % of the GPU, 65.5 GB of weights leave room for 3248
    tokens (0.8 × 79.15 GiB − 61.03 GiB − 1.5 GiB of activations, at 256 KiB
    per token, in blocks of 16); the tool starts once more with that."""
    port = free_port()
    child = tool.spawn(
        "start",
        "-m",
        "lab-qwen-32b",
        "--gpus",
        "A100fat:1",
        "--port",
        str(port),
        timeout=180,
        ALVIS_FSM_VLLM__EXTRA_ARGS='["--gpu-memory-utilization", "0.8"]',
    )
    child.expect(r"Job submitted: (\d+)")
    first = child.match.group(1)
    child.expect_exact(f"Cleaned up job {first} successfully")
    child.expect_exact("Starting once more with max_model_len 3248")
    child.expect(r"Job submitted: (\d+)")
    second = child.match.group(1)
    child.expect_exact(f"Job is running on node: {lab.node2}")
    child.expect_exact(CONNECTED + str(port))
    child.expect_exact("Streaming logs")
    interrupt(child)
    child.expect_exact(f"Cleaned up job {second} successfully", timeout=60)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    out: str = child.logfile_read.text
    assert exit_status(child) == 0, out[-3000:]
    assert "the estimated maximum model length is 3248" in out
    assert "(2.00 GiB KV cache is needed" in out  # 8192 tokens × 256 KiB
    assert_nothing_left(lab, tool)
