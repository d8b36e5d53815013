"""The three top-level data files (config/default.toml, models.json,
jobscript.sh) and the remote agent ship inside the wheel, and the installed
tool finds them from any working directory."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stderr}")
    (path,) = out.glob("alvis_fsm-*.whl")
    return path


def test_wheel_contains_data_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in (
        "alvis_fsm/data/default.toml",
        "alvis_fsm/data/models.json",
        "alvis_fsm/data/jobscript.sh",
        "alvis_fsm/cluster/remote/agent.sh",
        # The gateway's page, served from the package (no internet, no build step).
        "alvis_fsm/fronts/gateway/page/static/index.html",
        "alvis_fsm/fronts/gateway/page/static/app.js",
        "alvis_fsm/fronts/gateway/page/static/app.css",
    ):
        assert member in names


def test_wheel_data_files_match_the_repository(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    for member, source in (
        ("alvis_fsm/data/default.toml", "config/default.toml"),
        ("alvis_fsm/data/models.json", "models.json"),
        ("alvis_fsm/data/jobscript.sh", "jobscript.sh"),
    ):
        assert archive.read(member) == (REPO / source).read_bytes()


def test_installed_tool_finds_its_data_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    # Unpack the wheel (it is pure Python) onto a path of its own and run the
    # tool from an unrelated directory: the data must come from the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from alvis_fsm import paths; print(paths.default_config()); "
            "print(paths.packaged_catalog()); print(paths.jobscript_template())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    for line in probe.stdout.split():
        assert line.startswith(str(site / "alvis_fsm" / "data")), probe.stdout
    listing = subprocess.run(
        [sys.executable, "-m", "alvis_fsm", "models", "--json"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "gpt-oss-20b" in json.loads(listing.stdout)["models"]
