"""Warm starts: the job script keeps vLLM's compile cache (VLLM_CACHE_ROOT)
under remote.cache_dir and trims it, least recently used entry first, to
its caps before vLLM starts. The trim runs for real under bash on a temp
directory; the whole script runs with test_jobscript's stand-ins."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
from test_jobscript import EVIL, PLAIN, STUBS, Job, _golden

from alvis_fsm.cluster.jobscript import render
from alvis_fsm.engine.settings.model import load_settings

MARKER = ".alvis-fsm-cache"
CACHED = dataclasses.replace(
    PLAIN, cache_dir="~/.cache/alvis-fsm", cache_max_kib=3_906_250, cache_max_files=5000
)
# The stand-in vLLM reports where its cache root is and what is in it.
RECORD_CACHE = STUBS["apptainer"].replace(
    "case",
    'printf "%s\\n" "$VLLM_CACHE_ROOT" >"$ARGV_FILE.cache"\n'
    'ls -A "$VLLM_CACHE_ROOT" >>"$ARGV_FILE.cache" 2>/dev/null\ncase',
    1,
)


def trim_function() -> str:
    """``cache_trim`` as the packaged template defines it."""
    text = render(CACHED)
    start = text.index("cache_trim() {")
    return f"CACHE_MARKER={MARKER}\n" + text[start : text.index("\n}\n", start) + 3]


def trim(root: Path, max_kib: int, max_files: int) -> None:
    subprocess.run(
        [
            "bash",
            "-c",
            trim_function() + 'cache_trim "$@"',
            "trim",
            str(root),
            str(max_kib),
            str(max_files),
        ],
        check=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )


def entry(root: Path, name: str, kib: int, used: float, files: int = 1) -> Path:
    """A cache entry ROOT/name of ``files`` files, ``kib`` KiB in all, last used at ``used``."""
    path = root / name
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i}").write_bytes(b"x" * (kib * 1024 // files))
    for p in [*path.iterdir(), path]:
        os.utime(p, (used, used))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "vllm"
    root.mkdir()
    (root / MARKER).touch()
    return root


DAY = 86_400.0
T0 = 1_780_000_000.0


def names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*"))


def test_trim_removes_oldest_first_down_to_the_size_cap(cache: Path) -> None:
    entry(cache, "torch_compile_cache/aaa", 1000, T0)
    entry(cache, "torch_compile_cache/bbb", 1000, T0 + DAY)
    entry(cache, "torch_compile_cache/ccc", 1000, T0 + 2 * DAY)
    entry(cache, "modelinfos/ddd", 1000, T0 + 3 * DAY)
    # 2500 KiB holds two 1000 KiB entries (plus their directories' blocks).
    trim(cache, 2500, 1000)
    assert names(cache) == ["modelinfos/ddd", "torch_compile_cache/ccc"]
    assert (cache / MARKER).exists()


def test_trim_is_oldest_first_not_best_fit(cache: Path) -> None:
    entry(cache, "torch_compile_cache/small-old", 100, T0)
    entry(cache, "torch_compile_cache/big-mid", 2000, T0 + DAY)
    entry(cache, "torch_compile_cache/new", 1000, T0 + 2 * DAY)
    # The middle entry does not fit after the newest; the small oldest one
    # would, but it is older than something already dropped, so it goes too.
    trim(cache, 2500, 1000)
    assert names(cache) == ["torch_compile_cache/new"]


def test_trim_honours_the_file_cap(cache: Path) -> None:
    entry(cache, "torch_compile_cache/old", 10, T0, files=30)
    entry(cache, "torch_compile_cache/new", 10, T0 + DAY, files=30)
    # Each entry is 31 inodes (30 files and its directory): two are 62 > 50.
    trim(cache, 10**6, 50)
    assert names(cache) == ["torch_compile_cache/new"]


def test_access_counts_as_use(cache: Path) -> None:
    old = entry(cache, "torch_compile_cache/read-yesterday", 1000, T0)
    entry(cache, "torch_compile_cache/written-last-week", 1000, T0 + DAY)
    # vLLM reads a cached entry without writing it: its files' access time
    # (where the file system records it) is what says it was used.
    os.utime(old / "f0", (T0 + 5 * DAY, T0))
    trim(cache, 1500, 1000)
    assert names(cache) == ["torch_compile_cache/read-yesterday"]


def test_within_caps_nothing_goes(cache: Path) -> None:
    for i in range(3):
        entry(cache, f"torch_compile_cache/e{i}", 100, T0 + i)
    trim(cache, 1000, 1000)
    assert len(names(cache)) == 3


def test_a_root_without_the_marker_is_never_trimmed(tmp_path: Path) -> None:
    root = tmp_path / "someone-elses"
    entry(root, "precious/data", 1000, T0)
    trim(root, 1, 1)
    assert names(root) == ["precious/data"]


def test_odd_entry_names_are_removed_exactly(cache: Path) -> None:
    entry(cache, "torch_compile_cache/we ird\nname $(touch PWNED)", 1000, T0)
    keep = entry(cache, "torch_compile_cache/-rf", 1000, T0 + DAY)
    trim(cache, 1500, 1000)
    assert names(cache) == ["torch_compile_cache/-rf"]
    assert keep.exists() and not list(cache.parent.rglob("PWNED*"))


# -- the rendered script ---------------------------------------------------------------


def test_cached_golden() -> None:
    _golden("cached.sh", render(CACHED))


def test_job_exports_the_persistent_cache_root(tmp_path: Path) -> None:
    job = Job(tmp_path, dataclasses.replace(CACHED, run_dir=str(tmp_path / "run")))
    (job.bin / "apptainer").write_text(RECORD_CACHE)
    assert job.run() == 0
    root = tmp_path / "home" / ".cache" / "alvis-fsm" / "vllm"
    assert (tmp_path / "argv.cache").read_text().splitlines() == [str(root), MARKER]
    # The other caches stay node-local.
    assert not (tmp_path / "scratch" / "vllm-cache").exists()


def test_job_trims_before_vllm_starts(tmp_path: Path) -> None:
    root = tmp_path / "shared" / "vllm"
    root.mkdir(parents=True)
    (root / MARKER).touch()
    entry(root, "torch_compile_cache/old", 1000, T0)
    entry(root, "torch_compile_cache/new", 1000, T0 + DAY)
    spec = dataclasses.replace(
        CACHED,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "shared"),
        cache_max_kib=1500,
    )
    job = Job(tmp_path, spec)
    (job.bin / "apptainer").write_text(RECORD_CACHE)
    assert job.run() == 0
    assert names(root) == ["torch_compile_cache/new"]
    assert (tmp_path / "argv.cache").read_text().splitlines()[0] == str(root)


def test_hostile_cache_dir_is_data(tmp_path: Path) -> None:
    spec = dataclasses.replace(
        CACHED, run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / EVIL)
    )
    job = Job(tmp_path, spec)
    (job.bin / "apptainer").write_text(RECORD_CACHE)
    assert job.run() == 0
    job.assert_nothing_executed()
    root = tmp_path / EVIL / "vllm"
    assert (tmp_path / "argv.cache").read_text().startswith(f"{root}\n")
    assert (root / MARKER).exists()


def test_unusable_cache_dir_falls_back_to_tmpdir(tmp_path: Path) -> None:
    # A cache_dir that is a file: no directory can be made under it (even by root).
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    spec = dataclasses.replace(CACHED, run_dir=str(tmp_path / "run"), cache_dir=str(not_a_dir))
    job = Job(tmp_path, spec)
    (job.bin / "apptainer").write_text(RECORD_CACHE)
    proc = job.popen()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (tmp_path / "argv.cache").read_text().splitlines()[0] == str(
        tmp_path / "scratch" / "vllm-cache"
    )
    assert b"refusing the compile cache" in err and b"remote.cache_dir" in err


@pytest.mark.parametrize("how", ["someone else's", "writable by others"])
def test_a_cache_dir_that_is_not_yours_is_refused_in_words(tmp_path: Path, how: str) -> None:
    """Compiled code is loaded from the cache: one that another user owns, or
    may write to, is not used even though we could write to it (issue 22, finding 7)."""
    shared = tmp_path / "shared"
    (shared / "vllm").mkdir(parents=True)
    if how == "someone else's":
        if os.getuid() != 0:
            pytest.skip("making a directory someone else's needs root")
        os.chown(shared / "vllm", 4242, 4242)
        (shared / "vllm").chmod(0o777)  # writable by us too: not enough
    else:
        (shared / "vllm").chmod(0o777)
    spec = dataclasses.replace(CACHED, run_dir=str(tmp_path / "run"), cache_dir=str(shared))
    job = Job(tmp_path, spec)
    (job.bin / "apptainer").write_text(RECORD_CACHE)
    proc = job.popen()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (tmp_path / "argv.cache").read_text().splitlines()[0] == str(
        tmp_path / "scratch" / "vllm-cache"
    )
    assert f"refusing the compile cache {shared}/vllm".encode() in err
    assert b"not a directory owned by you and closed to others (remote.cache_dir)" in err
    assert not (shared / "vllm" / MARKER).exists()


def test_settings_reach_the_job_script() -> None:
    remote = load_settings().remote
    assert remote.cache_dir == "~/.cache/alvis-fsm"
    # 4 GB in the KiB du counts: 4e9 / 1024.
    assert remote.cache_max_kib == 3_906_250
    assert remote.cache_max_files == 5000


def test_empty_cache_dir_means_tmpdir() -> None:
    text = render(PLAIN)
    assert "CACHE_DIR=''\nCACHE_MAX_KIB=0\nCACHE_MAX_FILES=0\n" in text


@pytest.mark.parametrize(
    "field, value", [("cache_max_kib", 0), ("cache_max_files", -1), ("cache_dir", "a\x00b")]
)
def test_invalid_cache_values_refused(field: str, value: object) -> None:
    from alvis_fsm.errors import ConfigError

    with pytest.raises(ConfigError):
        render(dataclasses.replace(CACHED, **{field: value}))
