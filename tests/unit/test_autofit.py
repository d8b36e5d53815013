"""``--gpus auto`` and the context preflight, with the remote side run for
real: a stand-in connection runs the probe and the sbatch --test-only
scripts under local bash, on a snapshot directory laid out as on the hub
(symlinks to blobs) and with a stand-in sbatch on PATH."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from alvis_fsm.engine.fit import autofit
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import ConfigError, SSHError

CONFIGS = Path(__file__).parent / "fit_configs"
SBATCH = """#!/bin/bash
printf '%s\\n' "$*" >>"$SBATCH_LOG"
for a in "$@"; do
    case $a in
        --gpus-per-node=*) spec=${a#*=} ;;
    esac
done
start=$(sed -n "s/^$spec //p" "$SBATCH_STARTS")
if [ -n "$start" ]; then
    echo "sbatch: Job 4242 to start at $start using 16 processors on nodes alvis4-12 in partition alvis" >&2
else
    echo "sbatch: error: Requested node configuration is not available" >&2
    exit 1
fi
"""


class LocalConn:
    """Runs what the tool would run on the login node, here, under bash."""

    def __init__(self, root: Path, fail: bool = False) -> None:
        self.root = root
        self.calls: list[str] = []
        self.fail = fail
        bin_dir = root / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "sbatch").write_text(SBATCH)
        (bin_dir / "sbatch").chmod(0o755)
        self.starts = root / "starts"
        self.starts.write_text("")
        self.env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(root / "remote-home"),
            "SBATCH_LOG": str(root / "sbatch.log"),
            "SBATCH_STARTS": str(self.starts),
            "LC_ALL": "C",
        }

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 60,
        retry: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv[3])
        if self.fail:
            raise SSHError("connection lost")
        return subprocess.run(
            list(argv), capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )


class Ui:
    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def snapshot(root: Path, config: str, shards: dict[str, int], total: int | None = None) -> Path:
    """A hub snapshot: config.json and sparse shards as symlinks into blobs/."""
    repo = root / "hub" / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(config)
    for i, (name, size) in enumerate(shards.items()):
        blob = repo / "blobs" / f"blob{i}"
        with blob.open("wb") as f:
            f.truncate(size)  # sparse: no disk used
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(blob)
    if total is not None:
        index = {"metadata": {"total_size": total}, "weight_map": {"x": "model-00001.safetensors"}}
        (snap / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return snap


LLAMA = (CONFIGS / "llama-3-70b.json").read_text()
GPT_OSS = (CONFIGS / "gpt-oss-20b.json").read_text()
A40_FREE_2 = "alvis4-12|gpu:A40:4(S:0-1)|gpu:A40:2(IDX:0-1)|mix"
A40_BUSY = "alvis4-13|gpu:A40:4(S:0-1)|gpu:A40:4(IDX:0-3)|alloc"


# -- the remote scripts ----------------------------------------------------------------


def test_probe_reads_config_index_and_shards(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        GPT_OSS,
        {
            "model-00000-of-00002.safetensors": 4_625_017_896,
            "model-00001-of-00002.safetensors": 4_115_586_736,
            "model-00002-of-00002.safetensors": 5_020_712_272,
            "original/model.safetensors": 13_761_300_984,
        },
    )
    conn = LocalConn(tmp_path)
    out = conn.run(["bash", "-c", autofit.PROBE_SCRIPT, "alvis-fsm-probe", f"{snap}/"]).stdout
    got = autofit.parse_probe(out)
    assert got is not None
    assert json.loads(got.config) == json.loads(GPT_OSS)
    # No index: the three top-level shards; original/ is a second copy.
    assert got.weight_bytes == 13_761_316_904


def test_probe_prefers_the_index_and_expands_home(tmp_path: Path) -> None:
    snapshot(tmp_path / "remote-home", LLAMA, {"model-00001.safetensors": 10}, 141_107_412_992)
    conn = LocalConn(tmp_path)
    path = "~/hub/models--org--m/snapshots/abc123/"
    got = autofit.parse_probe(conn.run(["bash", "-c", autofit.PROBE_SCRIPT, "p", path]).stdout)
    assert got is not None and got.weight_bytes == 141_107_412_992


def test_probe_of_a_missing_snapshot(tmp_path: Path) -> None:
    out = LocalConn(tmp_path).run(["bash", "-c", autofit.PROBE_SCRIPT, "p", "/nope/"]).stdout
    assert out == "MISSING|\n"
    assert autofit.parse_probe(out) is None


def test_test_only_asks_each_candidate_with_the_job_options(tmp_path: Path) -> None:
    conn = LocalConn(tmp_path)
    conn.starts.write_text("A40:2 2026-11-27T15:00:00\nA100fat:1 2026-11-27T13:30:00\n")
    answers = autofit.expected_starts(
        conn,
        ["A40:2", "A100:4", "A100fat:1"],
        "NAISS2025-22-1522",
        "2:00:00",
        "alvis",
        ["--qos=short"],
    )
    assert answers == {"A40:2": "2026-11-27T15:00:00", "A100fat:1": "2026-11-27T13:30:00"}
    log = (tmp_path / "sbatch.log").read_text().splitlines()
    assert log[0] == (
        "--test-only --account NAISS2025-22-1522 --time 2:00:00 --nodes 1"
        " --gpus-per-node=A40:2 --partition alvis --qos=short --wrap true"
    )
    assert len(log) == 3


# -- the snapshot cache ----------------------------------------------------------------------


def test_snapshot_is_read_once(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {}, 141_107_412_992)
    conn = LocalConn(tmp_path)
    state = tmp_path / "state"
    first = autofit.read_snapshot(conn, str(snap), state)
    second = autofit.read_snapshot(conn, str(snap), state)
    assert first == second and first is not None and first.weight_bytes == 141_107_412_992
    assert conn.calls == ["alvis-fsm-probe"]
    assert (state / autofit.CACHE_FILE).stat().st_mode & 0o777 == 0o600


def test_snapshot_without_weights_is_not_cached(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {})
    conn = LocalConn(tmp_path)
    for _ in range(2):
        got = autofit.read_snapshot(conn, str(snap), tmp_path / "state")
        assert got is not None and got.weight_bytes == 0
    assert conn.calls == ["alvis-fsm-probe"] * 2


# -- resolve_gpus --------------------------------------------------------------------------------


def resolve(
    conn: LocalConn, path: Path | str, gpus: str, max_model_len: int, sinfo: list[str]
) -> tuple[str, Ui]:
    ui = Ui()
    spec = autofit.resolve_gpus(
        ui, conn, lambda: sinfo, load_settings(), str(path), max_model_len, gpus, "1:00:00"
    )
    return spec, ui


def test_auto_picks_two_a40s_for_a_65gb_model(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {}, 65_000_000_000)
    spec, ui = resolve(LocalConn(tmp_path), snap, "auto", 8192, [A40_FREE_2, A40_BUSY])
    assert spec == "A40:2"
    assert ui.infos == [
        "GPUs (--gpus auto): A40:2 — 65 GB of weights + 2.7 GB of KV cache for 8192 tokens;"
        " 2 of 4 A40 free now on alvis4-12"
    ]


def test_auto_with_nothing_free_asks_sbatch_test_only(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {}, 65_000_000_000)
    conn = LocalConn(tmp_path)
    conn.starts.write_text("A40:2 2026-11-27T15:00:00\nA100fat:1 2026-11-27T13:30:00\n")
    spec, ui = resolve(conn, snap, "auto", 8192, [A40_BUSY])
    assert spec == "A100fat:1"
    assert conn.calls == ["alvis-fsm-probe", "alvis-fsm-test-only"]
    assert ui.infos[0].endswith("; none free now, expected to start first (2026-11-27T13:30:00)")


def test_auto_refuses_a_model_too_large_before_submitting(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {}, 141_107_412_992)
    with pytest.raises(ConfigError) as err:
        resolve(LocalConn(tmp_path), snap, "auto", 500_000, [A40_FREE_2])
    assert "164 GB of KV cache for 500000 tokens" in err.value.message


def test_auto_needs_weights(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {})
    with pytest.raises(ConfigError) as err:
        resolve(LocalConn(tmp_path), snap, "auto", 8192, [A40_FREE_2])
    assert err.value.message.endswith("no *.safetensors weights there")
    assert err.value.hint is not None and "--gpus A40:1" in err.value.hint


def test_explicit_gpus_win_and_warn_when_the_context_cannot_fit(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {}, 141_107_412_992)
    spec, ui = resolve(LocalConn(tmp_path), snap, "A40:4", 131_072, [A40_FREE_2])
    assert spec == "A40:4"
    assert ui.warnings == [
        "max_model_len 131072 needs 43 GB of KV cache, more than A40:4 has left after the"
        " weights; about 60097 tokens fit (the catalog's max_model_len; lower it, or try"
        " --gpus auto)"
    ]


def test_explicit_gpus_that_fit_say_nothing(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LLAMA, {}, 141_107_412_992)
    spec, ui = resolve(LocalConn(tmp_path), snap, "A40:4", 8192, [])
    assert (spec, ui.infos, ui.warnings) == ("A40:4", [], [])


@pytest.mark.parametrize("gpus", ["2", "H100:2"])
def test_unknown_gpu_types_are_not_probed(tmp_path: Path, gpus: str) -> None:
    conn = LocalConn(tmp_path)
    assert resolve(conn, "/x/", gpus, 8192, [])[0] == gpus
    assert conn.calls == []


def test_a_failed_probe_never_stops_an_explicit_start(tmp_path: Path) -> None:
    spec, ui = resolve(LocalConn(tmp_path, fail=True), "/x/", "A40:1", 8192, [])
    assert (spec, ui.warnings) == ("A40:1", [])


def test_auto_is_a_valid_gpus_setting(user_conf: Path) -> None:
    user_conf.write_text('[slurm]\ngpus = "auto"\n')
    assert load_settings().slurm.gpus == "auto"
