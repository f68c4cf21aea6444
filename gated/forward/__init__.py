"""Forwarding entries and alarms to other systems over HTTP (DESIGN.md §12).

``endpoints`` turns ``[[forward]]`` tables into endpoints and bodies,
``outbox`` is their queue in the entry store, ``sender`` delivers it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gated.book.config import Config


def check(config: Config, fail: Any) -> None:
    """The ``[[forward]]`` tables, checked as the config loads (``config.add_check``)."""
    if config.forward:
        # jinja2 and the signing library load only on sites that forward.
        from gated.forward.endpoints import check as check_endpoints

        check_endpoints(config, fail)
