"""One checked gate for every safetensors file a user hands fpstune (calibration sets, replay
records, model weights): the header is parsed here, from the bytes, before the safetensors
library reads any tensor.

The library itself raises ``NotImplementedError`` for dtypes torch cannot hold (float8 ones),
allocates whatever size a header declares (a 100 GB tensor in a sparse file is a MemoryError),
and a pickle or random bytes give a low-level error. Here each is one line naming the file and
the tensor, raised as the caller's error class (`BadInput` and friends: exit status 2).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

#: The dtypes fpstune reads (bytes per element). Float8 and the other exotic ones are refused.
DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
#: A header larger than this is not one fpstune wrote (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def memory_cap() -> int:
    """The most tensor bytes one file may declare: the machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 64 * 1024**3


def check_safetensors(
    path: str | os.PathLike[str], *, what: str, error: type[Exception], cap: int | None = None
) -> dict[str, list[int]]:
    """Check ``path``'s header and return ``{tensor name: shape}``; ``error`` (one line naming
    the file, and the tensor where one is at fault) if it is missing, not a regular file, not
    a safetensors file, holds a dtype outside `DTYPES`, or declares sizes that disagree with
    the file's or exceed ``cap`` bytes in all (default: `memory_cap`)."""
    where = str(path)
    p = Path(path)
    if not p.exists():
        raise error(f"{where}: no such {what}")
    if not p.is_file():
        raise error(f"{where}: not a regular file ({what})")
    cap = memory_cap() if cap is None else cap
    try:
        with p.open("rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{where}: not a safetensors file ({what}): too short")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise error(f"{where}: not a safetensors file ({what}): bad header length {n}")
            raw = f.read(n)
    except OSError as e:
        raise error(f"{where}: cannot read {what}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise error(f"{where}: not a safetensors file ({what}): header is not JSON") from None
    if not isinstance(header, dict):
        raise error(f"{where}: not a safetensors file ({what}): header is not a JSON object")
    data = size - 8 - n
    total = 0
    shapes: dict[str, list[int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shapes[name] = _check_entry(where, name, entry, data, error)
        total += math.prod(shapes[name]) * DTYPES[entry["dtype"]]
    # A sparse file (holes read as zeros) declares data that is not on disk: no file fpstune
    # writes has holes, and reading one would allocate the declared size for nothing.
    held = st.st_blocks * 512
    if total > held + 1024 * 1024:
        raise error(
            f"{where}: {what} declares {total} bytes of tensors but holds {held} on disk "
            "(a sparse or truncated file)"
        )
    if total > cap:
        raise error(
            f"{where}: {what} declares {total} bytes of tensors, more than the {cap} allowed"
        )
    return shapes


def _check_entry(
    where: str, name: str, entry: object, data: int, error: type[Exception]
) -> list[int]:
    if not isinstance(entry, dict):
        raise error(f"{where}: tensor {name!r}: not a tensor entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise error(
            f"{where}: tensor {name!r}: dtype {dtype!r} not supported "
            f"(supported: {', '.join(DTYPES)})"
        )
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise error(f"{where}: tensor {name!r}: bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data
    ):
        raise error(
            f"{where}: not a safetensors file (truncated?): tensor {name!r}: data offsets "
            f"{offsets!r} outside the file"
        )
    if math.prod(shape) * DTYPES[dtype] != offsets[1] - offsets[0]:
        raise error(
            f"{where}: tensor {name!r}: shape {shape} of {dtype} does not match its "
            f"{offsets[1] - offsets[0]} bytes"
        )
    return shape
