"""The package's layers and their import direction (issue 13).

fronts -> engine -> cluster, each also free to use the foundation
(``alvis_fsm.errors``, ``alvis_fsm.paths``, ``alvis_fsm.retry``, ``alvis_fsm.text``); nothing imports upwards. Read
from the source with ``ast`` (imports inside functions count too: the
lazy imports that keep ``--help`` fast are imports all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "alvis_fsm"
LAYERS = ["cluster", "engine", "fronts"]  # lowest first
FOUNDATION = {
    "alvis_fsm",
    "alvis_fsm.errors",
    "alvis_fsm.paths",
    "alvis_fsm.retry",
    "alvis_fsm.text",
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "alvis_fsm" and parts[1] in LAYERS:
        return parts[1]
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from alvis_fsm.engine import fit`` imports alvis_fsm.engine.fit.sizing
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("alvis_fsm")]


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_lives_in_a_layer_or_the_foundation() -> None:
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "errors.py", "paths.py", "retry.py", "text.py"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} >= set(
        LAYERS
    )


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    rel = path.relative_to(PACKAGE).parts
    here = rel[0] if len(rel) > 1 and rel[0] in LAYERS else None
    wrong = []
    for line, name in imports(path):
        target = layer_of(name)
        if here is None:
            # The foundation uses no layer, except the package's lazy
            # ``alvis_fsm.session`` (the Python API) and ``__main__``.
            if target is not None and path.name not in {"__init__.py", "__main__.py"}:
                wrong.append(f"line {line}: {name}")
        elif target is not None and LAYERS.index(target) > LAYERS.index(here):
            wrong.append(f"line {line}: {name} ({here} must not import {target})")
    assert not wrong, f"{path.relative_to(PACKAGE)} imports upwards:\n" + "\n".join(wrong)


def test_only_the_cli_imports_the_cli() -> None:
    """The Python API, the gateway and the fronts' shared modules use the
    engine (or fronts/common.py), never the CLI's commands: what two fronts
    need lives below the CLI (issue 24)."""
    wrong = []
    for path in modules():
        rel = path.relative_to(PACKAGE).parts
        if rel[0] != "fronts" or rel[1] == "cli":
            continue
        wrong += [
            f"{'/'.join(rel)} line {line}: {name}"
            for line, name in imports(path)
            if name == "alvis_fsm.fronts.cli" or name.startswith("alvis_fsm.fronts.cli.")
        ]
    assert not wrong, "only fronts/cli/ may import the CLI:\n" + "\n".join(wrong)


def test_foundation_imports_nothing_of_the_layers() -> None:
    for name in ("errors.py", "paths.py", "retry.py", "text.py"):
        assert not [n for _, n in imports(PACKAGE / name) if layer_of(n)], name


DIAGRAM = PACKAGE.parent / "diagrams" / "layout.mmd"


def test_the_layout_diagram_names_every_module_and_the_docs_show_it() -> None:
    import re

    text = DIAGRAM.read_text(encoding="utf-8")
    named = set(re.findall(r"([a-z_]+)\.(?:py|sh)", text))
    present = {
        p.stem
        for p in PACKAGE.rglob("*")
        if p.suffix in {".py", ".sh"}
        and "__pycache__" not in p.parts
        and "commands" not in p.parts
        and p.name not in {"__init__.py", "__main__.py"}
    }
    assert named == present, f"missing: {present - named}; gone: {named - present}"
    page = (PACKAGE.parent / "docs" / "development.md").read_text(encoding="utf-8")
    assert text.strip() in page, (
        "docs/development.md's layout diagram differs from diagrams/layout.mmd"
    )


def test_no_two_test_modules_share_a_name() -> None:
    """Both test folders are collected in one run (the README's command) with
    rootdir imports: a unit and a lab test of the same file name make the
    second fail to import, and the whole run with it."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.glob("*/test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
