"""The syntax of each value sbatch is given (account, partition, GPUs, job
name, time) is defined once, in alvis_fsm/cluster/syntax.py (issue 13): no
other module compiles or spells those patterns, and the settings, the
catalog and the job script refuse the same values."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field, TypeAdapter, ValidationError

from alvis_fsm.cluster import jobscript, syntax
from alvis_fsm.engine.settings import model as settings
from alvis_fsm.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "alvis_fsm"
HOME = PACKAGE / "cluster" / "syntax.py"

# Fragments only these definitions spell: the account/partition character
# classes, a GPU count, a duration's fields.
FRAGMENTS = [
    "[A-Za-z0-9_.-]+",
    "[A-Za-z0-9_.-]*",
    "[A-Za-z0-9_.,-]",
    "[A-Za-z0-9_]+:",
    "(:\\d+)",
    "[0-9]{1,2}",
    "auto|",
]


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_each_pattern_is_spelled_only_in_the_syntax_module(fragment: str) -> None:
    where = [str(p.relative_to(PACKAGE)) for p in sources() if fragment in p.read_text("utf-8")]
    assert set(where) <= {"cluster/syntax.py"}, f"{fragment!r} spelled in {where}"


def test_durations_are_parsed_only_in_the_syntax_module() -> None:
    defs = re.compile(r"^\s*def (_?duration|parse_walltime)\(", re.MULTILINE)
    where = [str(p.relative_to(PACKAGE)) for p in sources() if defs.search(p.read_text("utf-8"))]
    assert where == ["cluster/syntax.py"]


def test_the_settings_and_the_job_script_use_the_same_definitions() -> None:
    fields = settings.SlurmSettings.model_fields
    pattern = {
        k: next(m.pattern for m in fields[k].metadata if hasattr(m, "pattern"))
        for k in ("account", "gpus", "partition")
    }
    assert pattern["account"] == syntax.anchored(syntax.ACCOUNT, empty=True)
    assert pattern["gpus"] == syntax.anchored(syntax.GPUS_OR_AUTO)
    assert pattern["partition"] == syntax.anchored(syntax.PARTITION, empty=True)
    assert jobscript.parse_walltime is syntax.parse_walltime


@pytest.mark.parametrize(
    ("value", "account", "gpus", "partition"),
    [
        ("NAISS2025-22-1522", True, False, True),
        ("A40:2", False, True, False),
        ("4", True, True, True),
        ("auto", True, False, True),
        ("alvis,alvis2", False, False, True),
        ("a b", False, False, False),
        ("A40:0", False, False, False),
        ("x\n", False, False, False),
        ("", False, False, False),
    ],
)
def test_one_rule_per_value(value: str, account: bool, gpus: bool, partition: bool) -> None:
    assert bool(syntax.ACCOUNT_RE.fullmatch(value)) is account
    assert bool(syntax.GPUS_RE.fullmatch(value)) is gpus
    assert bool(syntax.PARTITION_RE.fullmatch(value)) is partition
    assert bool(syntax.GPUS_OR_AUTO_RE.fullmatch(value)) is (gpus or value == "auto")
    # pydantic's anchored form agrees (it is matched by another regex engine).
    for pattern, ok in (
        (syntax.anchored(syntax.ACCOUNT, empty=True), account or value == ""),
        (syntax.anchored(syntax.GPUS_OR_AUTO), gpus or value == "auto"),
    ):
        adapter = TypeAdapter(Annotated[str, Field(pattern=pattern)])
        try:
            adapter.validate_python(value)
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted is ok, (pattern, value)


def test_a_comma_separated_partition_list_reaches_the_job_script() -> None:
    from test_jobscript import PLAIN

    text = jobscript.render(dataclasses.replace(PLAIN, partition="alvis,alvis2"))
    assert "#SBATCH --partition alvis,alvis2\n" in text
    with pytest.raises(ConfigError, match="partition"):
        jobscript.render(dataclasses.replace(PLAIN, partition="alvis alvis2"))


@pytest.mark.parametrize(("text", "seconds"), [("90", 5400), ("1-12", 129600), ("2:00:00", 7200)])
def test_durations(text: str, seconds: int) -> None:
    assert syntax.duration(text) == seconds
    assert settings.SlurmSettings.model_fields["time"].annotation is str


@pytest.mark.parametrize("text", ["", "1:60", "1-24", "٣", "+5", "5 ", "2:00:00\n"])
def test_not_durations(text: str) -> None:
    assert syntax.duration(text) is None
