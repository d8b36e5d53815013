"""Parsing SLURM's answers (pure functions)."""

from __future__ import annotations

import pytest

from alvis_fsm.cluster import slurm
from alvis_fsm.cluster.slurm import JobState
from alvis_fsm.errors import SchedulerError


def test_parse_job_id_plain_and_with_cluster() -> None:
    assert slurm.parse_job_id("5382685\n") == "5382685"
    assert slurm.parse_job_id("5382685;alvis\n") == "5382685"


def test_parse_job_id_refuses_garbage() -> None:
    with pytest.raises(SchedulerError):
        slurm.parse_job_id("sbatch: error: something\n")


def test_jobinfo_from_squeue_pending() -> None:
    info = slurm.parse_jobinfo("JOB|squeue|PENDING|(null)|Resources|2026-11-27T10:00:00|1:00:00|")
    assert info.state is JobState.PENDING and info.state.waiting
    assert info.reason == "Resources" and info.start == "2026-11-27T10:00:00"
    assert info.node == ""


def test_jobinfo_from_sacct_cancelled() -> None:
    info = slurm.parse_jobinfo(
        "JOB|sacct|CANCELLED by 1001|alvis7-07|None|2026-11-27T10:00:00||0:15"
    )
    assert info.state is JobState.CANCELLED and info.state.ended
    assert info.node == "alvis7-07" and info.exit_code == "0:15"


def test_jobinfo_unknown() -> None:
    info = slurm.parse_jobinfo("JOB|none||||||")
    assert not info.known


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("Resources", "waiting for a free A40"),
        ("QOSGrpGRES", "your group's GPU limit is reached"),
        ("Priority", "other jobs are ahead of yours in the queue"),
        ("SomethingNew", "SomethingNew"),
    ],
)
def test_pending_reasons_in_words(reason: str, words: str) -> None:
    assert slurm.describe_reason(reason, "A40:1") == words


def test_root_cause_prefers_fatal_lines_and_ignores_warnings() -> None:
    lines = [
        "\x1b[33mWARNING\x1b[0m 11-27 [x.py:1] something harmless about max_model_len",
        "Traceback (most recent call last):",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    cause = slurm.root_cause(lines)
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB." in cause
    assert cause[0] != lines[0]
    assert all("\x1b" not in line for line in cause)


def test_free_gpus_counts_only_usable_nodes_of_the_type() -> None:
    lines = [
        "alvis7-07|gpu:A40:4|gpu:A40:1(IDX:0)|mix",
        "alvis7-08|gpu:A40:4(S:0)|gpu:A40:0(IDX:N/A)|idle",
        "alvis7-09|gpu:A40:4|gpu:A40:0|drain",
        "alvis8-01|gpu:T4:8|gpu:T4:0|idle",
    ]
    assert slurm.free_gpus(lines, "A40") == (7, 12, 2)
    assert slurm.free_gpus(lines, "") == (15, 20, 3)
    assert slurm.free_gpus(lines, "V100") == (0, 0, 0)
