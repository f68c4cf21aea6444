"""QR codes for TOTP enrolment: on the terminal, or as a PNG or SVG file.

A QR code printed as block characters in the terminal's own colours reads on
a dark background and comes out inverted on a light one (scanners that do not
try inverted codes see nothing). So every cell carries its colour: black
modules on a white quiet zone, whatever the terminal's theme.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from gated.book import files

if TYPE_CHECKING:
    import segno

QUIET_ZONE = 4  # modules, as the QR standard asks
# From the 256-colour cube: exact black and white. The 16 basic colours are
# the theme's to redefine ("white" is often grey, "black" dark blue).
DARK = 16
LIGHT = 231
UPPER_HALF = "\u2580"
RESET = "\033[0m"
KINDS = (".png", ".svg")


def make(text: str) -> segno.QRCode:
    import segno

    return segno.make(text, error="m")


def terminal(qr: segno.QRCode, out: TextIO) -> None:
    """Two module rows per line: the upper half block in the top module's colour
    on the bottom module's."""
    rows = [[LIGHT if not dark else DARK for dark in row]
            for row in qr.matrix_iter(scale=1, border=QUIET_ZONE)]
    if len(rows) % 2:
        rows.append([LIGHT] * len(rows[0]))
    for top, bottom in zip(rows[::2], rows[1::2], strict=True):
        line = []
        current: tuple[int, int] | None = None
        for colours in zip(top, bottom, strict=True):
            if colours != current:
                line.append(f"\033[38;5;{colours[0]};48;5;{colours[1]}m")
                current = colours
            line.append(UPPER_HALF)
        out.write("".join(line) + RESET + "\n")


def check_file(path: Path) -> None:
    """Refuse a name whose kind is not one we write, before anything else is done."""
    if path.suffix.lower() not in KINDS:
        raise files.FileError(f"--qr: the file name must end in {' or '.join(KINDS)}: {path}")
    if not path.parent.is_dir():
        raise files.FileError(f"--qr: no folder {path.parent}")


def save(qr: segno.QRCode, path: Path) -> None:
    """Write the code to ``path`` (0600: it holds the secret), replaced whole."""
    import io

    buffer = io.BytesIO()
    kind = path.suffix.lower().removeprefix(".")
    qr.save(buffer, kind=kind, scale=8, border=QUIET_ZONE, dark="#000", light="#fff")
    files.replace(path, buffer.getvalue())
