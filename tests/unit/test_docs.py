"""docs/ is partly generated and partly a contract: its generated blocks
(configuration reference, state diagram, layout diagram) and the comments of
config/default.toml must match the code, every relative link (anchors
included) in the README and docs/ must resolve, the docs are arranged as
uv's (getting started, guides, concepts, reference; an index that links
every page), every command has its section in docs/reference/commands.md,
and the exit codes (docs/reference/exit-codes.md) and `status --json` keys
(docs/reference/json-output.md) are documented as the code has them.
Nothing here pins wording."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from alvis_fsm import paths
from alvis_fsm.engine.settings.model import SECTIONS
from alvis_fsm.errors import ExitCode
from alvis_fsm.fronts import confref

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
COMMANDS = DOCS / "reference" / "commands.md"
EXIT_CODES = DOCS / "reference" / "exit-codes.md"
JSON_OUTPUT = DOCS / "reference" / "json-output.md"
INDEX = DOCS / "index.md"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
# The pages issue 24 asks for (benchmarks: bench/README.md), arranged as
# uv's docs are (issue 32): getting started, guides, concepts, reference.
REQUIRED = (
    "getting-started/installation",
    "getting-started/first-session",
    "guides/gateway",
    "guides/batch",
    "guides/python-api",
    "guides/troubleshooting",
    "concepts/how-it-works",
    "concepts/security",
    "concepts/reliability",
    "reference/commands",
    "reference/configuration",
    "reference/exit-codes",
    "reference/json-output",
    "development",
)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where
    neither a heading nor a link is one."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (code
    spans' backticks too), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.findall(r"^#{1,6} (.+?)\s*#*$", text, re.M)


def anchors(text: str) -> set[str]:
    """Every anchor of a page, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def section(text: str, heading: str) -> str:
    """The body of a ``## heading`` section."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def command_heading(name: str) -> str | None:
    """The ``## `name` ...`` heading of a command in docs/reference/commands.md."""
    for heading in headings(read(COMMANDS)):
        if re.match(rf"`{re.escape(name)}`(?:[ :(]|$)", heading):
            return heading
    return None


# -- pages and links ------------------------------------------------------------------


def test_the_pages_exist_and_the_readme_links_every_one() -> None:
    readme = read(REPO / "README.md")
    linked = {
        (REPO / t).resolve() for t in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", prose(readme))
    }
    for name in REQUIRED:
        assert (DOCS / f"{name}.md").exists(), f"docs/{name}.md missing"
    for page in DOCS.rglob("*.md"):
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(REPO)}"
    assert (REPO / "bench" / "README.md").resolve() in linked, "no link to the benchmarks"


def test_the_index_links_every_page_in_its_part() -> None:
    """docs/index.md is the docs' table of contents: one part per folder
    (getting started, guides, concepts, reference), every page linked."""
    index = read(INDEX)
    linked = {(DOCS / t).resolve() for t in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", prose(index))}
    for page in DOCS.rglob("*.md"):
        if page != INDEX:
            assert page.resolve() in linked, f"docs/index.md does not link {page.relative_to(REPO)}"
    parts = [h.lower() for h in headings(index)]
    for part in ("getting started", "guides", "concepts", "reference"):
        assert part in parts, f"docs/index.md has no part {part!r}"
        folder = DOCS / part.replace(" ", "-")
        assert folder.is_dir() and any(folder.glob("*.md")), folder


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    text = prose(read(page))
    links = re.findall(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", text)
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        name = page.relative_to(REPO)
        assert path.exists(), f"{name}: broken link {link}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(read(path)), f"{name}: no anchor #{anchor} in {path.name}"


def test_slugs_as_github_makes_them() -> None:
    assert slug("`stop` (alias `cancel`): cancel the job, close the tunnel") == (
        "stop-alias-cancel-cancel-the-job-close-the-tunnel"
    )
    assert slug("`status --json`") == "status---json"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_the_development_tree_names_every_package_in_one_screen() -> None:
    """docs/development.md states the layout as a tree, each package in a
    line (issue 32): a package added or moved must show in it."""
    text = section(read(DOCS / "development.md"), "Layout")
    tree = text.split("```text\n", 1)[1].split("```", 1)[0]
    named = re.findall(r"(?:^|[─│ ])([a-z_]+)/ ", tree, re.M)
    packages = {p.parent.name for p in (REPO / "alvis_fsm").rglob("__init__.py")}
    assert packages <= set(named), f"not in the tree: {packages - set(named)}"
    assert len(tree.splitlines()) <= 40, "the tree is more than one screen"


# -- generated parts ------------------------------------------------------------------


def test_each_generated_block_is_in_its_page_only() -> None:
    for start, page in confref.GENERATED_PAGES.items():
        holders = [p.relative_to(REPO).as_posix() for p in PAGES if start + "\n" in read(p)]
        assert holders == [page], f"{start} is in {holders}, expected {page}"


@pytest.mark.parametrize("page", sorted(set(confref.GENERATED_PAGES.values())))
def test_generated_blocks_are_current(page: str) -> None:
    text = read(REPO / page)
    assert confref.refresh(text) == text, (
        f"{page}'s generated blocks are stale: run `python -m alvis_fsm.fronts.confref --write`"
    )


def test_check_mode_notices_a_stale_copy(tmp_path: Path) -> None:
    fresh = read(REPO / confref.GENERATED_PAGES[confref.REFERENCE_START])
    stale = tmp_path / "configuration.md"
    stale.write_text(fresh.replace("| `ssh.host` |", "| `ssh.hostname` |"))
    assert confref.main(["--check", str(stale)]) == 1
    assert confref.main(["--write", str(stale)]) == 0
    assert stale.read_text() == fresh
    assert confref.main(["--check", str(stale)]) == 0
    assert confref.main(["--check"]) == 0  # every page of the checkout


def test_a_file_without_blocks_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.md"
    plain.write_text("# nothing generated here\n")
    assert confref.main(["--check", str(plain)]) == 2
    assert confref.main(["--write", str(tmp_path / "missing.md")]) == 2
    assert plain.read_text() == "# nothing generated here\n"
    assert "plain.md" in capsys.readouterr().err


def test_diagram_block_is_the_committed_diagram() -> None:
    text = read(REPO / confref.GENERATED_PAGES[confref.DIAGRAM_START])
    block = text.split(confref.DIAGRAM_START + "\n", 1)[1].split(confref.DIAGRAM_END, 1)[0]
    diagram = (REPO / "diagrams" / "session.mmd").read_text()
    assert block == "```mermaid\n" + diagram.rstrip("\n") + "\n```\n"


def test_reference_lists_every_setting_with_its_default() -> None:
    reference = confref.render_reference()
    defaults = tomllib.loads(paths.default_config().read_text())
    for name, model in SECTIONS.items():
        if name == "machine":
            assert "`machine." not in reference
            continue
        assert re.search(rf"^#+ `\[{name}\]`$", reference, re.M), f"no heading for [{name}]"
        for key in model.model_fields:
            row = next(
                (line for line in reference.splitlines() if line.startswith(f"| `{name}.{key}` |")),
                None,
            )
            assert row is not None, f"{name}.{key} missing from the reference"
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
            assert cells[1] == confref.format_default(defaults[name][key]).replace("|", "\\|")
            assert cells[3], f"{name}.{key} has no description"
            assert cells[3] == confref.markdown_text(confref.description(name, key)).replace(
                "|", "\\|"
            )


def test_default_toml_comments_are_generated() -> None:
    text = read(REPO / "config" / "default.toml")
    assert confref.render_default_toml(text) == text, (
        "config/default.toml's comments are stale: run `python -m alvis_fsm.fronts.confref --write`"
    )


def test_every_setting_has_one_description() -> None:
    from alvis_fsm.engine.settings import docs as setting_docs

    settings = {f"{s}.{k}" for s, m in SECTIONS.items() if s != "machine" for k in m.model_fields}
    assert set(setting_docs.SETTINGS) == settings
    assert set(setting_docs.SECTIONS) <= set(SECTIONS) - {"machine"}
    assert all(
        doc.text.strip() and doc.accepts.strip() and doc.example.strip()
        for doc in setting_docs.SETTINGS.values()
    )


def test_a_description_reaches_the_file_and_the_reference() -> None:
    """The one description is the comment right above the key in
    default.toml and the reference row's last cell."""
    from alvis_fsm.engine.settings import docs as setting_docs

    lines = read(REPO / "config" / "default.toml").splitlines()
    reference = confref.render_reference()
    section = None
    for i, line in enumerate(lines):
        if line.startswith("[machine"):
            break
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^(\w+) = ", line):
            text = setting_docs.SETTINGS[f"{section}.{m.group(1)}"].text
            above = []
            for prev in reversed(lines[:i]):
                if not prev.startswith("# "):
                    break
                above.insert(0, prev[2:])
            assert " ".join(above) == text
            row = f"| `{section}.{m.group(1)}` |"
            assert any(
                r.startswith(row) and r.endswith(f" | {confref.markdown_text(text)} |")
                for r in reference.splitlines()
            ), row


def test_stale_default_toml_is_noticed_and_rewritten(tmp_path: Path) -> None:
    fresh = read(REPO / "config" / "default.toml")
    stale = tmp_path / "default.toml"
    stale.write_text(fresh.replace("# Model used when -m is not given.\n", "# old words\n"))
    assert confref.main(["--check", str(stale)]) == 1
    assert confref.main(["--write", str(stale)]) == 0
    assert stale.read_text() == fresh


def test_a_setting_without_description_or_default_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from alvis_fsm.engine.settings import docs as setting_docs

    text = read(REPO / "config" / "default.toml")
    with pytest.raises(ValueError, match=r"catalog\.default_model .*settings/docs\.py"):
        monkeypatch.delitem(setting_docs.SETTINGS, "catalog.default_model")
        confref.render_default_toml(text)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"catalog\.default_model has no default"):
        confref.render_default_toml(text.replace('default_model = "gpt-oss-20b"\n', ""))
    with pytest.raises(ValueError, match=r"catalog\.colour"):  # rewriting would drop it
        confref.render_default_toml(text.replace("[catalog]\n", "[catalog]\ncolour = 1\n"))


def test_markdown_escaping() -> None:
    text = "set ALVIS_FSM_A__B=1 or $ALVIS_FSM_CONFIG, see http://h:<port>; `ALVIS_FSM_X` kept"
    assert confref.markdown_text(text) == (
        "set `ALVIS_FSM_A__B=1` or `$ALVIS_FSM_CONFIG`, see http://h:&lt;port>; `ALVIS_FSM_X` kept"
    )


# -- the contract: docs/reference/ ---------------------------------------------------------


def test_every_command_has_its_section_and_examples() -> None:
    import click

    from alvis_fsm.fronts.cli.main import Group, cli

    text = read(COMMANDS)
    for name, command in cli.commands.items():
        if command.hidden:  # internal: started by --detach, not by users
            continue
        heading = command_heading(name)
        assert heading is not None, f"docs/reference/commands.md has no section for {name}"
        body = section(text, heading)
        example = rf"^(eval \"\$\()?alvis-fsm {name}\b"
        assert re.search(example, body, re.M), f"no example of {name} in its section"
        if isinstance(command, click.Group):
            for sub in command.commands:
                assert re.search(rf"^(eval \"\$\()?alvis-fsm {name} {sub}\b", body, re.M), (
                    f"{name} {sub}"
                )
    for alias in Group.aliases:
        assert re.search(rf"^alvis-fsm {alias}\b", text, re.M)


def test_exit_codes_table_matches_errors_py() -> None:
    """Each row: the code, its ``ExitCode`` name and the error classes of
    errors.py that carry it, as the code has them."""
    from alvis_fsm import errors

    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| ([^|]+) \|", read(EXIT_CODES), re.M)
    documented = {int(m) for m, _, _ in rows}
    assert documented == {int(code) for code in ExitCode}
    assert {int(m): name for m, name, _ in rows} == {int(c): c.name for c in ExitCode}
    raised: dict[int, set[str]] = {int(c): set() for c in ExitCode}
    for name, value in vars(errors).items():
        if (
            isinstance(value, type)
            and issubclass(value, errors.AlvisError)
            and name != "AlvisError"
        ):
            raised[int(value.exit_code)].add(name)
    assert {int(m): set(re.findall(r"`(\w+)`", cls)) for m, _, cls in rows} == raised


def test_status_json_example_has_every_key() -> None:
    from alvis_fsm.engine.session.store import SessionRecord
    from alvis_fsm.fronts.cli.commands.status import row

    body = section(read(JSON_OUTPUT), "`status --json`")
    example = json.loads(body.split("```json\n", 1)[1].split("```", 1)[0])
    expected = set(row(SessionRecord(name="x", model="m")))
    assert set(example) == {"sessions", "errors", "gateway"}
    assert set(example["sessions"][0]) == expected
    # and the module's docstring, which promises the schema, agrees
    from alvis_fsm.fronts.cli.commands import status

    doc_keys = set(re.findall(r'"(\w+)"', status.__doc__.split("SESSION =", 1)[1]))
    assert doc_keys == expected
