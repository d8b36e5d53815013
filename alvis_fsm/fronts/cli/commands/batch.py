"""alvis-fsm batch: the OpenAI Batch API on SLURM (docs/guides/batch.md).

``submit`` validates the whole file locally (nothing is uploaded when a line
is wrong: exit 2 with its line number), uploads once, submits the job array
and prints the batch id on stdout; with ``--wait`` it shows progress until
the batch ends and downloads the results. ``status``, ``list``, ``results``
and ``cancel`` (confirmed) work from any laptop state: the batch runs on
the cluster without a client.

JSON (``--json``): a batch is OpenAI's batch object (``engine.batch.openai_object``) plus
``model``, ``jobs``, ``gpus``, ``tokens`` and ``run_dir``; ``list`` gives
``{"object": "list", "data": [BATCH...]}``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord, BatchStore, openai_object
from alvis_fsm.errors import Interrupted
from alvis_fsm.fronts.cli.commands._common import reporter, settings
from alvis_fsm.fronts.output import emit_json
from alvis_fsm.fronts.ui import Reporter, Verbosity

POLL_S = 5.0


def _json(record: BatchRecord) -> dict[str, Any]:
    return {
        **openai_object(record),
        "model": record.model,
        "jobs": record.shards,
        "gpus": record.gpus,
        "job_id": record.job_id,
        "tokens": {"prompt": record.prompt_tokens, "completion": record.completion_tokens},
        "run_dir": record.run_dir,
    }


def _line(record: BatchRecord) -> str:
    text = (
        f"{record.id}  {record.status:<11}  {record.model}  "
        f"{record.completed}/{record.total} done, {record.failed} failed"
    )
    return text + (f"  ({record.error})" if record.error else "")


def submit(
    verbosity: Verbosity,
    *,
    path: str,
    model: str | None,
    time_text: str | None,
    jobs: str,
    wait: bool,
    as_json: bool,
) -> int:
    from alvis_fsm.engine.batch import service as batch_service

    ui = Reporter(verbosity, out=sys.stderr) if as_json else reporter(verbosity)
    cfg = settings()
    record = batch_service.submit(
        cfg,
        batch_service.SubmitOptions(path=Path(path), model=model, time=time_text, jobs=jobs),
        ui,
    )
    ui.info(
        f"Batch {record.id}: {record.total} requests in {record.shards} job(s) of {record.gpus}"
        f" (job array {record.job_id}); it runs without this laptop."
    )
    if not wait:
        if as_json:
            emit_json(_json(record))
        else:
            ui.result(record.id)
        return 0
    if not as_json:
        ui.result(record.id)
    return _wait(ui, cfg, record, as_json)


def _wait(ui: Reporter, cfg: Any, record: BatchRecord, as_json: bool) -> int:

    try:
        return _follow(ui, cfg, record, as_json)
    except KeyboardInterrupt:
        ui.done_waiting()
        raise Interrupted(
            f"Stopped waiting; batch {record.id} runs on without this laptop",
            hint=f"alvis-fsm batch status {record.id}; alvis-fsm batch results {record.id}",
        ) from None


def _follow(ui: Reporter, cfg: Any, record: BatchRecord, as_json: bool) -> int:
    from alvis_fsm.engine.batch import service as batch_service

    store = BatchStore(cfg.state_dir)
    first = time.monotonic()
    start_done: int | None = None
    start_tokens = 0
    with batch_service.connected(cfg, ui) as remote:
        while True:
            batch_service.refresh(cfg, record, ui, remote, store)
            done = record.completed + record.failed
            tokens = record.prompt_tokens + record.completion_tokens
            if start_done is None and done:
                start_done, start_tokens, first = done, tokens, time.monotonic()
            elapsed = time.monotonic() - first
            rate = (
                (done - (start_done or 0)) / elapsed
                if start_done is not None and elapsed > 0
                else 0.0
            )
            tok = (
                (tokens - start_tokens) / elapsed if start_done is not None and elapsed > 0 else 0.0
            )
            eta = f"{(record.total - done) / rate:.0f} s" if rate > 0 else "-"
            ui.waiting(
                f"{record.status}: {record.completed} done, {record.failed} failed of "
                f"{record.total}  {rate:.1f} req/s  {tok:.0f} tok/s  ETA {eta}"
            )
            if record.ended:
                break
            time.sleep(POLL_S)
    ui.done_waiting()
    out = Path(f"{record.id}_output.jsonl")
    err = Path(f"{record.id}_errors.jsonl")
    n_ok, n_err = batch_service.results(cfg, record, ui, out, err, store)
    if as_json:
        emit_json({**_json(record), "output_path": str(out), "error_path": str(err)})
    else:
        ui.result(_line(record))
        ui.result(f"Results: {out} ({n_ok} lines), errors: {err} ({n_err} lines)")
    return 0 if record.status == BatchStatus.COMPLETED else 1


def status(verbosity: Verbosity, *, batch_id: str | None, as_json: bool) -> int:
    from alvis_fsm.engine.batch import service as batch_service

    ui = Reporter(verbosity, out=sys.stderr) if as_json else reporter(verbosity)
    cfg = settings()
    store = BatchStore(cfg.state_dir)
    record = batch_service.pick(store, batch_id)
    batch_service.refresh(cfg, record, ui, store=store)
    if as_json:
        emit_json(_json(record))
    else:
        ui.result(_line(record))
    return 0


def list_batches(verbosity: Verbosity, *, as_json: bool) -> int:
    """Every batch as last seen (no network: `batch status ID` asks the cluster)."""
    cfg = settings()
    records = BatchStore(cfg.state_dir).all()
    if as_json:
        emit_json({"object": "list", "data": [_json(r) for r in records]})
        return 0
    ui = reporter(verbosity)
    if not records:
        ui.info("No batches yet: alvis-fsm batch submit FILE.jsonl")
    for r in records:
        ui.result(_line(r))
    return 0


def results(verbosity: Verbosity, *, batch_id: str, out: str | None, errors: str | None) -> int:
    from alvis_fsm.engine.batch import service as batch_service

    ui = reporter(verbosity)
    cfg = settings()
    store = BatchStore(cfg.state_dir)
    record = batch_service.pick(store, batch_id)
    out_path = Path(out or f"{record.id}_output.jsonl")
    err_path = Path(errors or f"{record.id}_errors.jsonl")
    n_ok, n_err = batch_service.results(cfg, record, ui, out_path, err_path, store)
    if not record.ended:
        ui.warn(f"Batch {record.id} is {record.status}: these are the results so far")
    ui.result(f"{out_path} ({n_ok} lines), {err_path} ({n_err} lines)")
    return 0


def cancel(verbosity: Verbosity, *, batch_id: str) -> int:
    from alvis_fsm.engine.batch import service as batch_service

    ui = reporter(verbosity)
    cfg = settings()
    store = BatchStore(cfg.state_dir)
    record = batch_service.pick(store, batch_id)
    if record.ended:
        ui.result(f"Batch {record.id} has already ended ({record.status}).")
        return 0
    batch_service.cancel(cfg, record, ui, store)
    ui.result(
        f"Batch {record.id} cancelled (confirmed); results so far: "
        f"alvis-fsm batch results {record.id}"
    )
    return 0
