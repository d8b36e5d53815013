"""``alvis-fsm config show|path|init|set``: inspect and edit the user's settings file."""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from collections.abc import MutableMapping
from typing import Any

import click
import tomli_w
import tomlkit
import tomlkit.exceptions

from alvis_fsm import paths
from alvis_fsm.engine.settings.explain import explain
from alvis_fsm.engine.settings.model import (
    DEFAULT_LABEL,
    SECTIONS,
    load_settings,
    parse_toml,
    user_config_path,
    validate_user_data,
)
from alvis_fsm.errors import ConfigError, UsageError
from alvis_fsm.files import atomic_write
from alvis_fsm.fronts.ui import Reporter, Verbosity

USER_FILE_HEADER = """\
# alvis-fsm settings: every key you set here overrides the packaged default.
# Sections deep-merge, so keep only the keys you change; unknown keys are
# refused by name. Environment variables ALVIS_FSM_<SECTION>__<KEY> and
# command-line flags override this file. `alvis-fsm config show` prints the
# merged result and where each value comes from.
"""

# Sections `config set` edits; the machine is a structure, edited by hand.
SETTABLE = [name for name in SECTIONS if name != "machine"]


def format_value(value: Any) -> str:
    """A value as TOML; whole-number floats without ".0" since they were
    written as integers (600, not 600.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(tomlkit.item(value).as_string())


def _source(label: str) -> str:
    return "default" if label == DEFAULT_LABEL else label


def show(verbosity: Verbosity, as_json: bool = False) -> None:
    rows = explain(load_settings())
    if as_json:
        from alvis_fsm.fronts.output import emit_json

        emit_json(
            {
                "settings": [
                    {"key": key, "value": value, "source": _source(label)}
                    for key, value, label in rows
                ],
                "file": str(user_config_path()),
            }
        )
        return
    width = max(len(f"{key} = {format_value(value)}") for key, value, _ in rows)
    section = None
    for key, value, label in rows:
        current = key.split(".", 1)[0]
        if section is not None and current != section:
            click.echo("")
        section = current
        line = f"{key} = {format_value(value)}"
        click.echo(f"{line.ljust(width)}   # {_source(label)}")


def path() -> None:
    click.echo(str(user_config_path()))


def commented_defaults(default_text: str) -> str:
    """The packaged defaults with every setting commented out, so the file
    documents each key in place yet loads to exactly the defaults.

    Plain ``[section]`` headers stay live so `config set` (and a user
    uncommenting a line) lands under them; the machine's headers are
    commented too, because a live ``[[machine.transitions]]`` would replace
    the whole transition list with empty entries."""
    lines = default_text.splitlines()
    # Drop the packaged file's opening comment (it describes the packaged file).
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    out = [USER_FILE_HEADER]
    for line in lines:
        stripped = line.strip()
        header = re.fullmatch(r"\[([A-Za-z0-9_]+)\]", stripped)
        if not stripped or stripped.startswith("#") or (header and header[1] != "machine"):
            out.append(line)
        else:
            out.append(f"# {line}")
    return "\n".join(out) + "\n"


def init(force: bool) -> None:
    target = user_config_path()
    if target.exists() and not force:
        raise UsageError(
            f"{target} already exists",
            hint="Use `alvis-fsm config init --force` to overwrite it, or"
            " `alvis-fsm config set KEY VALUE` to change one setting.",
        )
    text = commented_defaults(paths.default_config().read_text(encoding="utf-8"))
    atomic_write(target, text)
    click.echo(f"Wrote {target}")


def _field_annotation(section: str, key: str) -> Any:
    model = SECTIONS[section]
    return model.model_fields[key].annotation


def _check_key(key: str) -> tuple[str, str]:
    all_keys = [f"{s}.{k}" for s in SETTABLE for k in SECTIONS[s].model_fields]
    section, _, name = key.partition(".")
    if section == "machine":
        raise UsageError(
            "The [machine] settings cannot be set with `config set`",
            hint=f"Edit the [machine] tables in {user_config_path()} by hand.",
        )
    if section in SETTABLE and name in SECTIONS[section].model_fields:
        return section, name
    close = difflib.get_close_matches(key, all_keys, n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(
        f"Unknown setting {key!r}{suggestion}",
        hint="Valid keys: " + ", ".join(all_keys),
    )


def _unchanged(key: str, target: Any) -> str:
    return f"{target} is unchanged; `alvis-fsm config get {key}` prints the value in effect."


def _refused(dotted: str, text: str) -> str:
    from alvis_fsm.engine.settings.explain import accepted

    return f"{dotted}: {text!r} is not accepted; use {accepted(dotted)}"


def parse_value(section: str, key: str, text: str) -> Any:
    """``text`` converted to the type of ``section.key``; the constraints are
    checked afterwards, against the whole settings."""
    annotation = _field_annotation(section, key)
    origin = typing.get_origin(annotation)
    dotted = f"{section}.{key}"
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in {"true", "yes", "on", "1"}:
            return True
        if lowered in {"false", "no", "off", "0"}:
            return False
        raise UsageError(_refused(dotted, text))
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(_refused(dotted, text)) from None
    if annotation is float:
        try:
            return int(text)  # keep "900" an integer in the file
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise UsageError(_refused(dotted, text)) from None
    if origin is list:
        if text.strip().startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise UsageError(_refused(dotted, text)) from None
            # A list of seconds takes numbers, e.g. [600, 60]; the others strings.
            item = (typing.get_args(annotation) or (str,))[0]
            if typing.get_origin(item) is typing.Annotated:
                item = typing.get_args(item)[0]
            kinds: tuple[type, ...] = (int, float) if item in (int, float) else (str,)
            if not isinstance(parsed, list) or not all(
                isinstance(v, kinds) and not isinstance(v, bool) for v in parsed
            ):
                raise UsageError(_refused(dotted, text))
            return parsed
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def get_value(key: str) -> None:
    """The value in effect on stdout (as `config show` writes it, strings
    bare so that `$(alvis-fsm config get slurm.account)` is the account);
    where it comes from on stderr."""
    section, name = _check_key(key)
    for dotted, value, label in explain(load_settings()):
        if dotted == f"{section}.{name}":
            click.echo(value if isinstance(value, str) else format_value(value))
            Reporter(Verbosity.NORMAL).info(f"{dotted} comes from {_source(label)}")
            return


def unset_value(key: str) -> None:
    section, name = _check_key(key)
    target = user_config_path()
    existing = target.read_text(encoding="utf-8") if target.exists() else ""
    parse_toml(existing, target)
    doc = tomlkit.parse(existing)
    table = doc.get(section)
    if not isinstance(table, MutableMapping) or name not in table:
        click.echo(f"{key} is not set in {target}; nothing to do")
        return
    del table[name]
    text = tomlkit.dumps(doc)
    validate_user_data(parse_toml(text, target))
    atomic_write(target, text)
    click.echo(f"Removed {key} from {target}")


def set_value(key: str, value: str) -> None:
    click.echo(write_setting(key, value))
    section, name = _check_key(key)
    _warn_if_shadowed(section, name)


def write_setting(key: str, value: str) -> str:
    """Set ``key`` in the user's file, refusing what `start` would refuse;
    returns the sentence that says what was done."""
    section, name = _check_key(key)
    target = user_config_path()
    try:
        parsed = parse_value(section, name, value)
    except UsageError as exc:
        raise UsageError(exc.message, hint=_unchanged(key, target)) from None
    existing = target.read_text(encoding="utf-8") if target.exists() else None

    if existing is None:
        text = USER_FILE_HEADER + "\n" + tomli_w.dumps({section: {name: parsed}})
    else:
        parse_toml(existing, target)  # a clear error, with line, for a broken file
        try:
            doc = tomlkit.parse(existing)
        except tomlkit.exceptions.ParseError as exc:
            raise ConfigError(f"Syntax error in {target}: {exc}") from exc
        if section not in doc:
            doc.add(section, tomlkit.table())
        table = doc[section]
        if not isinstance(table, MutableMapping):
            raise ConfigError(f"{section} in {target} is not a table; fix it by hand")
        table[name] = parsed
        text = tomlkit.dumps(doc)

    # Validate exactly what will be written, merged with the defaults,
    # before touching the file: a refused value leaves the file unchanged.
    from alvis_fsm.engine.settings.explain import SettingError

    try:
        merged = validate_user_data(parse_toml(text, target))
    except SettingError as exc:
        hint = exc.hint if exc.hint and "config show" not in exc.hint else None
        if exc.key == key:
            raise UsageError(f"{key}: {exc.reason}", hint=hint or _unchanged(key, target)) from None
        if _valid(existing, target):
            # Fine alone, refused with another setting (slurm.max_time below slurm.time).
            raise UsageError(
                f"{key} = {format_value(parsed)} is refused: with it, {exc.key} would be"
                f" invalid: {exc.reason}",
                hint=hint or _unchanged(key, target),
            ) from None
        raise  # the file was invalid before: say so as it is
    if key == "catalog.default_model":
        _check_model(merged, str(parsed))
    atomic_write(target, text)
    return f"Set {key} = {format_value(parsed)} in {target}"


def _valid(text: str | None, target: Any) -> bool:
    from alvis_fsm.engine.settings.explain import SettingError

    try:
        validate_user_data(parse_toml(text or "", target))
    except SettingError:
        return False
    return True


def _check_model(merged: Any, model: str) -> None:
    """`start` without -m would refuse a default model missing from the catalog."""
    from alvis_fsm.engine.fit.catalog import load_catalog

    catalog = load_catalog(merged)
    if model not in catalog.entries:
        raise UsageError(
            f"catalog.default_model {model!r}: there is no such model in the catalog;"
            " use one of: " + ", ".join(catalog.names()),
            hint="`alvis-fsm models` lists them; `alvis-fsm models --discover --add NAME` adds one;"
            f" {user_config_path()} is unchanged.",
        )


def _warn_if_shadowed(section: str, name: str) -> None:
    var = f"ALVIS_FSM_{section.upper()}__{name.upper()}"
    for candidate in (var, f"ALVIS_FSM_{section.upper()}"):
        if any(k.upper() == candidate for k in os.environ):
            Reporter(Verbosity.NORMAL).warn(
                f"{candidate} is set in your environment and overrides this file"
            )
            return
