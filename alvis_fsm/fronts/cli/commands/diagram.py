"""`alvis-fsm diagram`: the session machine as a Mermaid state diagram.

Drawn from the packaged ``[machine]`` and ``[timeouts]`` (not the user's
overrides), so ``diagrams/session.mmd`` in the repository can be checked
for staleness against it."""

from __future__ import annotations

import click

from alvis_fsm.engine.session.machine import packaged_definition, packaged_timeouts, to_mermaid


def run() -> None:
    click.echo(to_mermaid(packaged_definition(), packaged_timeouts()), nl=False)
