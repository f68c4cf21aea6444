"""What reaches the log from outside: never a request line, never a control character."""

from __future__ import annotations

import sqlite3
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from gated.cli import main
from gated.store import INSERT_ENTRY, Entry, read_entries

from .helpers import BARRIER, TOKEN, write_config
from .process import DaemonProcess, free_port

CODE = "471123"


HOSTILE = "\x1b\u009b\u202e\u200f\u2028"  # ESC, C1 CSI, RLO override, RLM mark, line separator
NAMED = '\n[[codes]]\nname = "Night\\u202e shift"\ncode = "8888"\ngates = ["barrier"]\n'


def test_control_and_bidi_characters_reach_no_log_entry_or_gated_log(tmp_path: Path,
                                                                      capsys: Any) -> None:
    """C0/C1 controls, bidi overrides and marks in a callername (or a credential's name, or
    a row stored before) are gone from the daemon's log, the stored entry and `gated log`."""
    port = free_port()
    config = write_config(tmp_path, NAMED)
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    daemon = DaemonProcess(config)
    name = urllib.parse.quote(f"Jos\u00e9{HOSTILE}[31m")
    try:
        daemon.wait_for("listening")
        url = (f"http://127.0.0.1:{port}/voipgrid?token={TOKEN}&code=8888"
               f"&did=%2B{BARRIER[1:]}&callername={name}")
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.read() == b"status=ACK"
        entry = daemon.wait_for("entry")
    finally:
        daemon.stop()
    assert entry["callername"] == "José [31m" and entry["credential"] == "Night shift"
    logged = "".join(str(v) for e in daemon.events for v in e.values())
    assert not set(HOSTILE) & set(logged)
    store = tmp_path / "state" / "entries.sqlite3"
    (stored,) = read_entries(store)
    assert stored.callername == "José [31m"
    old = Entry(time=stored.time, gate="barrier", caller=None, did=None, status="NAK",
                reason="unknown_code", callername=f"old{HOSTILE}row")
    with sqlite3.connect(store) as conn:
        conn.execute(INSERT_ENTRY, tuple(old.as_dict().values()))
    conn.close()
    capsys.readouterr()
    assert main(["-c", str(config), "log"]) == 0
    assert main(["-c", str(config), "log", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Night shift" in out and "old row" in out and "José [31m" in out
    assert not set(HOSTILE) & set(out) and "\\u001b" not in out
