"""The model catalog: the packaged ``models.json`` overlaid by the user's
catalogs. A later file replaces a whole entry of the same name rather than
merging fields, so an overlay never inherits a path it did not mean."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alvis_fsm import paths
from alvis_fsm.cluster.syntax import spoken_seconds
from alvis_fsm.engine.settings.model import GPUS_PATTERN, MODEL_NAME_PATTERN, SafeStr, Settings
from alvis_fsm.errors import ConfigError, UsageError
from alvis_fsm.files import atomic_write

DEFAULT_USER_CATALOG = "~/.alvis-vllm/models.json"

_NAME_RE = re.compile(MODEL_NAME_PATTERN)

# vLLM 0.11 flags that make `vllm serve` run code or load code by name
# (vllm/engine/arg_utils.py, vllm/entrypoints/openai/cli_args.py): remote
# model code, import paths, plugin files, a logging config (dictConfig builds
# any class), a config file (which may hold any of these), the demo tool
# server (runs model-written Python). A catalog file the user does not own
# may not add them unless catalog.allow_code_flags lists it.
CODE_FLAGS = (
    "--trust-remote-code",
    "--middleware",
    "--tool-parser-plugin",
    "--reasoning-parser-plugin",
    "--tool-server",
    "--logits-processors",
    "--logits-processor-pattern",
    "--worker-cls",
    "--worker-extension-cls",
    "--distributed-executor-backend",
    "--scheduler-cls",
    "--kv-transfer-config",
    "--compilation-config",
    "--log-config-file",
    "--config",
)


def code_flag(arg: str) -> str | None:
    """The code-running flag ``arg`` names, or None. vLLM reads ``_`` as
    ``-``, ``--flag=value`` and ``--flag.key=value`` (a field of a JSON
    config), and argparse takes an unambiguous prefix: all count."""
    if arg.startswith("-O") and arg[2:3] in ("{", ".", "="):  # -O is --compilation-config
        return "--compilation-config"
    if not arg.startswith("--") or len(arg) < 3:
        return None
    name = "--" + re.split(r"[=.]", arg[2:], maxsplit=1)[0].replace("_", "-")
    if name == "--":
        return None
    for flag in CODE_FLAGS:
        if flag == name or (len(name) >= 5 and flag.startswith(name)):
            return flag
    return None


def owned_by_user(path: Path) -> bool:
    """Is ``path`` the user's own: owned by them and writable by no one else?"""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def check_code_flags(path: Path, entries: dict[str, ModelEntry], settings: Settings) -> None:
    """Refuse a catalog file that is not the user's own and adds a code-running
    flag, unless the user's own settings allow that file by name."""
    allowed = {_same_file_key(Path(p).expanduser()) for p in settings.catalog.allow_code_flags}
    if owned_by_user(path) or _same_file_key(path) in allowed:
        return
    for name, entry in entries.items():
        args = list(entry.vllm_args)
        for i, arg in enumerate(args):
            flag = code_flag(arg)
            if arg == "-O" and args[i + 1 : i + 2] and args[i + 1].lstrip().startswith("{"):
                flag = "--compilation-config"  # -O '{"backend": ...}'
            if flag is None:
                continue
            try:
                owner = path.stat().st_uid
            except OSError:
                owner = -1
            whose = "not owned by you" if owner != os.getuid() else "writable by others"
            raise ConfigError(
                f"Model catalog {path} ({whose}) asks model '{name}' to run vLLM with {arg!r}"
                f" ({flag} runs code); refusing it.",
                hint="A catalog that is not your own may not add code-running flags. If you trust"
                f" {path}, allow it: add it to catalog.allow_code_flags (alvis-fsm config set"
                f" catalog.allow_code_flags '[\"{path}\"]'); or remove the file from catalog.paths.",
            )


def _same_file_key(path: Path) -> str:
    try:
        return str(path.resolve())
    except OSError:
        return str(path)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Absolute because it is resolved on the compute node, never locally;
    # no NUL/newline because it is passed inside the job script.
    path: Annotated[str, Field(pattern=r"^/[^\x00\n\r]*$")]
    max_model_len: Annotated[int, Field(gt=0)]
    description: str = ""
    gpus: Annotated[str, Field(pattern=GPUS_PATTERN)] | None = None
    vllm_args: list[SafeStr] = Field(default_factory=list)
    # The gateway cancels this model's job after this many seconds without a
    # request (default: gateway.idle_timeout): a big model that loads for
    # minutes deserves a longer stay than a small one.
    idle_timeout: Annotated[float, Field(gt=0)] | None = None

    @field_validator("idle_timeout", mode="before")
    @classmethod
    def _idle_seconds(cls, value: object) -> object:
        # "15m" as well as 900, as `gateway --idle` takes it.
        if isinstance(value, str):
            try:
                return spoken_seconds(value)
            except ValueError:
                return value  # refused below, in the catalog's words
        return value


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True)

    entries: dict[str, ModelEntry]
    sources: dict[str, str]  # model name -> file it came from
    files: list[str] = Field(default_factory=list)  # every catalog read, in order

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is not None:
            return entry
        listing = "\n".join(
            f"  - {n}: {self.entries[n].description}".rstrip() for n in self.names()
        )
        read = ", ".join(self.files) or "none"
        raise UsageError(
            f"Model '{name}' not found in models.json (catalogs read: {read}). Available models:",
            hint="`alvis-fsm models` lists the catalog; `alvis-fsm models --discover` looks for"
            " more models on the cluster.",
            details=listing or "  (none)",
        )


def user_catalog_path(settings: Settings) -> Path:
    """Where ``models --add`` writes: the last of ``catalog.paths``, else the default one."""
    if settings.catalog.paths:
        return Path(settings.catalog.paths[-1]).expanduser()
    return Path(DEFAULT_USER_CATALOG).expanduser()


def load_catalog(settings: Settings) -> Catalog:
    """Packaged catalog, then ~/.alvis-vllm/models.json if it exists (where
    ``models --add`` writes when no path is configured), then every file of
    ``catalog.paths`` in order; later entries win. A listed file that is
    missing is an error: the user asked for it."""
    entries: dict[str, ModelEntry] = {}
    sources: dict[str, str] = {}
    files: list[str] = []

    def overlay(path: Path, label: str, packaged: bool = False) -> None:
        read = _read_catalog(path)
        if not packaged:  # the packaged catalog comes with the tool itself
            check_code_flags(path, read, settings)
        for name, entry in read.items():
            entries[name] = entry
            sources[name] = label
        files.append(str(path))

    overlay(paths.packaged_catalog(), str(paths.packaged_catalog()), packaged=True)
    listed = [Path(p).expanduser() for p in settings.catalog.paths]
    default_user = Path(DEFAULT_USER_CATALOG).expanduser()
    if default_user.is_file() and default_user not in listed:
        overlay(default_user, str(default_user))
    for path in listed:
        if not path.is_file():
            raise ConfigError(
                f"Model catalog {path} (listed in catalog.paths) does not exist",
                hint="Create it, or remove it with `alvis-fsm config set catalog.paths '[]'`.",
            )
        overlay(path, str(path))
    return Catalog(entries=entries, sources=sources, files=files)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read model catalog {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"Invalid JSON in model catalog {path} at line {exc.lineno}, column {exc.colno}:"
            f" {exc.msg}"
        ) from exc


def _read_catalog(path: Path) -> dict[str, ModelEntry]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"Model catalog {path} must be a JSON object mapping model names to entries"
        )
    entries: dict[str, ModelEntry] = {}
    for name, raw in data.items():
        check_model_name(name, where=f"model catalog {path}")
        try:
            entries[name] = ModelEntry.model_validate(raw)
        except ValidationError as exc:
            raise _entry_error(path, name, exc) from None
    return entries


def check_model_name(name: str, where: str = "") -> None:
    if not _NAME_RE.fullmatch(name):  # match's $ allows a trailing newline
        raise ConfigError(
            f"Invalid model name {name!r}" + (f" in {where}" if where else ""),
            hint="Names start with a letter or digit and use only letters, digits and _ . : + -"
            " (at most 101 characters).",
        )


def _entry_error(path: Path, name: str, exc: ValidationError) -> ConfigError:
    problems = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "(entry)"
        if error["type"] == "extra_forbidden":
            problems.append(
                f"field {field!r}: unknown field (valid: {', '.join(ModelEntry.model_fields)})"
            )
        elif error["type"] == "missing":
            problems.append(
                f"field {field!r} is missing; it is {ENTRY_WORDS.get(field, 'required')}"
            )
        else:
            value = error.get("input")
            shown = repr(value) if isinstance(value, str | int | float) else "its value"
            words = ENTRY_WORDS.get(field.split(".")[0], "a value of the documented type")
            problems.append(f"field {field!r}: {shown} is not accepted; use {words}")
    return ConfigError(
        f"Invalid model '{name}' in {path}: {problems[0]}",
        hint="docs/reference/commands.md (`models`) shows a catalog entry.",
        details="\n".join(problems[1:]) or None,
    )


# What each field of a catalog entry accepts, in words (never the pattern).
ENTRY_WORDS = {
    "path": "an absolute path on the cluster (starting with /) without line breaks,"
    " e.g. /mimer/NOBACKUP/Datasets/LLM/huggingface/hub/models--ORG--NAME/snapshots/HASH/",
    "max_model_len": "a whole number greater than 0, e.g. 8192",
    "description": 'a string, e.g. "GPT OSS 20B model"',
    "gpus": "a GPU type and a count per node, e.g. A40:1 or A100:4, or only a count, e.g. 2",
    "vllm_args": 'a list of strings without line breaks, e.g. ["--enforce-eager"]',
    "idle_timeout": 'seconds greater than 0, or with a unit, e.g. 1800 or "30m" (the gateway\'s idle stop)',
}


def add_entry(path: Path, name: str, entry: ModelEntry) -> None:
    """Add or replace ``name`` in the catalog at ``path``, keeping its other
    entries. The write is atomic so an interrupted add never leaves a
    half-written catalog that would break every later command."""
    check_model_name(name)
    data: dict[str, Any] = {}
    if path.exists():
        existing = _read_json(path)
        if not isinstance(existing, dict):
            raise ConfigError(f"Model catalog {path} must be a JSON object; not overwriting it")
        data = existing
    data[name] = entry.model_dump(exclude_none=True)
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
