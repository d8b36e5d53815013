"""The package's layers and their import direction (issue 13).

fronts -> engine -> cluster, each also free to use the foundation
(``alvis_fsm.errors``, ``alvis_fsm.files``, ``alvis_fsm.paths``, ``alvis_fsm.retry``,
``alvis_fsm.text``); nothing imports upwards. Read
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
    "alvis_fsm.files",
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
    assert loose == {
        "__init__.py",
        "__main__.py",
        "errors.py",
        "files.py",
        "paths.py",
        "retry.py",
        "text.py",
    }
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


# The sub-packages' own rules (issue 32): what a package must not import,
# and why. A rule names packages (a prefix of the module's dotted name).
RULES: list[tuple[str, str, str]] = [
    (
        "alvis_fsm.engine.session",
        "alvis_fsm.engine.batch",
        "the session engine knows nothing of batches (batches build on sessions)",
    ),
    ("alvis_fsm.engine.fit", "alvis_fsm.engine.batch", "sizing a model knows no batches"),
    (
        "alvis_fsm.engine.fit",
        "alvis_fsm.engine.session",
        "what a model needs is known before any session (the session asks fit)",
    ),
    ("alvis_fsm.engine.settings", "alvis_fsm.engine.batch", "settings know no batches"),
    (
        "alvis_fsm.fronts.gateway.page",
        "alvis_fsm.fronts.gateway.server",
        "the page does not import the app (the app mounts the page)",
    ),
    (
        "alvis_fsm.fronts.gateway.observe",
        "alvis_fsm.fronts.gateway.server",
        "what observes the gateway does not import the app",
    ),
    (
        "alvis_fsm.fronts.gateway.observe",
        "alvis_fsm.fronts.gateway.page",
        "what the page shows is gathered below the page",
    ),
]


def _package_of(path: Path) -> str:
    return ".".join(("alvis_fsm", *path.relative_to(PACKAGE).with_suffix("").parts))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-not-{r[1]}")
def test_each_package_keeps_its_rule(rule: tuple[str, str, str]) -> None:
    package, forbidden, why = rule
    wrong = [
        f"{path.relative_to(PACKAGE)} line {line}: {name}"
        for path in modules()
        if _package_of(path).startswith(package + ".")
        for line, name in imports(path)
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert not wrong, f"{package} must not import {forbidden} ({why}):\n" + "\n".join(wrong)


def test_what_runs_on_the_cluster_is_shipped_alone() -> None:
    """cluster/remote/ is copied to the login or compute node as files: the
    guard alone, the batch runner with retry.py beside it. They import
    nothing else of the package (a missing module on the node is a job that
    dies at start)."""
    shipped_with = {"batch_runner.py": "alvis_fsm.retry"}
    for path in sorted((PACKAGE / "cluster" / "remote").glob("*.py")):
        if path.name == "__init__.py":
            continue
        allowed = shipped_with.get(path.name)
        used = {
            name
            for _, name in imports(path)
            if not (allowed and (name == allowed or name.startswith(allowed + ".")))
        }
        assert not used, f"{path.name} imports {sorted(used)}: it runs alone on the cluster"


def test_no_front_imports_another_but_through_its_face() -> None:
    """The fronts (the CLI, the Python API, the gateway) are independent: one
    imports another only through the face it shows the others. The gateway
    shows whether it runs and where (instance.py), its key (keys.py) and its
    sessions' names (slot/sessions.py); the CLI's ``gateway`` command, which
    runs the gateway, is the one place that imports all of it. The engine
    and the cluster import no front at all (test_imports_point_down)."""
    fronts = ("cli", "api", "gateway")
    face = (
        "alvis_fsm.fronts.gateway.instance",
        "alvis_fsm.fronts.gateway.keys",
        "alvis_fsm.fronts.gateway.slot.sessions",
    )
    # ``from alvis_fsm.fronts.gateway import instance`` also names its package
    packages_of_the_face = {"alvis_fsm.fronts.gateway", "alvis_fsm.fronts.gateway.slot"}
    launcher = PACKAGE / "fronts" / "cli" / "commands" / "gateway.py"

    def front_of(parts: tuple[str, ...]) -> str | None:
        return parts[1] if len(parts) > 2 and parts[0] == "fronts" and parts[1] in fronts else None

    wrong = []
    for path in modules():
        here = front_of(path.relative_to(PACKAGE).parts)
        if here is None or path == launcher:
            continue
        for line, name in imports(path):
            there = front_of(tuple(name.split(".")[1:]))
            reaching = there not in (None, here) and name not in packages_of_the_face
            if reaching and not name.startswith(tuple(f + "." for f in face) + face):
                wrong.append(f"{path.relative_to(PACKAGE)} line {line}: {name}")
    assert not wrong, "a front reaches into another:\n" + "\n".join(wrong)


def test_foundation_imports_nothing_of_the_layers() -> None:
    for name in ("errors.py", "files.py", "paths.py", "retry.py", "text.py"):
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
