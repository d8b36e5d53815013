"""Expected load time per model and GPU type (issue 15)."""

from __future__ import annotations

import time
from pathlib import Path

from fake_cluster import RUNNING_SACCT, make_runner

from alvis_fsm.cluster.agent import Event
from alvis_fsm.engine.fit.loadtimes import KEEP, LoadTimes, describe


def test_median_of_the_last_starts_per_model_and_gpu_type(tmp_path: Path) -> None:
    times = LoadTimes(tmp_path)
    assert times.expected("m", "A40:1") is None
    for seconds in (40, 50, 30):
        times.add("m", "A40:2", seconds)  # the count does not matter, the type does
    times.add("m", "A100:1", 10)
    assert times.expected("m", "A40:1") == (40, 3)
    assert times.expected("m", "A100:4") == (10, 1)
    assert describe(times.expected("m", "A40:1")) == "ready in ~40 s, based on 3 earlier starts"
    assert describe(times.expected("m", "A100:1")) == "ready in ~10 s, based on 1 earlier start"


def test_only_the_last_few_are_kept(tmp_path: Path) -> None:
    times = LoadTimes(tmp_path)
    for seconds in range(1, 11):
        times.add("m", "A40:1", seconds)
    assert times.expected("m", "A40:1") == (8, KEEP)  # 6..10


def test_a_damaged_file_is_no_estimate_and_no_error(tmp_path: Path) -> None:
    (tmp_path / "loadtimes.json").write_text("{not json")
    times = LoadTimes(tmp_path)
    assert times.expected("m", "A40:1") is None
    times.add("m", "A40:1", 12)
    assert times.expected("m", "A40:1") == (12, 1)


def test_the_engine_records_a_start_and_shows_the_estimate(tmp_path: Path) -> None:
    runner, agent, _, say, store = make_runner(tmp_path, "running")
    runner.record.gpus, runner.record.node = "A40:1", "alvis7-07"
    runner.record.running_since = time.time() - 42
    runner.record.port = 8000
    LoadTimes(store.dir).add("m", "A40:1", 30)
    agent.readies.extend(
        [Event("WAIT", job=RUNNING_SACCT, age=5), Event("READY", "alvis7-07:8000")]
    )
    runner.drive()
    assert "ready in ~30 s, based on 1 earlier start" in say.text("waiting")
    median, n = LoadTimes(store.dir).expected("m", "A40:1") or (0, 0)
    assert n == 2 and 35 <= median <= 37  # (30 + ~42) / 2
