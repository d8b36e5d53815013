"""Text from outside made inert: the one sanitizer (issue 22, finding 5).

vLLM's lines, the scheduler's reasons, a catalog's descriptions, model
paths in a shared hub, an HTTP client's input: any of it may hold terminal
control sequences. OSC 52 writes the clipboard, OSC 8 makes links, DCS
strings reach the terminal's own parser, CSI moves the cursor and clears
the screen; a lone ``\\r`` or backspace rewrites what the user sees. Every
path to a terminal or a log (the CLI's lines, the gateway's output and its
log file, the Python API's logger) goes through ``inert``: it removes all
of ECMA-48's control functions, not only colours:

- CSI sequences (``ESC [`` or C1 ``0x9B``, parameters, intermediates, a
  final byte);
- control strings: OSC (``ESC ]``/``0x9D``), DCS (``ESC P``/``0x90``), SOS
  (``ESC X``/``0x98``), PM (``ESC ^``/``0x9E``) and APC (``ESC _``/``0x9F``),
  up to their terminator (ST: ``ESC \\`` or ``0x9C``; BEL as xterm also
  accepts), or to the end of the text when none comes;
- other escape sequences (``ESC``, intermediates, a final byte: ``ESC ( B``,
  ``ESC c``, ``ESC 7``) and a lone ``ESC``;
- every C1 control (``0x80``-``0x9F``) and every C0 control but tab and
  newline (``\\r``, backspace, BEL...), and DEL.

Printable text, tabs, newlines and all of Unicode above ``0x9F`` are kept as
they are. Defined here once, for every layer (the foundation imports
nothing): a test checks that no other stripping function exists."""

from __future__ import annotations

import re

_ESC = "\x1b"
# A control string's opener (7-bit ``ESC x`` or its C1 byte), then its body
# up to ST (``ESC \``, ``0x9C``) or BEL, or to the end when unterminated.
_STRING = r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
# CSI: parameters 0x30-0x3F, intermediates 0x20-0x2F, a final 0x40-0x7E
# (a sequence cut off before its final byte goes too).
_CSI = r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
# Other escapes: ESC, intermediates, a final byte 0x30-0x7E; or a lone ESC.
_OTHER = r"\x1b[ -/]*[0-~]?"
_SEQUENCES = re.compile(f"{_STRING}|{_CSI}|{_OTHER}")
# What is left: C0 but tab and newline, DEL, C1.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def inert(text: str) -> str:
    """``text`` without any control sequence or control character but tab
    and newline: safe to print to a terminal or write to a log."""
    if text.isprintable() and _ESC not in text:
        return text  # the common case, at no cost
    return _CONTROLS.sub("", _SEQUENCES.sub("", text))


def inert_line(text: str) -> str:
    """``inert`` for a text shown as one line: newlines go too."""
    return inert(text).replace("\n", "")


def has_controls(text: str) -> bool:
    """Whether ``text`` holds a control character of any kind (C0 with tab
    and newline, DEL, C1): what a name that must be one plain line (an
    uploaded file's) may not."""
    return _ANY_CONTROL.search(text) is not None


_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
