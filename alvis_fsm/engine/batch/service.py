"""Batches on the cluster: submit, status, cancel, results.

A batch is a run directory on shared storage (input uploaded once, the
node-side runner, the shard job script, the key) and a SLURM job array of
``shards`` tasks; each task runs vLLM and ``cluster/remote/batch_runner.py`` for its
share of the lines, and continues in successors it submits itself past its
time limit (``cluster/remote/batch_job.sh``). The laptop is needed only to submit
and to read: every command here connects, asks, saves the local record and
closes. Status comes from the run directory (progress files, failure notes)
and the scheduler on the login node's clock (``cluster/remote/batch_agent.sh``);
cancels are confirmed by the agent's cancel, as every cancel."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from alvis_fsm.cluster import jobscript, protocol
from alvis_fsm.cluster.agent import Agent
from alvis_fsm.cluster.remote import batch_runner
from alvis_fsm.cluster.ssh import SSH_FAILURE, Connection, control_path
from alvis_fsm.engine.batch import input as batch_input
from alvis_fsm.engine.batch import record as batch_record
from alvis_fsm.engine.batch import report
from alvis_fsm.engine.batch.input import Validated
from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.engine.batch.record import BatchRecord, BatchStore
from alvis_fsm.engine.batch.results import write_results
from alvis_fsm.engine.observer import Observer
from alvis_fsm.errors import (
    CancelUnconfirmed,
    ConnectionLost,
    SchedulerError,
    SessionError,
    UsageError,
)

if TYPE_CHECKING:
    from alvis_fsm.engine.fit.catalog import ModelEntry
    from alvis_fsm.engine.settings.model import Settings

# Requests in flight per shard (vLLM batches them on the GPU): the runner's.
CONCURRENCY = batch_runner.CONCURRENCY
# Server start failures (OOM, a crash while loading) a shard survives.
MAX_ATTEMPTS = 3
AUTO = "auto"
# Bytes per read/write when streaming a batch's input or results over ssh.
CHUNK = 1 << 20


@cache
def _source(name: str) -> str:
    return resources.files("alvis_fsm.cluster.remote").joinpath(name).read_text(encoding="utf-8")


def warn_seconds(limit_s: int) -> int:
    """When SLURM warns a shard (``--signal=B:USR1@T``): two minutes before
    the limit, but never more than a quarter of a short job."""
    return max(10, min(120, limit_s // 4))


def parse_jobs(text: str) -> int | None:
    """``--jobs N|auto``: N, or None for auto."""
    if text == AUTO:
        return None
    if text.isdigit() and 1 <= int(text) <= 1000:
        return int(text)
    raise UsageError(
        f"--jobs: {text!r} is not a number from 1 to 1000 or 'auto'",
        hint="For example: --jobs 4 (or --jobs auto: as many as GPUs are free now).",
    )


def jobs_for(sinfo_lines: list[str], gpus: str) -> int:
    """``--jobs auto``: how many jobs of ``gpus`` (TYPE:N) fit on the GPUs
    free now, node by node (a job runs on one node); at least one."""
    from alvis_fsm.engine.fit.sizing import free_by_node

    gpu_type, _, count = gpus.rpartition(":")
    per_job = int(count) if count.isdigit() and int(count) > 0 else 1
    return max(1, sum(n.free // per_job for n in free_by_node(sinfo_lines, gpu_type)))


def resolver(settings: Settings) -> dict[str, tuple[str, str]]:
    """Catalog names and served names -> (catalog name, served name)."""
    from alvis_fsm.engine.fit.catalog import load_catalog

    catalog = load_catalog(settings)
    out: dict[str, tuple[str, str]] = {}
    for name in catalog.names():
        served = jobscript.served_model_name(catalog.entries[name].path)
        out.setdefault(served, (name, served))
    for name in catalog.names():
        out[name] = (name, jobscript.served_model_name(catalog.entries[name].path))
    return out


def read_input(path: Path) -> Iterator[str]:
    """The file's lines, one at a time (its size does not matter)."""
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                yield line.removesuffix("\n")
    except FileNotFoundError:
        raise UsageError(f"No such file: {path}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror}") from None


def validate_file(settings: Settings, path: Path, model: str | None) -> Validated:
    return batch_input.validate(read_input(path), resolver(settings), model)


# -- the connection -----------------------------------------------------------


def _agent_argv(sub: str, run_dir: str, *args: str) -> list[str]:
    """The batch agent's command line: its script handed to bash, then the
    subcommand and the batch's run directory."""
    return [
        "bash",
        "-c",
        protocol.agent_script("batch_agent.sh"),
        "alvis-fsm-batch",
        sub,
        run_dir,
        *args,
    ]


@dataclass
class Remote:
    conn: Connection
    agent: Agent

    def call(
        self,
        sub: str,
        run_dir: str,
        *args: str,
        input: str | None = None,
        timeout: float = 60,
        retry: bool = True,
    ) -> Any:
        argv = _agent_argv(sub, run_dir, *args)
        proc = self.conn.run(argv, input=input, timeout=timeout, retry=retry)
        for line in proc.stdout.split("\n"):
            if line.startswith("CMD|"):
                self.conn.prompter.command(f"{self.conn.opts.host}: {line[4:]}")
        return proc

    def stream(
        self,
        sub: str,
        run_dir: str,
        *args: str,
        source: Path | None = None,
        sink: BinaryIO | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``call`` for data too large to hold in memory: ``source`` is copied
        to the command's stdin and its stdout into ``sink``, a chunk at a
        time. A lost connection is reopened and the command run again (so
        only for idempotent commands: put, results); the sink is rewound."""
        argv = _agent_argv(sub, run_dir, *args)
        for attempt in range(3):
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            proc = self.conn.popen(argv)
            late = threading.Event()

            def kill(proc: subprocess.Popen[bytes] = proc, late: threading.Event = late) -> None:
                late.set()
                proc.kill()

            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                code, stdout, stderr = _pump(proc, source, sink)
            finally:
                timer.cancel()
                if proc.poll() is None:  # interrupted (Ctrl+C, a full disk): nothing left running
                    proc.kill()
                    proc.wait()
            if late.is_set():
                raise ConnectionLost(
                    f"A command on {self.conn.opts.host} did not finish within {timeout:.0f} s",
                    details=f"batch agent {sub}",
                )
            if code == SSH_FAILURE and attempt < 2:
                self.conn.reopen()
                continue
            if code == SSH_FAILURE:
                raise ConnectionLost(
                    f"Lost the connection to {self.conn.opts.host}", details=stderr.strip() or None
                )
            return subprocess.CompletedProcess(argv, code, stdout, stderr)
        raise AssertionError("unreachable")


def _pump(
    proc: subprocess.Popen[bytes], source: Path | None, sink: BinaryIO | None
) -> tuple[int, str, str]:
    """Feed ``source`` to ``proc`` and drain its output (stderr in a thread,
    so that neither side can block the other); the exit status and the
    text of stdout (when not sunk) and stderr."""
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None and stdout is not None and stderr is not None
    err: list[bytes] = []
    out: list[bytes] = []
    drains = [threading.Thread(target=lambda: err.append(stderr.read()), daemon=True)]
    if source is not None:
        # stdout is drained while stdin is fed (the command may answer early).
        drains.append(threading.Thread(target=lambda: out.append(stdout.read()), daemon=True))
    for thread in drains:
        thread.start()
    with contextlib.suppress(BrokenPipeError):  # the command ended early: its status says why
        if source is not None:
            with source.open("rb") as handle:
                shutil.copyfileobj(handle, stdin, CHUNK)
        stdin.close()
    if source is None:
        while chunk := stdout.read(CHUNK):
            if sink is not None:
                sink.write(chunk)
            else:
                out.append(chunk)
    code = proc.wait()
    for thread in drains:
        thread.join()
    return code, b"".join(out).decode("utf-8", "replace"), b"".join(err).decode("utf-8", "replace")


@contextlib.contextmanager
def connected(settings: Settings, ui: Observer) -> Iterator[Remote]:
    """The shared connection for batch commands; closed after if opened here."""
    from alvis_fsm.engine.session.link import ssh_options

    state_dir = settings.state_dir
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = f"{state_dir.resolve()}|batch@{settings.ssh.host}"
    conn = Connection(ssh_options(settings), control_path(state_dir, key), ui)
    opened = not conn.alive()
    try:
        if opened:
            ui.info(f"Connecting to {settings.ssh.host}...")
            conn.open()
        yield Remote(conn, Agent(conn))
    finally:
        if opened:
            conn.close()


# -- submit -------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitOptions:
    path: Path | None = None  # the JSONL file (the CLI), or
    validated: Validated | None = None  # already validated (the gateway's file)
    model: str | None = None
    time: str | None = None
    jobs: str = "1"
    completion_window: str = batch_record.DEFAULT_WINDOW
    metadata: dict[str, str] | None = None
    input_file_id: str = ""


def submit(
    settings: Settings, options: SubmitOptions, ui: Observer, store: BatchStore | None = None
) -> BatchRecord:
    """Validate (before any network), upload once, submit the job array."""
    from alvis_fsm.engine.session import spec as session_spec

    wanted = parse_jobs(options.jobs)
    window_s = batch_record.window_seconds(options.completion_window)
    if options.validated is not None:
        valid = options.validated
    elif options.path is not None:
        valid = validate_file(settings, options.path, options.model)
    else:
        raise UsageError("No batch input given")
    time_text = options.time or settings.slurm.time
    limit_s = session_spec.time_seconds(
        time_text, settings.slurm.max_time, from_flag=bool(options.time), settings=settings
    )
    record = _new_record(settings, options, valid, time_text)
    with connected(settings, ui) as remote:
        job = _plan(settings, ui, remote, record, wanted, limit_s)
        _create_run_dir(ui, remote, record, window_s)
        _upload_and_submit(remote, record, valid, job)
        (store or BatchStore(settings.state_dir)).save(record, valid.iter_ids())
    return record


@dataclass(frozen=True)
class _Job:
    """What every shard's job runs: its script's values and the runner's settings."""

    spec: jobscript.JobSpec
    extra: dict[str, str]
    warn_s: int

    def script(self, run_dir: str) -> str:
        return jobscript.render(
            dataclasses.replace(self.spec, run_dir=run_dir), _source("batch_job.sh"), self.extra
        )


def _new_record(
    cfg: Settings, options: SubmitOptions, valid: Validated, time_text: str
) -> BatchRecord:
    batch_id = batch_record.new_id()
    return BatchRecord(
        id=batch_id,
        model=valid.model,
        served_name=valid.served_name,
        endpoint=valid.endpoint,
        total=valid.total,
        shards=0,
        run_dir=f"{cfg.remote.run_root.rstrip('/')}/{batch_id}",
        job_name=f"alvis-fsm-{batch_id}",
        created_at=int(time.time()),
        completion_window=options.completion_window,
        time_limit=time_text,
        host=cfg.ssh.host,
        metadata=dict(options.metadata or {}),
        input_file_id=options.input_file_id,
    )


def _plan(
    cfg: Settings,
    ui: Observer,
    remote: Remote,
    record: BatchRecord,
    wanted: int | None,
    limit_s: int,
) -> _Job:
    """The account, the GPUs and the number of shards (into ``record``), and
    the job script's values, checked by a first rendering before anything
    is created on the cluster."""
    from alvis_fsm.engine.fit.autofit import resolve_gpus
    from alvis_fsm.engine.fit.catalog import load_catalog
    from alvis_fsm.engine.session.service import choose_account

    entry = load_catalog(cfg).get(record.model)
    record.account = choose_account(ui, remote.agent, cfg.slurm.account)
    sinfo: list[list[str]] = []

    def lines() -> list[str]:
        if not sinfo:
            sinfo.append(remote.agent.gpus())
        return sinfo[0]

    gpus = entry.gpus or cfg.slurm.gpus
    record.gpus = resolve_gpus(
        ui,
        remote.conn,
        lines,
        cfg,
        entry.path,
        entry.max_model_len,
        gpus,
        record.time_limit,
        fallback=None if gpus != AUTO else f"{cfg.fit.auto_types[0]}:1",
    )
    if wanted is None:
        wanted = jobs_for(lines(), record.gpus)
        ui.info(f"Jobs (--jobs auto): {wanted} ({record.gpus} each, from the GPUs free now)")
    record.shards = min(wanted, record.total)
    job = _job_for(cfg, record, entry, limit_s)
    job.script(record.run_dir)  # rendered (and so checked) before anything is created remotely
    return job


def _job_for(cfg: Settings, record: BatchRecord, entry: ModelEntry, limit_s: int) -> _Job:
    """The job script's values for ``record``'s shards."""
    spec = jobscript.JobSpec(
        job_name=record.job_name,
        account=record.account,
        time=record.time_limit,
        gpus=record.gpus,
        run_dir=record.run_dir,
        model_path=entry.path,
        max_model_len=entry.max_model_len,
        served_name=record.served_name,
        image=cfg.remote.image,
        ready_timeout=int(cfg.timeouts.server_ready) + 60,
        partition=cfg.slurm.partition,
        vllm_args=tuple(cfg.vllm.extra_args) + tuple(entry.vllm_args),
    )
    return _Job(
        spec,
        {
            "SHARDS": jobscript.positive_int("shard count", record.shards),
            "CONCURRENCY": jobscript.positive_int("concurrency", CONCURRENCY),
            "URL_PATH": jobscript.word("endpoint", record.endpoint),
            "MAX_ATTEMPTS": jobscript.positive_int("attempts", MAX_ATTEMPTS),
            "WARN_S": str(warn_seconds(limit_s)),
        },
        warn_seconds(limit_s),
    )


def _create_run_dir(ui: Observer, remote: Remote, record: BatchRecord, window_s: int) -> None:
    """The private run directory (its deadline on the cluster's clock)."""
    token = record.id[len("batch_") :]
    ui.info(f"Uploading {record.total} requests for {record.model} ({token})...")
    proc = remote.call("create", record.run_dir, str(window_s), retry=False)
    run = [line[4:] for line in proc.stdout.split("\n") if line.startswith("RUN|")]
    if proc.returncode != 0 or not run:
        raise SessionError(
            "Could not create the batch's run directory", details=proc.stderr.strip() or None
        )
    record.run_dir = run[0]


def _upload_and_submit(remote: Remote, record: BatchRecord, valid: Validated, job: _Job) -> None:
    """Upload the input (streamed), the runner, the key and the job script,
    then submit the job array; on any failure the run directory is removed
    (nothing half-done)."""
    try:
        put = remote.stream("put", record.run_dir, "input.jsonl", source=valid.requests_path)
        if put.returncode != 0:
            raise SessionError("Could not upload input.jsonl", details=put.stderr.strip() or None)
        for name, text in (
            ("batch_runner.py", _source("batch_runner.py")),
            (
                "retry.py",
                resources.files("alvis_fsm").joinpath("retry.py").read_text(encoding="utf-8"),
            ),
            (batch_runner.SETTINGS, json.dumps({"warn_s": job.warn_s}) + "\n"),
            ("api_key", "afsm-" + secrets.token_urlsafe(32) + "\n"),
            ("job.sh", job.script(record.run_dir)),
        ):
            put = remote.call("put", record.run_dir, name, input=text, timeout=600)
            if put.returncode != 0:
                raise SessionError(f"Could not upload {name}", details=put.stderr.strip() or None)
        sub = remote.call("submit", record.run_dir, str(record.shards), retry=False)
        found = [
            line[len("SUBMITTED|") :]
            for line in sub.stdout.split("\n")
            if line.startswith("SUBMITTED|")
        ]
        if sub.returncode != 0 or not found:
            raise SchedulerError(
                "sbatch refused the batch's jobs"
                if sub.returncode == 4
                else "Submitting the batch failed",
                hint="Check the account (slurm.account), the GPU type and the time (-t).",
                details=sub.stderr.strip() or None,
            )
    except BaseException:
        with contextlib.suppress(Exception):
            remote.call("remove", record.run_dir)
        raise
    record.job_id = found[0]


# -- status, cancel, results --------------------------------------------------


def refresh(
    settings: Settings,
    record: BatchRecord,
    ui: Observer,
    remote: Remote | None = None,
    store: BatchStore | None = None,
) -> BatchRecord:
    """Ask the cluster about an unfinished batch; save what it says."""
    if record.ended:
        return record
    store = store or BatchStore(settings.state_dir)
    with contextlib.ExitStack() as stack:
        if remote is None:
            remote = stack.enter_context(connected(settings, ui))
        proc = remote.call("status", record.run_dir, record.job_name)
        if proc.returncode == 0:
            report.apply(record, report.parse_status(proc.stdout))
            store.save(record)
    return record


def cancel(
    settings: Settings,
    record: BatchRecord,
    ui: Observer,
    store: BatchStore | None = None,
    confirm_s: float = 60,
) -> BatchRecord:
    """Mark the batch cancelled (no successor starts), scancel its jobs by
    name, and wait for the scheduler to confirm none is left."""
    store = store or BatchStore(settings.state_dir)
    if record.ended:
        return record
    with connected(settings, ui) as remote:
        proc = remote.call("mark-cancelled", record.run_dir)
        if proc.returncode != 0:
            raise SessionError(
                f"Could not mark batch {record.id} cancelled", details=proc.stderr.strip() or None
            )
        record.set_status(BatchStatus.CANCELLING)
        store.save(record)
        reply = remote.agent.cancel("", record.job_name, confirm_s)
        if not reply.confirmed:
            raise CancelUnconfirmed(
                f"The cancel of batch {record.id} is not confirmed: {reply.why}",
                hint=f"`alvis-fsm batch cancel {record.id}` again, or `batch status {record.id}`.",
            )
        refresh(settings, record, ui, remote, store)
    return record


def results(
    settings: Settings,
    record: BatchRecord,
    ui: Observer,
    out: Path,
    errors: Path,
    store: BatchStore | None = None,
) -> tuple[int, int]:
    """Download the results so far into OpenAI's output and error files
    (every custom_id once, in input order; for an ended batch, the ones not
    run go to the error file with the reason). Returns the line counts."""
    store = store or BatchStore(settings.state_dir)
    store.ensure()
    with tempfile.TemporaryFile(dir=store.dir) as raw:  # the shards' raw results, on disk
        with connected(settings, ui) as remote:
            if not record.ended:
                refresh(settings, record, ui, remote, store)
            proc = remote.stream("results", record.run_dir, sink=raw)
            if proc.returncode != 0:
                raise SessionError(
                    f"Could not read the results of {record.id}",
                    details=proc.stderr.strip() or None,
                )
        raw.seek(0)
        lines = (line.decode("utf-8", "replace") for line in raw)
        return write_results(store.iter_ids(record.id), lines, record.status, out, errors)


def pick(store: BatchStore, batch_id: str | None) -> BatchRecord:
    """The named batch, or the newest one."""
    if batch_id:
        return store.load(batch_record.check_id(batch_id))
    records = store.all()
    if not records:
        raise SessionError("No batches yet", hint="alvis-fsm batch submit FILE.jsonl")
    return records[-1]
