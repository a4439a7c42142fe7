"""Writing a file so that a reader never sees half of it: a temp file in the same folder, then
`os.replace`. Used by every file fpstune writes (policies, latency tables, calibration sets,
replay records, reports)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp file beside ``path`` to write; when the block ends it replaces ``path`` (mode
    0644: mkstemp creates 0600), or is removed if the block raised. The folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """``text`` as UTF-8 into ``path``, atomically and flushed to disk before the rename."""
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
