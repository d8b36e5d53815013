"""Files the tool writes, written whole or not at all: the one atomic write.

Session records, batch records, settings, the user catalog, the gateway's
entry and key all go through it, so a crash (or a full disk) mid-write
never leaves half a file where a whole one was."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` atomically: temp file in the same
    directory, fsync, rename, fsync the directory (so a crash right after
    cannot bring back the previous content, e.g. a lost job id). Used for
    every file the tool writes: session state, settings, user catalog."""
    with atomic_writer(path, mode) as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o600) -> Iterator[TextIO]:
    """``atomic_write`` for content written piece by piece (a file too large
    to hold in memory): the handle's content replaces ``path`` when the
    block ends normally; on an exception ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
