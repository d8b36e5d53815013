"""``--gpus auto`` and the context preflight of ``start``: the remote reads
that feed ``fit`` (one round trip each, over the shared connection), a
local cache of what a snapshot weighs, and the decision.

A snapshot directory is named by its commit hash and never changes, so what
it weighs is read once and kept in ``<state_dir>/snapshots.json``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alvis_fsm.cluster import protocol
from alvis_fsm.engine.fit import sizing
from alvis_fsm.engine.observer import Observer
from alvis_fsm.errors import AlvisError, ConfigError
from alvis_fsm.files import atomic_write

if TYPE_CHECKING:
    from alvis_fsm.engine.settings.model import Settings

AUTO = "auto"
CACHE_FILE = "snapshots.json"

# Prints the snapshot's config.json on one line (JSON strings cannot hold a
# raw newline, so dropping them is safe), the index's total_size, and the
# size of each top-level *.safetensors file (hub snapshots hold symlinks to
# blobs: stat -L). Names come last on their line: they may hold anything.
# The hub is shared: only regular files are read, each open inside a child
# bounded by `timeout` (a FIFO named config.json must not stall us), each read
# capped in size.
# "~" is expanded by common.sh's home_path, as in every remote script.
PROBE_SCRIPT = (
    protocol.fragment("common.sh")
    + r"""
set -u
home_path snap "$1"
cd -- "$snap" 2>/dev/null || { printf 'MISSING|\n'; exit 0; }
small() { [ -f "$1" ] && [ -r "$1" ] && timeout 5 head -c "$2" -- "$1" 2>/dev/null | tr -d '\n\r'; }
if [ -f config.json ]; then
    printf 'CONFIG|'; small config.json 1048576; printf '\n'
fi
if [ -f model.safetensors.index.json ]; then
    total=$(small model.safetensors.index.json 65536 \
        | grep -o '"total_size"[[:space:]]*:[[:space:]]*[0-9.eE+]*' | head -n 1 | sed 's/.*://')
    printf 'TOTAL|%s\n' "${total// /}"
fi
for f in *.safetensors; do
    [ -f "$f" ] && printf 'FILE|%s|%s\n' "$(stat -L -c %s -- "$f")" "$f"
done
exit 0
"""
)

# sbatch --test-only for each candidate: when would it start? Nothing is queued.
TEST_ONLY_SCRIPT = r"""
account=$1 time=$2 partition=$3 nextra=$4; shift 4
extra=("${@:1:nextra}"); shift "$nextra"
for spec in "$@"; do
    out=$(sbatch --test-only --account "$account" --time "$time" --nodes 1 \
        --gpus-per-node="$spec" ${partition:+--partition "$partition"} "${extra[@]}" \
        --wrap true 2>&1 | tr '\n' ' ')
    printf 'START|%s|%s\n' "$spec" "$out"
done
exit 0
"""


class _Runs(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 60,
        retry: bool = True,
    ) -> Any: ...


@dataclass(frozen=True)
class Snapshot:
    config: str
    weight_bytes: int


def parse_probe(stdout: str) -> Snapshot | None:
    """The probe's answer; None when the snapshot or its config.json is missing."""
    config = ""
    total: str | None = None
    sizes: dict[str, int] = {}
    for line in stdout.split("\n"):
        kind, _, rest = line.partition("|")
        if kind == "CONFIG":
            config = rest
        elif kind == "TOTAL":
            total = rest
        elif kind == "FILE":
            size, _, name = rest.partition("|")
            if size.isdigit():
                sizes[name] = int(size)
    if not config:
        return None
    index = None
    if total:
        try:
            index = json.dumps({"metadata": {"total_size": int(float(total))}})
        except ValueError:
            index = None
    return Snapshot(config, sizing.weight_bytes(index, sizes))


def parse_test_only_answers(stdout: str) -> dict[str, str]:
    """``{"A40:2": "2026-11-27T13:05:00", ...}`` for the candidates SLURM answered."""
    out: dict[str, str] = {}
    for line in stdout.split("\n"):
        kind, _, rest = line.partition("|")
        if kind != "START":
            continue
        spec, _, text = rest.partition("|")
        start = sizing.parse_test_only(text)
        if start:
            out[spec] = start
    return out


def read_snapshot(conn: _Runs, path: str, state_dir: Path) -> Snapshot | None:
    """What the snapshot at ``path`` holds, from the local cache or one remote read."""
    cache_path = state_dir / CACHE_FILE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(path)
    if isinstance(hit, dict) and isinstance(hit.get("config"), str):
        weights = hit.get("weight_bytes")
        if isinstance(weights, int) and weights > 0:
            return Snapshot(hit["config"], weights)
    proc = conn.run(["bash", "-c", PROBE_SCRIPT, "alvis-fsm-probe", path], timeout=60)
    if proc.returncode != 0:
        return None
    snap = parse_probe(proc.stdout)
    if snap is not None and snap.weight_bytes > 0:
        cache[path] = {"config": snap.config, "weight_bytes": snap.weight_bytes}
        # A cache that cannot be written costs one round trip next time.
        with contextlib.suppress(OSError):
            atomic_write(cache_path, json.dumps(cache, indent=1) + "\n")
    return snap


def expected_starts(
    conn: _Runs,
    specs: Sequence[str],
    account: str,
    time: str,
    partition: str,
    extra_args: Sequence[str],
) -> dict[str, str]:
    argv = [
        "bash",
        "-c",
        TEST_ONLY_SCRIPT,
        "alvis-fsm-test-only",
        account,
        time,
        partition,
        str(len(extra_args)),
        *extra_args,
        *specs,
    ]
    proc = conn.run(argv, timeout=30 + 15 * len(specs))
    return parse_test_only_answers(proc.stdout)


def resolve_gpus(
    ui: Observer,
    conn: _Runs,
    sinfo: Callable[[], list[str]],
    settings: Settings,
    model_path: str,
    max_model_len: int,
    gpu_spec: str,
    time: str,
    fallback: str | None = None,
) -> str:
    """The GPUs to ask for. ``auto``: chosen by ``sizing.choose`` (refused with the
    numbers if nothing fits). An explicit ``TYPE:N``: kept, with a warning
    when the catalog's max_model_len cannot fit it. Best effort for the
    warning: a snapshot that cannot be read warns about nothing.

    A snapshot ``auto`` cannot size (no config.json, no safetensors, a
    config.json of an unknown shape) is refused, unless ``fallback`` is given
    (``auto`` as the packaged default, not asked for): then a warning and
    ``fallback``, so a model that started before ``auto`` became the default
    still starts."""
    if gpu_spec != AUTO:
        _warn_context(ui, conn, settings, model_path, max_model_len, gpu_spec)
        return gpu_spec
    fp = _footprint(ui, conn, settings, model_path, fallback)
    if fp is None:
        assert fallback  # _footprint refuses a model it cannot size without one
        return fallback
    try:
        lines = sinfo()
    except AlvisError:
        lines = []
    starts = _start_times(conn, settings, fp, max_model_len, time)
    choice = sizing.choose(
        fp, max_model_len, settings.fit.types(), settings.fit.budget, lines, starts
    )
    ui.info(f"GPUs (--gpus auto): {choice.reason}")
    return choice.gpus


def _warn_context(
    ui: Observer,
    conn: _Runs,
    settings: Settings,
    model_path: str,
    max_model_len: int,
    gpu_spec: str,
) -> None:
    """An explicit ``TYPE:N``: a warning when max_model_len cannot fit it
    (best effort: a snapshot that cannot be read warns about nothing)."""
    gpu_type, _, count = gpu_spec.rpartition(":")
    known = settings.fit.gpu_type(gpu_type) if gpu_type else None
    if known is None:
        return
    try:
        snap = read_snapshot(conn, model_path, settings.state_dir)
        fp = sizing.estimate(snap.config, snap.weight_bytes) if snap and snap.weight_bytes else None
    except AlvisError:
        return
    if fp is not None:
        warning = sizing.context_warning(fp, known, int(count), max_model_len, settings.fit.budget)
        if warning:
            ui.warn(f"{warning} (the catalog's max_model_len; lower it, or try --gpus auto)")


def _footprint(
    ui: Observer, conn: _Runs, settings: Settings, model_path: str, fallback: str | None
) -> sizing.Footprint | None:
    """What the snapshot needs, for ``auto``; None (with a warning) when it
    cannot be sized and ``fallback`` is given, else refused."""
    snap = read_snapshot(conn, model_path, settings.state_dir)
    problem = ""
    if snap is None:
        problem = "no config.json there"
    elif snap.weight_bytes <= 0:
        problem = "no *.safetensors weights there"
    else:
        try:
            return sizing.estimate(snap.config, snap.weight_bytes)
        except ConfigError as exc:
            problem = exc.message
    if fallback:
        ui.warn(
            f"--gpus auto cannot size the model at {model_path} ({problem}): asking for "
            f"{fallback}; --gpus TYPE:N (or `gpus` in the catalog) chooses"
        )
        return None
    raise ConfigError(
        f"--gpus auto cannot size the model at {model_path}: {problem}",
        hint="Give the GPUs yourself, e.g. --gpus A40:1 (or `gpus` in the catalog).",
    )


def _start_times(
    conn: _Runs, settings: Settings, fp: sizing.Footprint, max_model_len: int, time: str
) -> Callable[[str], str | None]:
    """When a candidate would start, for ``sizing.choose``: asked only when no
    candidate is free now, then one round trip asks sbatch --test-only about
    every candidate at once."""
    answers: dict[str, str] | None = None
    budget = settings.fit.budget

    def starts(spec: str) -> str | None:
        nonlocal answers
        if answers is None:
            candidates = [
                f"{t.name}:{c}"
                for t in settings.fit.types()
                if (c := sizing.smallest_count(fp, t, max_model_len, budget)) is not None
            ]
            try:
                answers = expected_starts(
                    conn,
                    candidates,
                    settings.slurm.account,
                    time,
                    settings.slurm.partition,
                    settings.slurm.extra_args,
                )
            except AlvisError:
                answers = {}
        return answers.get(spec)

    return starts
