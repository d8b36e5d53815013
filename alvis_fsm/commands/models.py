"""``alvis-fsm models``: list the catalog (``--discover``/``--add`` come later)."""

from __future__ import annotations

import json
from typing import Any

import click

from alvis_fsm import paths
from alvis_fsm.errors import UsageError
from alvis_fsm.ui import Verbosity


def model_names() -> list[str]:
    """Catalog names for shell completion: never prints, never raises, since
    a traceback in the middle of a <TAB> would be worse than no completion."""
    try:
        from alvis_fsm.catalog import load_catalog
        from alvis_fsm.settings import load_settings

        return load_catalog(load_settings()).names()
    except Exception:
        pass
    try:  # broken settings or user catalog: the packaged names still help
        data = json.loads(paths.packaged_catalog().read_text(encoding="utf-8"))
        return sorted(str(name) for name in data)
    except Exception:
        return []


def run(verbosity: Verbosity, as_json: bool, discover: bool, add: str | None) -> None:
    if discover or add:
        raise UsageError(
            "model discovery is not available yet",
            hint="Add a model by hand to your catalog (see `alvis-fsm config show`,"
            " catalog.paths) or use `alvis-fsm models` to list the known ones.",
        )
    from alvis_fsm.catalog import load_catalog
    from alvis_fsm.settings import load_settings

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
    rows = [("NAME", "MAX_LEN", "GPUS", "DESCRIPTION", "SOURCE")]
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
                "packaged" if source == packaged else source,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]).rstrip())
    click.echo("\n* default model (catalog.default_model); GPUS in parentheses: slurm.gpus")
