"""A gateway under test: served on a free loopback port, with a client to it
(shared by the gateway's unit tests)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from alvis_fsm.fronts.gateway.server import Gateway, serve


@contextlib.asynccontextmanager
async def client_of(gateway: Gateway, timeout: float = 30) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway serving, and a client to it; after the block (where the
    test shuts its models down) the gateway stops."""
    served = await serve(gateway, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{served.port}", trust_env=False, timeout=timeout
        ) as client:
            yield client
    finally:
        await served.runner.cleanup()
