"""The README is partly generated and partly a contract: its configuration
reference and diagram must match the code, CI takes its test command from
it, and it must document every command, exit code and status key."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from alvis_fsm import paths
from alvis_fsm.engine.settings import SECTIONS
from alvis_fsm.errors import ExitCode
from alvis_fsm.fronts import confref

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q '.[test]' && .venv/bin/python -m pytest"
)
# Written by others in the same change; their links are checked once they exist.
PRODUCED_ELSEWHERE = {"bench/results.md", "docs/reliability.md"}


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The body of a ``## heading`` section."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


# -- generated parts ------------------------------------------------------------


def test_config_reference_is_current(readme: str) -> None:
    assert confref.refresh(readme) == readme, (
        "README.md's generated blocks are stale: run `python -m alvis_fsm.fronts.confref --write README.md`"
    )


def test_check_mode_notices_a_stale_copy(tmp_path: Path, readme: str) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("| `ssh.host` |", "| `ssh.hostname` |"))
    assert confref.main(["--check", str(stale)]) == 1
    assert confref.main(["--write", str(stale)]) == 0
    assert stale.read_text() == readme
    assert confref.main(["--check", str(stale)]) == 0


def test_diagram_block_is_the_committed_diagram(readme: str) -> None:
    block = readme.split(confref.DIAGRAM_START + "\n", 1)[1].split(confref.DIAGRAM_END, 1)[0]
    diagram = (REPO / "diagrams" / "session.mmd").read_text()
    assert block == "```mermaid\n" + diagram.rstrip("\n") + "\n```\n"


def test_reference_lists_every_setting_with_its_default() -> None:
    reference = confref.render_reference()
    defaults = tomllib.loads(paths.default_config().read_text())
    for name, model in SECTIONS.items():
        if name == "machine":
            assert "`machine." not in reference
            continue
        assert f"#### `[{name}]`" in reference
        for key in model.model_fields:
            row = next(
                (line for line in reference.splitlines() if line.startswith(f"| `{name}.{key}` |")),
                None,
            )
            assert row is not None, f"{name}.{key} missing from the reference"
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
            assert cells[1] == confref.format_default(defaults[name][key]).replace("|", "\\|")
            assert cells[3], f"{name}.{key} has no description"


def test_comments_become_descriptions() -> None:
    text = (
        "# Title line.\n#\n# Header one.\n# Header two.\n\n[a]\n# About x,\n# two lines.\n"
        "x = 1\ny = 2\n\nz = 3\n# w's own.\nw = [\n  1,\n]\n[a.sub]\nq = 1\n[[b]]\nr = 2\n"
    )
    header, described = confref.parse_comments(text)
    assert header == "Title line.\n\nHeader one. Header two."
    assert described == {
        ("a", "x"): "About x, two lines.",
        ("a", "y"): "About x, two lines.",  # shares the comment of the key right above
        ("a", "z"): "",  # a blank line ends the sharing
        ("a", "w"): "w's own.",
    }


def test_markdown_escaping() -> None:
    text = "set ALVIS_FSM_A__B=1 or $ALVIS_FSM_CONFIG, see http://h:<port>; `ALVIS_FSM_X` kept"
    assert confref.markdown_text(text) == (
        "set `ALVIS_FSM_A__B=1` or `$ALVIS_FSM_CONFIG`, see http://h:&lt;port>;"
        " `ALVIS_FSM_X` kept"
    )


# -- the contract ---------------------------------------------------------------


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


def test_every_command_is_documented(readme: str) -> None:
    from alvis_fsm.fronts.cli.main import Group, cli, config

    commands = section(readme, "Commands")
    for name, command in cli.commands.items():
        if command.hidden:  # internal: started by --detach, not by users
            continue
        assert f"### `{name}`" in commands, f"no section for {name}"
        example = rf"^(eval \"\$\()?alvis-fsm {name}\b"
        assert re.search(example, commands, re.M), f"no example of {name}"
    for alias in Group.aliases:
        assert re.search(rf"^alvis-fsm {alias}\b", commands, re.M)
    for sub in config.commands:
        assert re.search(rf"^alvis-fsm config {sub}\b", commands, re.M), f"config {sub}"


def test_exit_codes_table_matches_errors_py(readme: str) -> None:
    table = section(readme, "Exit codes")
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == {int(code) for code in ExitCode}


def test_status_json_example_has_every_key(readme: str) -> None:
    from alvis_fsm.engine.store import SessionRecord
    from alvis_fsm.fronts.cli.commands.status import row

    body = section(readme, "`status --json`")
    example = json.loads(body.split("```json\n", 1)[1].split("```", 1)[0])
    expected = set(row(SessionRecord(name="x", model="m")))
    assert set(example) == {"sessions", "errors", "gateway"}
    assert set(example["sessions"][0]) == expected
    # and the module's docstring, which promises the schema, agrees
    from alvis_fsm.fronts.cli.commands import status

    doc_keys = set(re.findall(r'"(\w+)"', status.__doc__.split("SESSION =", 1)[1]))
    assert doc_keys == expected


def test_required_topics(readme: str) -> None:
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
        "docs/reliability.md",
    ):
        assert needle in readme, needle


def test_local_links_exist(readme: str) -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        if target in PRODUCED_ELSEWHERE and not (REPO / target).exists():
            continue
        assert (REPO / target).exists(), f"broken link: {target}"


def test_anchors_exist(readme: str) -> None:
    def slug(heading: str) -> str:
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        return text.replace(" ", "-")

    slugs = {slug(h) for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", readme):
        assert anchor in slugs, f"broken anchor: #{anchor}"
