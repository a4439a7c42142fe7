"""The one bounded YAML reader for every file fpstune reads (policies, studies, search spaces).

Hostile files cannot hang or exhaust the reader: only regular files are read (a FIFO, device or
socket is refused without blocking, symlinks are followed and their target checked), at most
``max_bytes`` are read whatever ``st_size`` says, anchors and aliases are refused (so no alias
bomb can expand), the number of nodes is capped, and duplicate keys are refused. The result is
plain data (a `yaml.SafeLoader`). Every failure is a `YamlInputError` with a one-line message.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 20_000  # the shipped studies, spaces and policies hold 100-160 nodes


class YamlInputError(ValueError):
    """A YAML file that cannot be read as plain data. ``message`` is one line without the file;
    ``key``/``line``/``first`` are set for a duplicate key (``line`` is 1-based)."""

    def __init__(
        self, message: str, *, key: str | None = None, line: int = 0, first: int = 0
    ) -> None:
        super().__init__(message)
        self.message, self.key, self.line, self.first = message, key, line, first


def read_bytes(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """At most ``max_bytes`` of a regular file; `YamlInputError` for anything else."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise YamlInputError("no such file") from None
    except IsADirectoryError:
        raise YamlInputError("is a directory, expected a YAML file") from None
    except OSError as e:
        raise YamlInputError(f"cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise YamlInputError("is a directory, expected a YAML file")
        if not stat.S_ISREG(mode):
            raise YamlInputError("not a regular file (a device, FIFO or socket)")
        chunks: list[bytes] = []
        left = max_bytes + 1  # one byte more than allowed tells "too big" from "exactly the cap"
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise YamlInputError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise YamlInputError(f"more than {max_bytes} bytes, too big for this kind of file")
    return data


def read_yaml(path: str | os.PathLike[str], *, max_bytes: int, max_nodes: int = MAX_NODES) -> Any:
    """The plain data of a YAML file (None when empty), read within the bounds above."""
    raw = read_bytes(Path(path), max_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise YamlInputError(f"not UTF-8 text (byte {e.start})") from None
    try:
        loader = _Loader(text, max_nodes)  # checks the characters already
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except YamlInputError:
        raise
    except yaml.YAMLError as e:
        raise YamlInputError(f"not valid YAML: {_problem(e)}") from None
    except (ValueError, RecursionError) as e:  # e.g. a timestamp like 2026-13-45
        raise YamlInputError(f"not valid YAML: {e}") from None


def _problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    return f"{problem}{where}"


def _at(mark: Any) -> str:
    return f" (line {mark.line + 1})" if mark is not None else ""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and duplicate keys and counts nodes."""

    def __init__(self, text: str, max_nodes: int) -> None:
        super().__init__(text)
        self._nodes_left = max_nodes
        self._max_nodes = max_nodes

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise YamlInputError(f"YAML anchors/aliases are not allowed{_at(event.start_mark)}")
        self._nodes_left -= 1
        if self._nodes_left < 0:
            raise YamlInputError(
                f"more than {self._max_nodes} YAML nodes, too many for this kind of file"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                mark = key_node.start_mark
                line = mark.line + 1
                if key in seen:
                    raise YamlInputError(
                        f"not valid YAML: duplicate key {key_node.value!r}"
                        f" at line {line}, column {mark.column + 1}",
                        key=key_node.value,
                        line=line,
                        first=seen[key],
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)
