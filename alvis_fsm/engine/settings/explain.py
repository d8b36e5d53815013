"""The settings explained: where each value came from (``explain``, the
rows of `alvis-fsm config show`), and a refused value in a user's words
(``config_error``: the key, the value as given, the file, variable or flag
that gave it, what the key accepts, a close key for a misspelt one).

``model`` loads and validates the settings; what it cannot take it hands
here to be worded."""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ValidationError

from alvis_fsm.engine.settings import docs as setting_docs
from alvis_fsm.engine.settings.layers import Layer, origin, where
from alvis_fsm.errors import ConfigError

if TYPE_CHECKING:
    from alvis_fsm.engine.settings.model import Settings


class SettingValueError(ValueError):
    """A validation failure that knows which setting it is about (``loc``)
    and how to fix it (``hint``); raised from model validators, whose
    errors pydantic would otherwise attribute to no key at all."""

    def __init__(self, message: str, loc: tuple[str, ...] = (), hint: str | None = None):
        super().__init__(message)
        self.loc = loc
        self.hint = hint


def explain(settings: Settings) -> list[tuple[str, Any, str]]:
    """Every setting as ``(dotted key, final value, source label)``. The
    machine is shown only by its initial state and per-state timeouts, the
    parts worth overriding; the rest is drawn by ``alvis-fsm diagram``."""
    rows: list[tuple[str, Any, str]] = []
    for section in type(settings).model_fields:
        if section == "machine":
            continue
        model = getattr(settings, section)
        for key in type(model).model_fields:
            dotted = f"{section}.{key}"
            rows.append((dotted, getattr(model, key), settings.source(dotted)))
    machine = settings.machine
    rows.append(("machine.initial", machine.initial, settings.source("machine.initial")))
    for name, state in machine.states.items():
        timeout = getattr(state, "timeout", None)
        if timeout is not None:
            dotted = f"machine.states.{name}.timeout"
            rows.append((dotted, timeout, settings.source(dotted)))
    return rows


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1)
    if not close:
        return ""
    return f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)"


def _dotted(loc: tuple[str, ...]) -> str:
    """``slurm.extra_args[0]``: list indices as brackets, keys with dots."""
    out = ""
    for step in loc:
        out += f"[{step}]" if step.isdigit() else (f".{step}" if out else step)
    return out


def _model_at(root: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The pydantic model whose fields are valid at ``path`` below ``root``
    (for "valid keys" lists)."""
    annotation: Any = root
    steps = list(path)
    while True:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not steps:
                return annotation
            info = annotation.model_fields.get(steps.pop(0))
            if info is None:
                return None
            annotation = info.annotation
        elif typing.get_origin(annotation) in (dict, list) and steps:
            steps.pop(0)
            annotation = typing.get_args(annotation)[-1]
        else:
            return None


def _unwrap(annotation: Any) -> Any:
    kind = typing.get_origin(annotation)
    if kind is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if kind in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


# What each setting accepts, in the words a user reads in an error message
# (never the pattern or the library's own wording), with an example: from
# each setting's one record (engine/settings/docs.py).
ACCEPTED: dict[str, str] = {key: doc.accepted for key, doc in setting_docs.SETTINGS.items()}


def accepted(dotted: str) -> str:
    """What ``dotted`` (``section.key``, list indices dropped) accepts, in words."""
    return ACCEPTED.get(re.sub(r"\[\d+\]$", "", dotted), "a value of the documented type")


def _shown(value: Any) -> str:
    """A refused value as the user wrote it (TOML-like), briefly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return repr(text)
    if isinstance(value, int | float):
        return str(value)
    return "that value"


class SettingError(ConfigError):
    """A refused setting: which one (``key``), the value as given (``value``)
    and where it came from (``origin``: a file, "flag", "env ..."), so the
    CLI can name the flag instead when a flag gave it."""

    def __init__(
        self,
        message: str,
        hint: str | None,
        details: str | None,
        key: str,
        value: str,
        origin: str,
        reason: str,
    ) -> None:
        super().__init__(message, hint=hint, details=details)
        self.key = key
        self.value = value
        self.origin = origin
        self.reason = reason


def _describe(
    error: Any, layers: list[Layer], root: type[BaseModel]
) -> tuple[str, str | None, str, str, str, str]:
    """One pydantic error as (message, hint, key, value, origin, reason)."""
    ctx = error.get("ctx") or {}
    original = ctx.get("error")
    loc = tuple(str(p) for p in error["loc"])
    hint: str | None = None
    if isinstance(original, SettingValueError):
        if original.loc:
            loc = original.loc
        hint = original.hint
    # Union members add their type name to loc; keep only real key steps.
    key_loc = _strip_type_tags(loc)
    dotted = _dotted(key_loc)
    label = origin(key_loc, layers)
    place = where(label)

    if error["type"] == "extra_forbidden":
        parent = key_loc[:-1]
        model = _model_at(root, parent)
        valid = list(model.model_fields) if model is not None else []
        suggestion = did_you_mean(key_loc[-1], valid, prefix=_dotted(parent))
        if not parent:
            return (
                f"Unknown section [{dotted}] {place}{suggestion}",
                "Valid sections: " + ", ".join(valid),
                dotted,
                "",
                label,
                "unknown section",
            )
        return (
            f"Unknown setting {dotted!r} {place}{suggestion}",
            f"Valid keys of [{_dotted(parent)}]: " + ", ".join(valid),
            dotted,
            "",
            label,
            "unknown setting",
        )
    if error["type"] == "missing":
        reason = "is missing"
        return f"Setting {dotted!r} is missing {place}", hint, dotted, "", label, reason
    value = _shown(error.get("input"))
    if isinstance(original, SettingValueError):
        reason = str(original)  # already quotes the value, in words
    else:
        reason = f"{value} is not accepted; use {accepted(dotted)}"
    subject = f"setting {dotted!r}" if dotted else "settings"
    return f"Invalid {subject} {place}: {reason}", hint, dotted, value, label, reason


def _strip_type_tags(loc: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for step in loc:
        if "[" in step or (out and step in {"str", "int", "float", "bool", "list", "dict"}):
            continue
        out.append(step)
    return tuple(out)


def config_error(exc: ValidationError, layers: list[Layer], root: type[BaseModel]) -> SettingError:
    """``exc`` (validating ``root``, the settings, from ``layers``) as the one
    error a user reads: the first problem, the key, the value and where it
    came from; the others as details."""
    described = [_describe(e, layers, root) for e in exc.errors()]
    # Several union branches can fail for one key; say each thing once.
    unique = list(dict.fromkeys(described))
    message, hint, key, value, origin, reason = unique[0]
    details = "\n".join(m[0] for m in unique[1:]) or None
    if hint is None:
        hint = "`alvis-fsm config show` prints every setting and where it comes from."
    return SettingError(message, hint, details, key, value, origin, reason)
