"""The gateway's own API key: generated once, kept 0600 in the state dir."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

FILE = "gateway.key"


def key_path(state_dir: Path) -> Path:
    return state_dir / FILE


def gateway_key(state_dir: Path) -> str:
    """The key in ``state_dir/gateway.key``, created (0600, atomically: two
    gateways starting at once agree on one key) if there is none yet."""
    path = key_path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        text = ""
    if text:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # a key others may read is no key
        return text
    key = "afsm-gw-" + secrets.token_urlsafe(32)
    tmp = path.with_name(f".{FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another gateway was first
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return key


def matches(given: str, key: str) -> bool:
    """In constant time. ``given`` is what a client sent: aiohttp hands
    header bytes that are not UTF-8 over as surrogates, which are no key
    (and no 500)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode())
