"""Where a command will write, checked before it does any work (a study load, a re-measurement)."""

from __future__ import annotations

import os
from pathlib import Path

from fpstune.errors import BadInput


def check_output(path: Path, *, option: str = "-o") -> None:
    """`BadInput` ``<option>: <path>: <reason>`` unless ``path`` can be written as a file: it is
    not a folder, and its nearest existing ancestor is a folder this process may write to (the
    folders missing below it are created when the file is written). Writes nothing."""
    try:
        if path.is_dir():
            raise BadInput(f"{option}: {path}: is a folder; give a file name (e.g. {path}/FILE)")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise BadInput(f"{option}: {path}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise BadInput(f"{option}: {path}: folder {parent} is not writable")
    except OSError as e:  # e.g. a folder on the way that may not be searched
        raise BadInput(f"{option}: {path}: {e.strerror or e}") from None
