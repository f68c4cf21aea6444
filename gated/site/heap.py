"""Handing freed heap back to the system after a large load."""

from __future__ import annotations

import contextlib
import ctypes


def release_memory() -> None:
    """Hand the heap freed after a large load back to the system (glibc only).

    Loading or reloading 100,000 codes, or taking in a fleet's set of 50,000,
    frees megabytes that glibc would otherwise keep mapped for the life of the
    daemon; on a 512 MB Pi that matters.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
