"""structlog set-up: JSON lines under systemd, readable console on a terminal.

Records from aiohttp and asyncio pass a filter first: they name what failed,
never what a client sent (a request line carries the token and the code), and
a failure that repeats (an accept loop out of file handles) is shown once per
``REPEAT_WINDOW`` with a count, not thousands of times a second.

Every call writes one line, its entry; ``entry()`` writes that line as JSON
without structlog's generic chain, which cost more than the line itself, and
``entries()`` writes a committed batch's lines in one write (the store's
thread does, as the batch commits).
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import msgspec
import structlog

from gated.core.printable import printable

REPEAT_WINDOW = 10.0
# How many kinds of repeated record are remembered; past it, the oldest are forgotten.
MAX_KINDS = 256
# A str or bytes literal in a repr: how outside text gets into a library's message.
_QUOTED = re.compile(r"""[bBrRuU]{0,2}(['"])(?:\\.|(?!\1).)*\1""", re.DOTALL)
_LIBRARIES = ("aiohttp", "asyncio")
_MULTILINE = frozenset({"exception", "stack"})


class Withheld(Exception):
    """Stands in for a library's exception: its type and traceback, not its message."""


def _error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return f"{type(exc).__name__}({errno.errorcode[exc.errno]})"
    return type(exc).__name__


def _unparsable(exc: BaseException) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(exc, HttpProcessingError)


class LibraryRecords(logging.Filter):
    """aiohttp's and asyncio's records without client text, and repeats summarised."""

    def __init__(self, window: float = REPEAT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        # (logger, message, error) -> (when last shown, how many withheld since)
        self.kinds: dict[tuple[str, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_LIBRARIES):
            return True
        if record.name == "aiohttp.access":  # every line of it is a request line
            return False
        self._withhold_client_text(record)
        return self._first_of_its_kind(record)

    def _withhold_client_text(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            error = record.error = _error(exc)
            if record.name.startswith("aiohttp") and _unparsable(exc):
                # The parser refused the bytes; its message quotes them. The peer
                # is the one argument of aiohttp's "Error handling request from %s".
                args = record.args
                if isinstance(args, tuple) and len(args) == 1:
                    record.remote = args[0]
                record.msg, record.args, record.exc_info = "bad request refused", (), None
                record.levelno = min(record.levelno, logging.WARNING)
                record.levelname = logging.getLevelName(record.levelno)
            else:
                # A real fault: keep where it happened, not what it said.
                assert record.exc_info is not None
                record.exc_info = (Withheld, Withheld(error), record.exc_info[2])
            record.exc_text = None
        # asyncio puts reprs (transport, future with its exception) on the lines
        # after the first; a repr's quoted literals can hold what a client sent.
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: logging's own case
            message = str(record.msg)
        record.msg, record.args = _QUOTED.sub("\u2026", message.partition("\n")[0]), ()

    def _first_of_its_kind(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg), getattr(record, "error", ""))
        now = self.clock()
        shown, withheld = self.kinds.get(key, (None, 0))
        if shown is not None and now - shown < self.window:
            self.kinds[key] = (shown, withheld + 1)
            return False
        if withheld:
            record.repeated = withheld
        if len(self.kinds) >= MAX_KINDS and key not in self.kinds:
            del self.kinds[next(iter(self.kinds))]
        self.kinds.pop(key, None)  # re-inserted last: the dict stays oldest-first
        self.kinds[key] = (now, 0)
        return True


def _printable_values(_logger: Any, _name: str,
                      event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Tracebacks keep their line breaks; every other value is one printable line.
    # (Runs on every call's entry line: the clean case costs one C check a value.)
    for key, value in event.items():
        if type(value) is str and not value.isprintable() and key not in _MULTILINE:
            event[key] = printable(value)
    return event


def _json(event: dict[str, Any], default: Callable[[Any], Any]) -> str:
    # Every call writes an entry line: msgspec (already a dependency) renders
    # it in ~0.3 us where json.dumps took ~2.4 us. Compact separators, UTF-8
    # kept as is; values it cannot encode go through structlog's fallback
    # (repr), as with json.dumps.
    return msgspec.json.encode(event, enc_hook=default).decode()


# The date and time to the second, for the second it was last asked for.
_second: tuple[int, str] = (-1, "")


def iso_utc(ns: int) -> str:
    """``TimeStamper(fmt="iso", utc=True)``'s text for epoch nanoseconds ``ns``.

    datetime's isoformat: microseconds floored and left out when zero, the
    offset as Z. A third of its cost: the part to the second is made once a
    second.
    """
    global _second
    seconds, micro = divmod(ns // 1000, 1_000_000)
    second = _second
    if second[0] != seconds:
        second = _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{second[1]}.{micro:06d}Z" if micro else f"{second[1]}Z"


# Entry fields are str, float, bool: repr, structlog's fallback, is never reached.
_ENTRY_JSON = msgspec.json.Encoder(enc_hook=repr)


class _EntryLine:
    """The JSON entry line, built the way the installed processors build it.

    A dict in the order structlog builds it (the fields, event, level,
    timestamp), the same values, the same printable check, rendered by msgspec
    as the JSON renderer does and printed by the same PrintLogger, so the line
    is the one ``log.info("entry", **fields)`` writes, without what that adds
    per line: the bound logger's proxy and context copy, the loop over
    processors, a scan of every context variable for bound ones (while none was
    ever bound) and the exception renderer (an entry carries no exception).
    """

    __slots__ = ("factory", "printer", "processors", "render", "wrapper", "writes")

    def __init__(self, processors: list[Any], render: Any, wrapper: Any,
                 factory: Any, writes: bool) -> None:
        self.processors = processors
        self.render = render
        self.wrapper = wrapper
        self.factory = factory
        self.printer = factory()  # the PrintLogger structlog writes with: same stream, same lock
        self.writes = writes  # the configured level lets info lines through

    def installed(self) -> bool:
        """Whether structlog still runs on what configure() installed.

        A test's ``capture_logs`` (which swaps the processors in place) or any
        later ``structlog.configure`` gets the entry through structlog instead.
        """
        config = structlog.get_config()
        processors = self.processors
        return (config["processors"] is processors and processors[-1] is self.render
                and config["wrapper_class"] is self.wrapper
                and config["logger_factory"] is self.factory)

    def write(self, fields: dict[str, Any]) -> None:
        if not self.writes:
            return
        fields["event"] = "entry"
        if _CONTEXT_VARS is None or _CONTEXT_VARS:
            structlog.contextvars.merge_contextvars(None, "info", fields)
        fields["level"] = "info"
        fields["timestamp"] = iso_utc(time.time_ns())
        _printable_values(None, "info", fields)
        self.printer.msg(_ENTRY_JSON.encode(fields).decode())

    def write_many(self, batch: Sequence[dict[str, Any]]) -> None:
        """Several lines, each as ``write`` makes it, in one write to the stream."""
        if not self.writes:
            return
        merge = _CONTEXT_VARS is None or bool(_CONTEXT_VARS)
        stamp = iso_utc(time.time_ns())
        encode = _ENTRY_JSON.encode
        rendered = []
        for fields in batch:
            fields["event"] = "entry"
            if merge:
                structlog.contextvars.merge_contextvars(None, "info", fields)
            fields["level"] = "info"
            fields["timestamp"] = stamp
            _printable_values(None, "info", fields)
            rendered.append(encode(fields).decode())
        self.printer.msg("\n".join(rendered))


# structlog's register of context variables ever bound: while it is empty, no
# line has any to merge. (None if structlog stops keeping it: always merge.)
_CONTEXT_VARS: dict[str, Any] | None = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
_entry_line: _EntryLine | None = None
_log = structlog.get_logger("gated")


def entry(fields: dict[str, Any]) -> None:
    """Log one call's entry: the line ``log.info("entry", **fields)`` writes."""
    line = _entry_line
    if line is not None and line.installed():
        line.write(fields)
    else:
        _log.info("entry", **fields)


def entries(batch: Sequence[dict[str, Any]]) -> None:
    """Log several entries (a batch as it commits, from the store's thread): the
    lines ``entry`` writes, in one write to the stream."""
    line = _entry_line
    if line is not None and line.installed():
        line.write_many(batch)
    else:
        for fields in batch:
            _log.info("entry", **fields)


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Route structlog and stdlib logging (aiohttp, asyncio) to stdout."""
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json) if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty(),
                                           exception_formatter=structlog.dev.plain_traceback)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        # Never show_locals: a handler's locals hold the token and the code.
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
    shared.append(_printable_values)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    processors = [*shared, renderer]
    wrapper = structlog.make_filtering_bound_logger(numeric)
    factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    global _entry_line
    # A console line keeps structlog's renderer (the entry is one line among many there).
    _entry_line = (_EntryLine(processors, renderer, wrapper, factory,
                              writes=numeric <= logging.INFO) if json_lines else None)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(("remote", "error", "repeated")),
                           *shared],
    ))
    handler.addFilter(LibraryRecords())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # aiohttp's access log would print the query string: token and code.
    logging.getLogger("aiohttp.access").disabled = True
