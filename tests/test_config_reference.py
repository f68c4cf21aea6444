"""docs/config.md against the loader: every key it accepts, its default and what applies it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import msgspec
from msgspec import inspect

from gated.book import config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config.md"
NAME = "<name>"


def _tables(info: inspect.StructType, path: str) -> Iterator[tuple[str, str, inspect.StructType]]:
    """Each table the loader accepts under ``path``: its path, its ``type`` tag, its struct."""
    yield path, "", info
    for field in info.fields:
        kind = field.type
        where = f"{path}.{field.name}" if path else field.name
        if isinstance(kind, inspect.DictType):
            kind, where = kind.value_type, f"{where}.{NAME}"
        elif isinstance(kind, inspect.ListType) and isinstance(kind.item_type, inspect.StructType):
            kind = kind.item_type
        members = kind.types if isinstance(kind, inspect.UnionType) else (kind,)
        structs = [m for m in members if isinstance(m, inspect.StructType)]
        for struct in structs:
            for table, tag, inner in _tables(struct, where):
                yield table, str(struct.tag or "") if table == where else tag, inner


def _is_table(field: inspect.Field) -> bool:
    kind = field.type
    if isinstance(kind, inspect.DictType):
        kind = kind.value_type
    if isinstance(kind, inspect.ListType):
        kind = kind.item_type
    members = kind.types if isinstance(kind, inspect.UnionType) else (kind,)
    return any(isinstance(m, inspect.StructType) for m in members)


def default(field: inspect.Field) -> str:
    """A key's default as the page writes it (TOML), or ``required``."""
    if field.required:
        return "required"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if value is None:
        return "unset"
    return "`" + (("true" if value else "false") if isinstance(value, bool)
                  else msgspec.json.encode(value).decode()) + "`"


def expected() -> dict[tuple[str, str], dict[str, tuple[str, str]]]:
    """Per (table, tag): each key's default and whether a reload applies it."""
    tables: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    for path, tag, info in _tables(inspect.type_info(config.Config), ""):
        keys = tables.setdefault((path, tag), {})
        if tag:
            keys["type"] = (f'`"{tag}"`', config.applies(f"{path}.type"))
        for field in info.fields:
            if not _is_table(field):
                keys[field.name] = (default(field), config.applies(f"{path}.{field.name}"))
    return {where: keys for where, keys in tables.items() if keys}


def documented() -> dict[tuple[str, str], dict[str, tuple[str, str]]]:
    """The same, as docs/config.md's headings and tables say."""
    tables: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    keys: dict[str, tuple[str, str]] = {}
    for line in PAGE.read_text().splitlines():
        heading = re.match(r"#{2,3} `\[{1,2}([^\]`]+)\]{1,2}`(.*)", line)
        if heading:
            tags = re.findall(r'type = "(\w+)"', heading.group(2)) or [""]
            keys = {}
            for tag in tags:
                tables[(heading.group(1), tag)] = keys
            continue
        row = re.match(r"\| `(\w+)` \| [^|]+ \| ([^|]+) \| (reload|restart) \|", line)
        if row:
            keys[row.group(1)] = (row.group(2).strip(), row.group(3))
    for (path, tag), table in tables.items():
        if tag:
            table = tables[(path, tag)] = dict(table)
            table["type"] = (f'`"{tag}"`', config.applies(f"{path}.type"))
    return tables


def test_the_config_reference_names_every_key_the_loader_accepts_and_no_other() -> None:
    """docs/config.md has a row for each key of each table, with the loader's default and
    the reload list's word, and nothing the loader would refuse as an unknown key."""
    want, have = expected(), documented()
    assert sorted(want) == sorted(have)
    for where, keys in want.items():
        assert keys == have[where], where


def test_every_key_the_reload_list_names_exists() -> None:
    """Each path in the one reload-versus-restart list names a table or key the loader takes."""
    known = {f"{path}.{key}" for (path, _), keys in expected().items() for key in keys}
    known |= {path for path, _ in expected()}
    for path in (*config.RESTART_ONLY, *config.RESTART_TO_ADD):
        assert path in known, path
