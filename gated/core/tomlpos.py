"""Find the line a TOML key path was written on, so config errors can name it.

tomllib returns plain values with no positions; this is a small line scanner
over table headers and ``key =`` lines, good enough to point a person at the
right line of a hand-written config file.
"""

from __future__ import annotations

import re

Key = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _split_dotted(text: str) -> list[str]:
    parts = []
    for raw in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', text):
        part = raw.strip()
        if part[:1] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return parts


def key_lines(text: str) -> dict[Key, int]:
    """Map every table and key path in ``text`` to the 1-based line it starts on."""
    lines: dict[Key, int] = {}
    table: list[str | int] = []
    counts: dict[Key, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            parts: list[str | int] = list(_split_dotted(header.group(2)))
            if header.group(1) == "[[":
                base = tuple(parts)
                index = counts.get(base, 0)
                counts[base] = index + 1
                lines.setdefault(base, number)
                parts.append(index)
            table = parts
            lines.setdefault(tuple(table), number)
            continue
        assign = _ASSIGN.match(line)
        if assign:
            path = (*table, *_split_dotted(assign.group(1)))
            lines.setdefault(path, number)
    return lines


def line_of(lines: dict[Key, int], path: Key) -> int | None:
    """The line of ``path`` or of its nearest written ancestor."""
    for end in range(len(path), 0, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return None


def parse_path(text: str) -> Key:
    """Turn ``codes[2].gates`` or msgspec's ``$.codes[2].gates`` into a key tuple."""
    text = text.removeprefix("$").lstrip(".")
    key: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", text):
        key.append(int(index) if index else name)
    return tuple(key)


def format_path(key: Key) -> str:
    """The inverse of :func:`parse_path`: ``('codes', 2, 'gates')`` -> ``codes[2].gates``."""
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
