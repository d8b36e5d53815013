"""``alvis-fsm models``: list the catalog; ``--discover`` scans the cluster's
Hugging Face hub (``remote.model_hub``) for snapshots, ``--add NAME`` writes
a discovered one to the user catalog.

Discovery runs ``agent.sh discover`` over the shared ssh connection: one
login (or none, if the connection is already up), one channel, and the
parsing of each snapshot's ``config.json`` happens here, not on the cluster.

JSON (``models --discover --json``): ``{"hub": PATH, "models": [MODEL...]}``
with MODEL = ``{"name", "repo", "revision", "path", "max_model_len",
"in_catalog", "catalog_names"}``; ``max_model_len`` is null when config.json
names no context length."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from alvis_fsm import paths
from alvis_fsm.errors import ConfigError, UsageError
from alvis_fsm.fronts.ui import Verbosity

if TYPE_CHECKING:
    from alvis_fsm.engine.fit.catalog import Catalog
    from alvis_fsm.engine.settings.model import Settings


def model_names() -> list[str]:
    """Catalog names for shell completion: never prints, never raises, since
    a traceback in the middle of a <TAB> would be worse than no completion."""
    try:
        from alvis_fsm.engine.fit.catalog import load_catalog
        from alvis_fsm.engine.settings.model import load_settings

        return load_catalog(load_settings()).names()
    except Exception:
        pass
    try:  # broken settings or user catalog: the packaged names still help
        data = json.loads(paths.packaged_catalog().read_text(encoding="utf-8"))
        return sorted(str(name) for name in data)
    except Exception:
        return []


# -- discovery ------------------------------------------------------------------

# Keys that hold the context length in a Hugging Face config.json, most
# specific first; multimodal models keep them in a nested text config.
CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions")
NESTED_CONFIGS = ("text_config", "llm_config", "language_config")

_SNAPSHOT_RE = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/([^/]+)/?$")


@dataclass(frozen=True)
class Discovered:
    name: str  # suggested catalog name
    repo: str  # ORG/NAME as on the Hugging Face hub
    revision: str  # the snapshot's commit hash
    path: str  # the snapshot directory, with a trailing slash
    max_model_len: int | None
    in_catalog: bool
    catalog_names: list[str]


def context_length(config: Any) -> int | None:
    """The context length a config.json declares, or None."""
    if not isinstance(config, dict):
        return None
    for key in CONTEXT_KEYS:
        value = config.get(key)
        # bool is an int subclass; true is no context length.
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for nested in NESTED_CONFIGS:
        found = context_length(config.get(nested))
        if found is not None:
            return found
    return None


def _parse_config(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def suggest_name(text: str) -> str:
    """A catalog name from a repo or model name: lower case, safe characters."""
    name = re.sub(r"[^a-z0-9_.:+-]+", "-", text.lower()).strip("-._:+")
    return name[:101] or "model"


def _norm(path: str) -> str:
    return path.rstrip("/")


def usable_path(path: str) -> bool:
    """Can this hub path go into a catalog entry, as the cluster spells it?
    Not with a control character (the catalog and the job script refuse CR
    and LF; the others are never a model) or bytes that were not UTF-8
    (decoded as U+FFFD, the name would no longer match the directory)."""
    return not any(ord(c) < 32 or 127 <= ord(c) < 160 or c == "\ufffd" for c in path)


def discovered_models(
    snapshots: list[tuple[str, str]], catalog: Catalog | None
) -> list[Discovered]:
    """Turn ``agent.sh discover``'s (path, config.json) pairs into suggestions.

    The suggested name is the model's name in lower case; when two repos
    share it the organisation is prefixed, and when one repo has several
    snapshots each gets the start of its revision appended."""
    by_path: dict[str, list[str]] = {}
    if catalog is not None:
        for name in catalog.names():
            by_path.setdefault(_norm(catalog.entries[name].path), []).append(name)
    parsed: list[tuple[str, str, str, str, int | None]] = []
    for path, config_text in snapshots:
        match = _SNAPSHOT_RE.search(_norm(path))
        if not match or not usable_path(path):
            continue
        org, model, revision = match.groups()
        parsed.append(
            (org, model, revision, _norm(path) + "/", context_length(_parse_config(config_text)))
        )
    repos = {(org, model) for org, model, *_ in parsed}
    repos_per_model = Counter(suggest_name(model) for _, model in repos)
    snaps_per_repo = Counter((org, model) for org, model, *_ in parsed)
    out: list[Discovered] = []
    for org, model, revision, path, length in parsed:
        name = suggest_name(model)
        if repos_per_model[name] > 1:
            name = suggest_name(f"{org}-{model}")
        if snaps_per_repo[(org, model)] > 1:
            name = f"{name[:92]}-{revision[:8].lower()}"
        names = by_path.get(_norm(path), [])
        out.append(
            Discovered(
                name=name,
                repo=f"{org}/{model}",
                revision=revision,
                path=path,
                max_model_len=length,
                in_catalog=bool(names),
                catalog_names=names,
            )
        )
    return sorted(out, key=lambda d: (d.repo.lower(), d.revision))


def scan_hub(settings: Settings, verbosity: Verbosity) -> list[tuple[str, str]]:
    """Run the remote discovery over the shared connection; close it after
    if this call opened it. Hub entries whose names cannot be used are
    skipped with a warning that names them."""
    from alvis_fsm.cluster.agent import Agent
    from alvis_fsm.cluster.ssh import Connection, control_path
    from alvis_fsm.engine.session.link import ssh_options
    from alvis_fsm.fronts.cli.commands._common import reporter

    ui = reporter(verbosity)
    state_dir = settings.state_dir
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = f"{state_dir.resolve()}|discover@{settings.ssh.host}"
    conn = Connection(ssh_options(settings), control_path(state_dir, key), ui)
    opened = not conn.alive()
    try:
        if opened:
            ui.info(f"Connecting to {settings.ssh.host}...")
            conn.open()
        ui.info(f"Scanning {settings.remote.model_hub} for Hugging Face snapshots...")
        snapshots, skipped = Agent(conn).discover(settings.remote.model_hub)
        skipped += [path for path, _ in snapshots if not usable_path(path)]
        for path in skipped:
            ui.warn(
                f"Skipped {_printable(path)}: its name holds characters a catalog entry cannot"
                " (control characters or bytes that are not UTF-8)."
            )
        return [(path, text) for path, text in snapshots if usable_path(path)]
    finally:
        if opened:
            conn.close()


def _printable(path: str) -> str:
    return "".join("?" if not usable_path(c) else c for c in path)


def _table(rows: list[tuple[str, ...]]) -> None:
    from alvis_fsm.text import inert_line as clean

    # Catalog descriptions and remote paths are other people's text: no escapes.
    rows = [tuple(clean(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]).rstrip())


def _show_discovered(
    found: list[Discovered], hub: str, verbosity: Verbosity, as_json: bool
) -> None:
    if as_json:
        click.echo(json.dumps({"hub": hub, "models": [asdict(d) for d in found]}, indent=2))
        return
    if verbosity <= Verbosity.QUIET:
        for d in found:
            click.echo(d.name)
        return
    if not found:
        click.echo(f"No Hugging Face snapshots (models--ORG--NAME/snapshots/HASH/) under {hub}.")
        click.echo("Check remote.model_hub (`alvis-fsm config show`).")
        return
    rows: list[tuple[str, ...]] = [("NAME", "MAX_LEN", "IN CATALOG", "REPO", "PATH")]
    for d in found:
        rows.append(
            (
                d.name,
                str(d.max_model_len) if d.max_model_len else "?",
                ("yes: " + ", ".join(d.catalog_names)) if d.in_catalog else "no",
                d.repo,
                d.path,
            )
        )
    _table(rows)
    click.echo("\nAdd one to your catalog: alvis-fsm models --discover --add NAME")


def _add(
    settings: Settings,
    catalog: Catalog,
    found: list[Discovered],
    name: str,
    verbosity: Verbosity,
    as_json: bool,
) -> None:
    from alvis_fsm.engine.fit.catalog import (
        ModelEntry,
        add_entry,
        check_model_name,
        user_catalog_path,
    )

    chosen, max_len = _chosen(settings, found, name)
    check_model_name(chosen.name)
    entry = ModelEntry(
        path=chosen.path,
        max_model_len=max_len,
        description=f"{chosen.repo} (found by models --discover)",
    )
    target = user_catalog_path(settings)
    shadowed = catalog.sources.get(chosen.name)
    add_entry(target, chosen.name, entry)
    if as_json:
        click.echo(
            json.dumps(
                {"added": {chosen.name: entry.model_dump()}, "catalog": str(target)}, indent=2
            )
        )
        return
    if verbosity <= Verbosity.QUIET:
        click.echo(chosen.name)
        return
    _say_added(chosen, max_len, target, shadowed)


def _chosen(settings: Settings, found: list[Discovered], name: str) -> tuple[Discovered, int]:
    """The one discovered snapshot ``name`` names (its name, repo or path),
    and its context length (it must have one)."""
    from alvis_fsm.engine.fit.catalog import user_catalog_path

    wanted = name.strip()
    matches = [d for d in found if d.name == wanted] or [
        d for d in found if d.repo.lower() == wanted.lower() or _norm(d.path) == _norm(wanted)
    ]
    if not matches:
        listing = "\n".join(f"  - {d.name}  ({d.repo})" for d in found) or "  (none)"
        raise UsageError(
            f"'{name}' is not among the models discovered under {settings.remote.model_hub}:",
            hint="Use a NAME from the list (`alvis-fsm models --discover`).",
            details=listing,
        )
    if len(matches) > 1:
        raise UsageError(
            f"'{name}' matches several snapshots: " + ", ".join(d.name for d in matches),
            hint="Use one of those names.",
        )
    chosen = matches[0]
    if chosen.max_model_len is None:
        raise ConfigError(
            f"{chosen.repo}'s config.json names no context length, so max_model_len is unknown",
            hint="Add the entry by hand to your catalog with the max_model_len you want"
            f" ({user_catalog_path(settings)}).",
            details=json.dumps({chosen.name: {"path": chosen.path, "max_model_len": 4096}}),
        )
    return chosen, chosen.max_model_len


def _say_added(chosen: Discovered, max_len: int, target: Path, shadowed: str | None) -> None:
    click.echo(f"Added '{chosen.name}' to {target} (max_model_len {max_len}).")
    if shadowed and Path(shadowed).expanduser() != target:
        click.echo(f"It overrides the entry of the same name in {shadowed}.")
    others = [n for n in chosen.catalog_names if n != chosen.name]
    if others:
        click.echo(f"The same snapshot is also in the catalog as: {', '.join(others)}.")
    if max_len > 32768:
        click.echo(
            "A long context needs GPU memory; lower max_model_len in the catalog if vLLM runs"
            " out of memory."
        )
    click.echo(f"Start it: alvis-fsm start -m {chosen.name}")


def run_discover(verbosity: Verbosity, as_json: bool, add: str | None) -> None:
    from alvis_fsm.engine.fit.catalog import load_catalog
    from alvis_fsm.fronts.cli.commands._common import settings as load

    settings = load()
    catalog = load_catalog(settings)
    quiet = Verbosity.QUIET if as_json else verbosity
    snapshots = scan_hub(settings, quiet)
    found = discovered_models(snapshots, catalog)
    if add is None:
        _show_discovered(found, settings.remote.model_hub, quiet, as_json)
    else:
        _add(settings, catalog, found, add, quiet, as_json)


# -- listing --------------------------------------------------------------------


def run(verbosity: Verbosity, as_json: bool, discover: bool, add: str | None) -> None:
    if add is not None and not discover:
        raise UsageError(
            "--add adds a model found by --discover",
            hint=f"alvis-fsm models --discover --add {add}",
        )
    if discover:
        run_discover(verbosity, as_json, add)
        return
    from alvis_fsm.engine.fit.catalog import load_catalog
    from alvis_fsm.engine.settings.model import load_settings

    settings = load_settings()
    catalog = load_catalog(settings)
    if as_json:
        models: dict[str, Any] = {
            name: {**entry.model_dump(), "source": catalog.sources[name]}
            for name, entry in sorted(catalog.entries.items())
        }
        click.echo(json.dumps({"models": models}, indent=2))
        return
    if verbosity <= Verbosity.QUIET:
        for name in catalog.names():
            click.echo(name)
        return
    packaged = str(paths.packaged_catalog())
    rows: list[tuple[str, ...]] = [("NAME", "MAX_LEN", "GPUS", "DESCRIPTION", "SOURCE")]
    for name in catalog.names():
        entry = catalog.entries[name]
        marker = "*" if name == settings.catalog.default_model else " "
        source = catalog.sources[name]
        rows.append(
            (
                f"{name}{marker}",
                str(entry.max_model_len),
                entry.gpus or f"({settings.slurm.gpus})",
                entry.description,
                "packaged" if source == packaged else _home(source),
            )
        )
    _table(rows)
    click.echo("\n* default model (catalog.default_model); GPUS in parentheses: slurm.gpus")


def _home(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home) :] if home != "/" and path.startswith(home + "/") else path
