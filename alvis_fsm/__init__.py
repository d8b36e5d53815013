"""alvis-fsm: a private vLLM server on the Chalmers Alvis cluster, one command away.

For scripts and notebooks: ``alvis_fsm.session(...)`` (see ``alvis_fsm.fronts.api.session``);
batches: ``alvis_fsm.batch(...)``, ``alvis_fsm.batches()`` (``alvis_fsm.fronts.api.batch``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from alvis_fsm.fronts.api.batch import Batch, batch, batches, get_batch
    from alvis_fsm.fronts.api.session import Session, session

__all__ = ["Batch", "Session", "__version__", "batch", "batches", "get_batch", "session"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports this package for every command, and must stay fast.
    if name in ("session", "Session"):
        from alvis_fsm.fronts.api import session as api

        return getattr(api, name)
    if name in ("batch", "batches", "get_batch", "Batch"):
        from alvis_fsm.fronts.api import batch as batch_api

        return getattr(batch_api, name)
    raise AttributeError(f"module 'alvis_fsm' has no attribute {name!r}")
