"""The one sanitizer (issue 22, finding 5): all of ECMA-48's control
functions go, whatever text surrounds them; printable text stays as it is;
and no other stripping function exists anywhere in the package."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alvis_fsm.text import inert, inert_line

PACKAGE = Path(__file__).resolve().parents[2] / "alvis_fsm"

# Characters a terminal acts on: C0 but tab and newline, DEL, C1.
CONTROL = {chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]} - {"\t", "\n"}
C1 = {chr(c) for c in range(0x80, 0xA0)}

printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from("\t\n"))
string_body = st.text(
    st.characters(blacklist_characters="\x07\x1b\x9c", blacklist_categories=("Cs",))
)


@st.composite
def sequences(draw: st.DrawFn) -> str:
    """One complete control function, as a terminal would parse it."""
    kind = draw(st.sampled_from(["csi", "string", "escape", "c1", "c0"]))
    if kind == "csi":
        opener = draw(st.sampled_from(["\x1b[", "\x9b"]))
        params = draw(st.text(st.characters(min_codepoint=0x30, max_codepoint=0x3F)))
        inter = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2F), max_size=2))
        final = draw(st.characters(min_codepoint=0x40, max_codepoint=0x7E))
        return opener + params + inter + final
    if kind == "string":
        opener = draw(
            st.sampled_from(
                [
                    "\x1b]",
                    "\x9d",
                    "\x1bP",
                    "\x90",
                    "\x1bX",
                    "\x98",
                    "\x1b^",
                    "\x9e",
                    "\x1b_",
                    "\x9f",
                ]
            )
        )
        end = draw(st.sampled_from(["\x1b\\", "\x9c", "\x07"]))
        return opener + draw(string_body) + end
    if kind == "escape":
        inter = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2F), max_size=2))
        final = draw(
            st.characters(min_codepoint=0x30, max_codepoint=0x7E).filter(
                lambda c: c not in "[]PX^_" or inter != ""
            )
        )
        return "\x1b" + inter + final
    if kind == "c1":  # but those that open a sequence (drawn above)
        return draw(st.sampled_from(sorted(C1 - set("\x90\x98\x9b\x9d\x9e\x9f"))))
    return draw(st.sampled_from(sorted(CONTROL - C1 - {"\x1b"})))


@given(st.text())
def test_nothing_a_terminal_acts_on_survives_any_text(text: str) -> None:
    out = inert(text)
    assert not CONTROL & set(out)
    assert inert(out) == out  # nothing new is formed by what was removed
    assert not (CONTROL | {"\n"}) & set(inert_line(text))


@given(printable)
def test_printable_text_tabs_and_newlines_are_kept(text: str) -> None:
    assert inert(text) == text


@given(st.lists(st.tuples(printable, sequences())), printable)
def test_every_complete_sequence_goes_and_the_text_around_it_stays(
    parts: list[tuple[str, str]], tail: str
) -> None:
    hostile = "".join(text + seq for text, seq in parts) + tail
    assert inert(hostile) == "".join(text for text, _ in parts) + tail


@pytest.mark.parametrize(
    ("hostile", "shown"),
    [
        ("copy \x1b]52;c;ZWNobyBwd25lZA==\x07me", "copy me"),  # OSC 52: the clipboard
        ("copy \x1b]52;c;ZWNobyBwd25lZA==\x1b\\me", "copy me"),  # ... ended by ST
        ("link \x1b]8;;https://evil/\x1b\\text\x1b]8;;\x1b\\", "link text"),  # OSC 8
        ('dcs \x1bP$q"p\x1b\\done', "dcs done"),  # DECRQSS: makes the terminal answer
        ("apc \x1b_payload\x9cdone", "apc done"),
        ("pm \x1b^private\x1b\\ sos \x1bXstart\x1b\\.", "pm  sos ."),
        ("c1 \x9d0;title\x9c csi \x9b2J.", "c1  csi ."),
        ("cut \x1b]0;never ended", "cut "),  # an unterminated string takes the rest
        ("cs \x1b(B \x1bc \x1b7\x1b8 lone\x1b", "cs    lone"),
        ("over\rwrite\x08 bell\x07 del\x7f", "overwrite bell del"),
        ("\x1b[1;36m(APIServer pid=1)\x1b[0;0m INFO ready", "(APIServer pid=1) INFO ready"),
    ],
)
def test_known_attacks(hostile: str, shown: str) -> None:
    assert inert(hostile) == shown


def test_the_python_api_logs_inert_text(caplog: pytest.LogCaptureFixture) -> None:
    from alvis_fsm.fronts.api.session import LogReporter

    caplog.set_level(logging.DEBUG, logger="alvis_fsm")
    ui = LogReporter()
    ui.info("node \x1b]52;c;cHduZWQ=\x07alvis")
    ui.warn("reason \x1bP+q\x1b\\Priority")
    ui.log_line("err", "\x1b]0;title\x07INFO ready")
    ui.waiting("\x9b2Jwaiting")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "node alvis" in text and "reason Priority" in text and "INFO ready" in text
    assert not CONTROL & set(text)


def test_the_gateway_records_inert_lines() -> None:
    from alvis_fsm.fronts.gateway.slot.recorder import Recorder

    shown: list[str] = []
    rec = Recorder("m", echo=shown.append)
    rec.log_line("out", "\x1b]52;c;cHduZWQ=\x07hello")
    assert list(rec.lines) == ["[out] hello"]


# A regex or a str method that removes ESC-started text: only text.py may.
_STRIPPER = re.compile(r"\\x1b|\\033|\\u001b|\\e\[|\x1b")


def test_no_other_stripping_function_exists() -> None:
    """One sanitizer: no module but text.py names ESC (in a pattern or a
    string) outside of its docstrings, so none can strip sequences its own way."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "text.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and _STRIPPER.search(node.value)
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
        source = path.read_text(encoding="utf-8")
        offenders += [
            f"{path.relative_to(PACKAGE)}: defines {m}"
            for m in re.findall(r"def ((?:strip|clean)_?(?:ansi|escapes?|controls?)\w*)", source)
        ]
    assert offenders == [], "Sanitize with alvis_fsm.text.inert only:\n" + "\n".join(offenders)


def test_has_controls_finds_any_control_character() -> None:
    from alvis_fsm.text import has_controls

    assert not has_controls("in put-1.jsonl") and not has_controls("résumé ✓.jsonl")
    for bad in ("a\x00b", "a\nb", "a\tb", "a\x1b]52;c;x\x07", "a\x7fb", "a\x9bb"):
        assert has_controls(bad), repr(bad)
