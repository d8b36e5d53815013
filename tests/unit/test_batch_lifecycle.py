"""The batch's lifecycle as data (engine/batch/lifecycle.py, issue 32): the
table is complete, OpenAI's path is in it, the ended statuses have no way
out, an illegal move is refused, and reading the cluster's answer only ever
asks for moves the table has."""

from __future__ import annotations

import itertools
import time

import pytest

from alvis_fsm.engine.batch import report as batch_report
from alvis_fsm.engine.batch.lifecycle import (
    ENTERED_AT,
    MOVES,
    BatchStatus,
    IllegalMove,
    check_move,
)
from alvis_fsm.engine.batch.record import BatchRecord, openai_object

S = BatchStatus
ENDED = {S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED}


def record(status: BatchStatus = S.VALIDATING, shards: int = 2) -> BatchRecord:
    return BatchRecord(
        id="batch_0123456789abcdef",
        model="lab-ok",
        served_name="s",
        endpoint="/v1/completions",
        total=10,
        shards=shards,
        run_dir="/r",
        job_name="alvis-fsm-x",
        created_at=1,
        status=status,
    )


def reachable(start: BatchStatus) -> set[BatchStatus]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in MOVES[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_table_names_every_status_and_only_statuses() -> None:
    assert set(MOVES) == set(BatchStatus)
    assert all(dest <= set(BatchStatus) for dest in MOVES.values())


def test_every_status_is_reachable_from_validating_and_every_one_can_end() -> None:
    assert reachable(S.VALIDATING) == set(BatchStatus)
    for status in BatchStatus:
        assert reachable(status) & ENDED, status


def test_the_ended_statuses_have_no_way_out() -> None:
    assert {s for s in BatchStatus if s.ended} == ENDED
    for status in ENDED:
        assert MOVES[status] == frozenset()
        for other in set(BatchStatus) - {status}:
            with pytest.raises(IllegalMove):
                check_move(status, other)


def test_openais_paths_are_moves() -> None:
    for path in (
        [S.VALIDATING, S.IN_PROGRESS, S.FINALIZING, S.COMPLETED],
        [S.VALIDATING, S.IN_PROGRESS, S.CANCELLING, S.CANCELLED],
        [S.VALIDATING, S.FAILED],
        [S.VALIDATING, S.IN_PROGRESS, S.FAILED],
        [S.VALIDATING, S.IN_PROGRESS, S.EXPIRED],
    ):
        r = record()
        for step, status in enumerate(path[1:], start=10):
            r.set_status(status, now=step)
        assert r.status == path[-1]
        assert all(r.times[ENTERED_AT[s]] for s in path[1:])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.VALIDATING, S.COMPLETED),  # not without finalizing
        (S.IN_PROGRESS, S.COMPLETED),
        (S.IN_PROGRESS, S.CANCELLED),  # not without cancelling
        (S.IN_PROGRESS, S.VALIDATING),
        (S.CANCELLING, S.IN_PROGRESS),
        (S.COMPLETED, S.IN_PROGRESS),
        (S.CANCELLED, S.CANCELLING),
    ],
)
def test_an_illegal_move_is_refused_and_changes_nothing(old: BatchStatus, new: BatchStatus) -> None:
    r = record(old)
    with pytest.raises(IllegalMove, match=f"from {old.value} to {new.value}"):
        r.set_status(new, now=5)
    assert r.status == old and r.times == {}


def test_staying_is_allowed_and_keeps_the_first_time() -> None:
    r = record()
    r.set_status(S.IN_PROGRESS, now=10)
    r.set_status(S.IN_PROGRESS, now=20)
    assert r.status == S.IN_PROGRESS and r.times == {"in_progress_at": 10}


def test_each_entered_time_is_a_field_of_openais_batch_object() -> None:
    fields = openai_object(record())
    assert set(ENTERED_AT) == set(BatchStatus) - {S.VALIDATING}
    assert all(key in fields for key in ENTERED_AT.values())


def test_a_record_refuses_a_status_it_does_not_know() -> None:
    with pytest.raises(ValueError):
        record("paused")  # type: ignore[arg-type]


def _answers() -> list[str]:
    """Every kind of answer the batch agent's ``status`` gives, combined."""
    shard = {
        "running": 'PROGRESS|{k}|{{"state": "running", "completed": 1}}',
        "done": 'PROGRESS|{k}|{{"state": "done", "completed": 5}}',
        "none": "",
    }
    out = []
    for s0, s1, mark, queue, note in itertools.product(
        shard,
        shard,
        ["", "CANCELLED|1"],
        ["", "QUEUE|7_0|RUNNING|None", "QUEUE_UNKNOWN|x"],
        ["", "FAILED|0|oom", "EXPIRED|1", "DEADLINE|50"],
    ):
        lines = ["NOW|100", shard[s0].format(k=0), shard[s1].format(k=1), mark, queue, note]
        out.append("\n".join(line for line in lines if line))
    return out


def test_reading_the_cluster_only_makes_moves_of_the_table() -> None:
    answers = _answers()
    for start in BatchStatus:
        for text in answers:
            r = record(start)
            batch_report.apply(r, batch_report.parse_status(text))  # IllegalMove would raise
            assert r.status == start or r.status in reachable(start), (start, text)
            if start.ended:
                assert r.status == start


def test_the_shard_states_are_the_words_the_runner_writes() -> None:
    import re
    from importlib import resources

    from alvis_fsm.engine.batch.lifecycle import ShardState

    runner = resources.files("alvis_fsm.cluster.remote").joinpath("batch_runner.py").read_text()
    assert set(re.findall(r'self\.progress\("(\w+)"\)', runner)) == set(ShardState)


def test_the_page_shows_a_running_batch_s_time_left() -> None:
    """The page's ETA reads the time the batch entered in_progress, under the
    key the record keeps (ENTERED_AT): it read a key no record has, so no
    batch ever had an ETA."""
    from alvis_fsm.fronts.gateway.observe.batchview import _view

    running = record()
    running.set_status(S.IN_PROGRESS, now=time.time() - 100)
    running.completed = 5  # half of 10 in 100 s: about 100 s left
    eta = _view(running).eta_s
    assert eta is not None and 90 < eta < 110
