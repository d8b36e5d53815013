"""The house rule on size (issue 24): in alvis_fsm/ no class is longer than
300 lines and no function longer than 60, counted from its ``def``/``class``
line (decorators not included) to its last line, as ``ast`` sees it.
There are no exceptions: split what grows over it."""

from __future__ import annotations

import ast
from pathlib import Path

import alvis_fsm

ROOT = Path(alvis_fsm.__file__).parent
MAX_CLASS = 300
MAX_FUNCTION = 60


def oversized(root: Path = ROOT) -> dict[tuple[str, str], int]:
    """(file, name) -> lines, for every class and function over the rule."""
    found: dict[tuple[str, str], int] = {}
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION
            else:
                continue
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found[(where, node.name)] = max(lines, found.get((where, node.name), 0))
    return found


def test_no_class_over_300_lines_and_no_function_over_60() -> None:
    over = oversized()
    assert not over, "Over the size rule (split them): " + ", ".join(
        f"{where} {name} ({n} lines)" for (where, name), n in sorted(over.items())
    )


def test_the_measure_sees_what_is_over_and_only_that(tmp_path: Path) -> None:
    def function(name: str, lines: int) -> str:  # ``lines`` long, its def line included
        return f"def {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(lines - 1))

    def klass(name: str, lines: int) -> str:
        return f"class {name}:\n" + "".join(f"    x{i} = {i}\n" for i in range(lines - 1))

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.py").write_text(
        function("fits", MAX_FUNCTION)
        + function("long", MAX_FUNCTION + 1)
        + klass("Fits", MAX_CLASS)
        + klass("Long", MAX_CLASS + 1)
    )
    assert oversized(tmp_path) == {
        ("sub/m.py", "long"): MAX_FUNCTION + 1,
        ("sub/m.py", "Long"): MAX_CLASS + 1,
    }
