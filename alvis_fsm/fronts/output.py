"""What every command shares about its output: one JSON shape, text made
safe for a terminal, and a stdout that may be closed or full.

Text from outside is made safe with ``alvis_fsm.text.inert`` (the one
sanitizer, for every layer).

JSON (``--json``): exactly one JSON object on stdout, indented, ending in a
newline. On success its keys depend on the command (documented in
docs/commands.md); on failure it is ``{"error": {"message", "hint", "details",
"exit_code"}}`` and the exit code is the same as without ``--json``.

Imported by every command, so it imports nothing heavy."""

from __future__ import annotations

import json
import sys
from typing import Any


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
