"""Outside text made safe to print and store.

Caller names, credential names and topic ids come from outside. Printed as
they are, a control character (ESC, or the C1 CSI U+009B) drives the
terminal reading the journal or ``gated log``, and a bidi override (U+202E)
or mark (U+200F) reorders the rest of the line so it says something else.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` on one line without controls, format characters (bidi included),
    surrogates or unassigned code points; any other space or line break becomes a space."""
    if text.isprintable():  # nearly always: one pass in C, nothing copied
        return text
    return "".join(c if c.isprintable() else " " if c.isspace() else "" for c in text)
