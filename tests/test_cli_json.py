"""Every command that reports speaks JSON with --json, with ISO 8601 times."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from gated.cli import build_parser

from .broker import Mosquitto, mqtt_ready, mqtt_table
from .forwarding import forward_table
from .helpers import BARRIER, TOKEN
from .test_cli_codes import gated

ROUTE = """
[[routes]]
name = "Key accounts"
numbers = ["+31501234500"]
callers = ["+31201234567"]
destination = "+31501234510"
"""
# Commands that report, each with the arguments it needs besides --json.
REPORTING = [
    ("check-config",), ("check-config", "--codes"), ("log",), ("codes", "ls"),
    ("codes", "ls", "--broker"), ("routes", "ls"), ("routes", "ls", "--broker"),
    ("forward", "ls"), ("doctor",), ("lockout", "ls"),
]
TIME_KEYS = {"time", "valid_from", "valid_until", "until", "oldest_pending"}


def _subparser(parser: argparse.ArgumentParser, words: tuple[str, ...]
               ) -> argparse.ArgumentParser:
    for word in words:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[word]
    return parser


def _times(value: Any) -> list[str]:
    """Every value under a time key, anywhere in a JSON document."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in TIME_KEYS and item is not None:
                found.append(item)
            found += _times(item)
    elif isinstance(value, list):
        for item in value:
            found += _times(item)
    return found


def test_every_reporting_command_has_json() -> None:
    """Each command that reports, and call, takes --json."""
    parser = build_parser()
    for words in {w[:2] if w[0] != "check-config" and w[0] != "log" and w[0] != "doctor"
                  else w[:1] for w in REPORTING} | {("call",)}:
        options = {o for a in _subparser(parser, words)._actions for o in a.option_strings}
        assert "--json" in options, words


async def test_every_reporting_command_with_json_prints_json_with_iso_times(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each reporting command's --json output parses line by line, and every time in it is
    ISO 8601 with its offset (no Unix numbers)."""
    running = await start_daemon(mqtt_table(broker) + ROUTE
                                 + forward_table("http://127.0.0.1:9/hook"))
    await mqtt_ready(running)
    config = str(tmp_path / "gated.toml")
    code, out = await gated(capsys, "-c", config, "call", "--json", "--code", "5555",
                            "--from", "0612000000", "--to", BARRIER, "--url", running.url,
                            "--token", TOKEN)
    assert code == 0, out
    (report,) = [json.loads(line) for line in out.splitlines()]
    assert report["status"] == "ACK" and report["entry"]["reason"] == "granted_code"
    await running.daemon.gatekeeper.store.flush()
    code, out = await gated(capsys, "-c", config, "codes", "put", "cleaner", "--code", "246810",
                            "--gates", "barrier", "--name", "Cleaner",
                            "--valid-until", "2099-12-24T18:00")
    assert code == 0, out

    for words in REPORTING:
        code, out = await gated(capsys, "-c", config, *words, "--json")
        assert code in (0, 1), (words, out)  # doctor exits 1 on this test machine's findings
        documents = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert documents or words in {("lockout", "ls"), ("routes", "ls", "--broker")}, words
        for when in _times(documents):
            assert isinstance(when, str), (words, when)
            parsed = dt.datetime.fromisoformat(when)
            # The broker's listing shows a message's fields as staff wrote them
            # (site time when without an offset); what gated reports carries its offset.
            assert parsed.utcoffset() is not None or "--broker" in words, (words, when)
        if words == ("log",):
            assert [d["reason"] for d in documents] == ["granted_code"]
        if words == ("check-config",):
            assert documents[0]["ok"] is True and documents[0]["site"]["id"] == "test"
