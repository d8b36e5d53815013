"""A gateway in a process of its own with a descriptor limit (argv[1]), for
test_gateway_bounds: the fake sessions and fake vLLM of test_gateway_http.
Prints its port, serves until stdin closes; its output is its log."""

from __future__ import annotations

import asyncio
import resource
import sys

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

from test_gateway_http import KEY, FakeSession, _upstream  # noqa: E402

from alvis_fsm.fronts.gateway.server import Gateway, LibraryLog, Options, serve  # noqa: E402
from alvis_fsm.fronts.gateway.slot.models import Models  # noqa: E402
from alvis_fsm.fronts.gateway.slot.recorder import Recorder  # noqa: E402


def echo(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def main() -> None:
    LibraryLog.install(echo)
    up, port, _ = await _upstream()

    def fake(model: str, observer: Recorder, lane: int) -> FakeSession:
        return FakeSession(model, observer, port, 0.1, False)

    models = Models({"m1": "org/m1"}, fake, echo)
    gateway = Gateway(
        KEY, models, Options(idle_timeout=600, keepalive_interval=0.1, idle_check=0.5)
    )
    served = await serve(gateway, "127.0.0.1", 0)
    print(served.port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await models.shutdown(10)
    await served.runner.cleanup()
    await up.cleanup()


asyncio.run(main())
