"""alvis-fsm: a private vLLM server on the Chalmers Alvis cluster, one command away.

For scripts and notebooks: ``alvis_fsm.session(...)`` (see ``alvis_fsm.fronts.api``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from alvis_fsm.fronts.api import Session, session

__all__ = ["Session", "__version__", "session"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports this package for every command, and must stay fast.
    if name in ("session", "Session"):
        from alvis_fsm.fronts import api

        return getattr(api, name)
    raise AttributeError(f"module 'alvis_fsm' has no attribute {name!r}")
