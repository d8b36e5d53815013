"""The README is the front page and partly a contract: CI takes its test
command from it, its quickstart keeps the install commands, it stays short
(the rest is in docs/, checked by test_docs.py), and its table has a row per
command linking that command's section of docs/reference/commands.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
COMMANDS = REPO / "docs" / "reference" / "commands.md"
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q '.[test]'"
    " && .venv/bin/python -m pytest tests/unit -n auto --cov=alvis_fsm.engine --cov-fail-under=90"
    " && .venv/bin/python -m pytest tests/integration -n 2 --dist loadgroup"
)
MAX_LINES = 250  # a front page (issue 24): the reference is in docs/


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The body of a ``## heading`` section."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_front_page(readme: str) -> None:
    assert len(readme.splitlines()) <= MAX_LINES


def test_test_command_as_ci_extracts_it() -> None:
    proc = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", str(README)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == TEST_COMMAND + "\n"
    ci = (REPO / ".ci" / "run").read_text()
    assert "awk '/<!-- test-command -->/{getline; getline; print; exit}' README.md" in ci


def test_quickstart_has_the_two_commands(readme: str) -> None:
    quick = section(readme, "Quickstart")
    assert "```bash\npipx install . && alvis-fsm start\n```" in quick
    assert f"<!-- test-command -->\n```bash\n{TEST_COMMAND}\n```" in quick
    assert "uv tool install ." in quick and "python3 -m venv" in quick


def test_every_command_has_a_row_linking_its_section(readme: str) -> None:
    from alvis_fsm.fronts.cli.main import cli

    table = section(readme, "Commands")
    rows = dict(
        re.findall(r"^\| \[`([\w-]+)`\]\(docs/reference/commands\.md#([^)]+)\) \|", table, re.M)
    )
    commands_md = COMMANDS.read_text(encoding="utf-8")
    for name, command in cli.commands.items():
        if command.hidden:  # internal: started by --detach, not by users
            continue
        assert name in rows, f"the README's command table has no row for {name}"
        heading = re.search(rf"^## (`{re.escape(name)}`(?:[ :(].*)?)$", commands_md, re.M)
        assert heading, f"docs/reference/commands.md has no section for {name}"
        assert rows[name] == slug(heading.group(1)), f"{name}'s row links #{rows[name]}"


def test_required_topics(readme: str) -> None:
    """Each topic is documented somewhere: the README or a page of docs/."""
    text = readme + "".join(
        p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").rglob("*.md"))
    )
    for needle in (
        "lsof -nP -iTCP:58000",
        "ssh-add",
        "VPN",
        "SUNET",
        "accept-new",
        "0600",
        "$TMPDIR",
        "bash tests/lab/up",
        "export ALVIS_FSM_CONFIG=/var/lib/alvis-lab/client/alvis-fsm.toml",
        "python bench/run.py",
        "bench/results.md",
        "docs/concepts/reliability.md",
    ):
        assert needle in text, needle
