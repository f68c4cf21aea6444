"""Forwarding entries and alarms to other systems over HTTP (DESIGN.md §12).

``endpoints`` turns ``[[forward]]`` tables into endpoints and bodies,
``outbox`` is their queue in the entry store, ``sender`` delivers it.
"""
