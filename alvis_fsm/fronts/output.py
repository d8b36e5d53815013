"""What every command shares about its output: one JSON shape, text made
safe for a terminal, and a stdout that may be closed or full.

JSON (``--json``): exactly one JSON object on stdout, indented, ending in a
newline. On success its keys depend on the command (documented in
docs/commands.md); on failure it is ``{"error": {"message", "hint", "details",
"exit_code"}}`` and the exit code is the same as without ``--json``.

Imported by every command, so it imports nothing heavy."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

# ESC-started sequences (CSI with parameters, OSC up to BEL or ST, and
# two-character escapes), then any C0/C1 control character left except tab.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` (one line from a catalog, a remote file or another program)
    without terminal control sequences: colours, cursor moves, title
    changes and bells could otherwise rewrite what the user sees."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def clean_lines(text: str) -> str:
    """``clean`` for every line of a multi-line text, newlines kept."""
    return "\n".join(clean(line) for line in text.split("\n"))


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def error_json(message: str, hint: str | None, details: str | None, exit_code: int) -> None:
    emit_json(
        {"error": {"message": message, "hint": hint, "details": details, "exit_code": exit_code}}
    )


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for JSON (``--json`` before any ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False
