"""Every word the staff page shows, from one file per language (``lang/<code>.toml``).

A translation is one file with the same keys. The file is read once; a key a
page asks for that the file lacks is an error at once, never a blank on a page.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

LANG_DIR = Path(__file__).resolve().parent / "lang"


class TextsError(KeyError):
    """A text the page asked for is not in the language file."""


class Texts:
    """One language's texts, by dotted key (``"login.title"``)."""

    def __init__(self, texts: dict[str, str], language: str) -> None:
        self.texts = texts
        self.language = language

    def __call__(self, key: str, /, **values: Any) -> str:
        try:
            text = self.texts[key]
        except KeyError:
            raise TextsError(f"no text {key!r} in the {self.language} texts") from None
        return text.format(**values) if values else text


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, str):
            flat[f"{prefix}{key}"] = value
        else:
            raise TextsError(f"text {prefix}{key} is not a string")
    return flat


def load(path: Path) -> Texts:
    """A language file's texts (its name without .toml is the language)."""
    with path.open("rb") as handle:
        return Texts(_flatten(tomllib.load(handle)), path.stem)


def language(code: str = "en") -> Texts:
    return load(LANG_DIR / f"{code}.toml")
