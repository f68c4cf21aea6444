"""The entry line, one per call: written without structlog's chain, the line it writes."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gated.site.logs import iso_utc

from .helpers import BARRIER, write_config

# logs.configure() sets up the process for good (loggers cache their set-up on
# first use), so each case runs in a process of its own, as the daemon does.
# Its lines go to a buffer the script reads back; it prints what it saw.
SCRIPT = """
import asyncio, io, json, sys
import structlog
from gpiozero.pins.mock import MockFactory
from structlog.testing import capture_logs
from gated.book import compiler
from gated.site import logs
from gated.actuators import build
from gated.core.clock import SystemClock
from gated.core.decide import Ledger
from gated.site.gatekeeper import Gatekeeper, RawCall
from gated.core.lockout import Policy
from gated.site.store import Store

out, sys.stdout = sys.stdout, io.StringIO()
logs.configure({fmt!r}, {level!r})


async def main():
    loaded = compiler.load({config!r})
    factory = MockFactory()
    actuators = {{name: build(name, gate.actuator, mock_factory=factory)
                 for name, gate in loaded.config.gates.items()}}
    store = Store.open(loaded.store_path)
    gatekeeper = Gatekeeper(loaded.book, Ledger.fresh(Policy()), actuators, store,
                            SystemClock(), deadline=3.0)
    entries = []
    gatekeeper.listeners.append(entries.append)
    writer = asyncio.create_task(store.run())
    call = RawCall(code="471123", did={did!r}, callerid="0612345678",
                   callername="Jos\\u00e9 \\u2603", call_id="CA0123")
    await gatekeeper.call(call)
    line = sys.stdout.getvalue()
    # The same entry as the code before the fast path logged it, through the chain.
    (entry,) = entries  # durable: a healthy store, well within the deadline
    mark = len(line)
    structlog.get_logger("gated").info("entry", **{{
        k: v for k, v in entry.as_dict().items() if k != "time" and v not in ("", None)}},
        durable=True)
    chain = sys.stdout.getvalue()[mark:]
    with capture_logs() as captured:
        await gatekeeper.call(call)
    after = sys.stdout.getvalue()[mark + len(chain):]
    writer.cancel()
    store.close()
    print(json.dumps({{"line": line, "chain": chain, "after": after,
                      "captured": [e["event"] for e in captured]}}), file=out)

asyncio.run(main())
"""

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


def run(tmp_path: Path, fmt: str, level: str) -> dict[str, str]:
    script = SCRIPT.format(fmt=fmt, level=level, config=str(write_config(tmp_path)),
                           did=BARRIER)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def entry_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "entry" in line]


def test_the_json_entry_line_is_the_line_structlog_renders_for_it(tmp_path: Path) -> None:
    """Under the JSON format the entry line has the fields, key order, values and
    timestamp form that structlog's chain renders for the same entry; no digit typed."""
    result = run(tmp_path, "json", "info")
    (line,), (chain,) = entry_lines(result["line"]), entry_lines(result["chain"])
    fast, slow = json.loads(line), json.loads(chain)
    assert list(fast) == list(slow)
    assert list(fast)[-3:] == ["event", "level", "timestamp"]
    assert STAMP.fullmatch(fast.pop("timestamp")) and STAMP.fullmatch(slow.pop("timestamp"))
    assert fast == slow
    assert fast["callername"] == "José ☃" and fast["durable"] is True
    assert "471123" not in result["line"] + result["chain"]


def test_an_entry_still_reaches_a_test_capturing_logs(tmp_path: Path) -> None:
    """With the JSON format configured, ``capture_logs`` still receives the entry (and
    the line is not printed meanwhile), as tests of the daemon rely on."""
    result = run(tmp_path, "json", "info")
    assert "entry" in result["captured"]
    assert entry_lines(result["after"]) == []


@pytest.mark.parametrize(("fmt", "level", "lines"), [("json", "warning", 0),
                                                     ("console", "info", 1)])
def test_the_entry_line_follows_the_configured_level_and_format(
        tmp_path: Path, fmt: str, level: str, lines: int) -> None:
    """Above info no entry line is written; on the console format it is structlog's own
    line, the same as the chain's for the same entry."""
    result = run(tmp_path, fmt, level)
    line, chain = entry_lines(result["line"]), entry_lines(result["chain"])
    assert len(line) == len(chain) == lines
    masked = [re.sub(r"^\S+ \S+ ", "", text) for text in line + chain]  # the time
    assert masked[:lines] == masked[lines:]
    if fmt == "console":
        assert not line[0].startswith("{")


@pytest.mark.parametrize("ns", [
    1_790_000_000_000_000_000,  # on the second: no fraction, as datetime writes it
    1_790_000_000_000_000_999,  # under a microsecond past it: floored away
    1_790_000_000_000_001_000,
    1_790_000_000_999_999_999,
    1_790_000_001_000_000_000,  # the next second, after one cached
    951_782_400_123_456_789,  # a leap day
])
def test_entry_timestamps_read_as_structlogs_iso_stamps(ns: int) -> None:
    """The entry line's timestamp is the text structlog's TimeStamper(fmt="iso",
    utc=True) makes for the same instant."""
    seconds, micro = divmod(ns // 1000, 1_000_000)
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC).replace(microsecond=micro)
    assert iso_utc(ns) == moment.isoformat().replace("+00:00", "Z")
