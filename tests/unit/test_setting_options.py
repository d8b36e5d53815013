"""Each setting described once (issue 24, item 3), on the command line: an
option that stands for a setting takes its --help line, the default it
shows and its example from the setting's record (engine/settings/docs.py),
the default being the packaged one (config/default.toml) when the user set
nothing; it has no default of its own that could drift."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from alvis_fsm import paths
from alvis_fsm.engine.settings.docs import SETTINGS
from alvis_fsm.fronts.cli.main import SettingOption, cli


def _commands(
    command: click.Command, path: str = "alvis-fsm"
) -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")


def _setting_options() -> list[tuple[str, click.Command, SettingOption]]:
    return [
        (path, command, p)
        for path, command in _commands(cli)
        for p in command.params
        if isinstance(p, SettingOption)
    ]


def _packaged(key: str) -> str:
    section, _, name = key.partition(".")
    value = tomllib.loads(paths.default_config().read_text(encoding="utf-8"))[section][name]
    return str(value) if value != "" else "not set"


@pytest.fixture
def packaged_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user file, no ALVIS_FSM_* variable: the packaged defaults apply."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("ALVIS_FSM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ALVIS_FSM_CONFIG", str(tmp_path / "absent.conf"))


def _help_line(path: str, command: click.Command, option: click.Option) -> str:
    ctx = click.Context(command, info_name=path)
    record = option.get_help_record(ctx)
    assert record is not None
    return " ".join(record[1].split())


def test_the_options_that_stand_for_settings_are_found() -> None:
    found = {(path, option.setting) for path, _, option in _setting_options()}
    assert {
        ("alvis-fsm start", "tunnel.local_port"),
        ("alvis-fsm start", "slurm.time"),
        ("alvis-fsm gateway", "gateway.port"),
        ("alvis-fsm gateway", "gateway.idle_timeout"),
        ("alvis-fsm batch submit", "slurm.time"),
    } <= found
    # Every setting that names its flag of `start` is such an option there.
    flagged = {key for key, doc in SETTINGS.items() if doc.flag}
    assert flagged <= {setting for path, setting in found if path == "alvis-fsm start"}


@pytest.mark.usefixtures("packaged_only")
def test_each_shows_the_packaged_default_and_its_records_words() -> None:
    for path, command, option in _setting_options():
        doc = SETTINGS[option.setting]
        assert "{default}" in doc.cli, (
            f"{option.setting}: its cli line must show the value in effect"
        )
        line = _help_line(path, command, option)
        shown = f"{_packaged(option.setting)}"
        assert f"[default: {shown}" in line or f"else {shown}]" in line, (path, option.name, line)
        assert "{" not in line, (path, option.name, line)
        if "{example}" in doc.cli:
            assert doc.example in line
        # No default of the option's own: unset, the setting (with its layers) applies.
        given = command.make_context(path, [], resilient_parsing=True).params
        assert given[option.name] is None and not option.show_default, (path, option.name)


@pytest.mark.usefixtures("packaged_only")
def test_a_different_packaged_default_would_show(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shown default is read, not written: a changed value shows up."""
    path, command, option = next(o for o in _setting_options() if o[2].setting == "gateway.port")
    monkeypatch.setenv("ALVIS_FSM_GATEWAY__PORT", "59999")
    assert "[default: 59999]" in _help_line(path, command, option)
