"""The one retry policy (alvis_fsm/retry.py)."""

from __future__ import annotations

import threading
import time

from alvis_fsm.retry import Backoff


def delays(b: Backoff, n: int) -> list[float]:
    out = []
    for _ in range(n):
        b.failed()
        out.append(b.delay)
    return out


def test_doubles_up_to_the_cap() -> None:
    assert delays(Backoff(first=0.5, most=5), 6) == [0.5, 1, 2, 4, 5, 5]


def test_immediate_first_retry() -> None:
    assert delays(Backoff(first=0.5, most=60, immediate=True), 4) == [0, 0.5, 1, 2]


def test_a_healthy_run_starts_the_count_again() -> None:
    b = Backoff(first=1, most=60, immediate=True, healthy=30)
    assert [b.failed(lived=1) for _ in range(3)] == [1, 2, 3]
    assert b.delay == 2
    assert b.failed(lived=31) == 1 and b.delay == 0


def test_due_and_reset() -> None:
    b = Backoff(first=60)
    assert b.due()
    b.failed()
    assert not b.due()
    b.reset()
    assert b.due() and b.failures == 0


def test_wait_returns_early_when_stopped() -> None:
    b = Backoff(first=30)
    b.failed()
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    assert b.wait(stop) is False
    assert time.monotonic() - t0 < 5
    quick = Backoff(first=0.01)
    quick.failed()
    assert quick.wait() is True


def test_no_other_backoff_loop_in_the_package() -> None:
    """One retry policy: a doubling delay is written only in retry.py."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "alvis_fsm"
    doubling = re.compile(r"(delay|backoff|wait)\w*\s*(\*=\s*2|=\s*min\(.*\*\s*2)")
    found = [
        f"{p.relative_to(package)}:{n}"
        for p in package.rglob("*.py")
        if p.name != "retry.py"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if doubling.search(line)
    ]
    assert found == []
    # ... and the policy is used where the package tries again.
    users = {
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if "Backoff(" in p.read_text(encoding="utf-8") and p.name != "retry.py"
    }
    assert users >= {
        "cluster/ssh.py",
        "engine/session/tunnel_keeper.py",
        "engine/session/log_stream.py",
        "engine/session/ownership.py",
    }  # ownership: the supervisor
