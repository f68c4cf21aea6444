from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gated.cli import main
from gated.core.console import parse_since

from .helpers import AMS, BARRIER, TOKEN, write_config

ROOT = Path(__file__).resolve().parent.parent


def test_check_config_summarises_a_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config exits 0 with gates, code counts and callers on one screen."""
    assert main(["check-config", str(ROOT / "config" / "gated.example.toml"), "--codes"]) == 0
    out = capsys.readouterr().out
    assert "gate      barrier: +31501234567; mock" in out
    assert "1 caller(s)" in out
    assert "codes     3 static, 1 TOTP" in out
    assert "Parcel service" in out
    assert "471123" not in out  # names, never digits
    assert len(out.splitlines()) < 25


def test_check_config_fails_naming_the_key(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A bad file exits non-zero with the key path and line."""
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('nak_word', 'nak_wrod'))
    path.write_text(path.read_text().replace('answer_deadline = 3.0',
                                             'answer_deadline = 3.0\nnak_wrod = "NACK"'))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "server.nak_wrod: unknown key" in err
    assert "gated.toml:" in err


async def printed(capsys: pytest.CaptureFixture[str], text: str, within: float = 5.0) -> str:
    """Everything written to stdout until ``text`` was."""
    out = ""
    async with asyncio.timeout(within):
        while text not in out:
            out += capsys.readouterr().out
            await asyncio.sleep(0.01)
    return out


async def test_call_and_log_against_a_running_daemon(start_daemon: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """gated call acts as the PBX and explains the answer; gated log shows the entry."""
    running = await start_daemon()
    config = str(tmp_path / "gated.toml")
    code = await asyncio.to_thread(main, [
        "call", "--code", "471123", "--from", "0612345678", "--to", BARRIER,
        "--url", running.url, "--token", TOKEN])
    # The daemon shares this stdout: its line at the pulse's end must not land in
    # the output of a command below (it did when those ran slowly).
    out = await printed(capsys, "relay off")
    assert code == 0
    assert "status=ACK&callername=Welcome&destination=201" in out
    assert "success" in out
    assert "code=***" in out and "471123" not in out and TOKEN not in out

    code = await asyncio.to_thread(main, [
        "call", "--code", "1234", "--from", "0612345678", "--to", BARRIER,
        "--url", running.url, "--token", TOKEN])
    assert code == 1
    assert "wrong-input" in capsys.readouterr().out

    assert await asyncio.to_thread(main, ["-c", config, "log"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["time", "(Europe/Amsterdam)", "gate", "caller", "status",
                                "reason", "who", "actuator", "ms", "source"]
    assert "granted_code" in table[1] and "Demo" in table[1] and "+31612345678" in table[1]
    assert "unknown_code" in table[2]

    assert await asyncio.to_thread(main, ["-c", config, "log", "--json", "--since", "1h"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["status"], e["reason"]) for e in lines] == [("ACK", "granted_code"),
                                                           ("NAK", "unknown_code")]
    assert await asyncio.to_thread(main, ["-c", config, "log", "--gate", "door"]) == 0
    assert capsys.readouterr().out.strip() == "no entries"


async def test_call_reports_a_refused_token(start_daemon: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """gated call with a wrong token shows the 403 instead of a decision."""
    running = await start_daemon()
    code = await asyncio.to_thread(main, ["call", "--code", "1", "--url", running.url,
                                          "--token", "nope-nope-nope"])
    assert code == 2
    assert "HTTP 403" in capsys.readouterr().out


def test_parse_since_forms() -> None:
    """--since takes durations, today, and ISO times."""
    now = 1_790_000_000.0
    assert parse_since("10m", now, AMS) == now - 600
    assert parse_since("2h", now, AMS) == now - 7200
    assert parse_since("1d12h", now, AMS) == now - 129600
    assert parse_since("2026-01-01T00:00:00+00:00", now, AMS) == 1767225600.0
    assert parse_since("2026-01-01", now, AMS) == 1767222000.0  # midnight in Amsterdam
    today = parse_since("today", now, AMS)
    assert now - 86400 < today <= now
    assert dt.datetime.fromtimestamp(today, AMS).hour == 0
    with pytest.raises(argparse.ArgumentTypeError, match="--since"):
        parse_since("yesterday", now, AMS)


def test_pulse_drives_one_pulse_by_hand(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """gated pulse GATE energises the gate's relay once, for the bench test."""
    path = write_config(tmp_path, pulse=0.05)
    with capture_logs() as logs:
        assert main(["-c", str(path), "pulse", "door"]) == 0
    assert capsys.readouterr().out.strip().endswith("gate door: pulsed")
    (history,) = [e for e in logs if e["event"] == "mock pin history"]
    assert history["states"] == [False, True, False, True]  # active low: idle high, pulse low
    assert main(["-c", str(path), "pulse", "gate9"]) == 2
    assert "no gate 'gate9'" in capsys.readouterr().err


async def test_pulse_refuses_while_the_daemon_runs_and_staff_tools_still_work(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gated pulse` would fight the running daemon for the relay: one line, no pin touched.
    `gated log` and `gated codes issue` only use the store and keep working."""
    running = await start_daemon()
    config = str(tmp_path / "gated.toml")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["-c", config, "pulse", "barrier"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "state" / "entries.sqlite3.lock") in err and "holds" in err
    assert [s.state for s in running.pin(17).states] == [False]
    assert await asyncio.to_thread(main, ["-c", config, "log"]) == 0
    assert await asyncio.to_thread(main, ["-c", config, "codes", "issue", "--name", "Visitor",
                                          "--gates", "barrier", "--local"]) == 0
    await running.stop()
    capsys.readouterr()
    with capture_logs():
        assert await asyncio.to_thread(main, ["-c", config, "pulse", "barrier"]) == 0
    assert capsys.readouterr().out.strip().endswith("gate barrier: pulsed")


@pytest.mark.parametrize(("args", "message"), [
    (["--valid-from", "tomorrow"], "--valid-from: not an ISO time: 'tomorrow'"),
    (["--valid-from", "2026-12-01"], "--valid-from: give a time too"),
    (["--valid-for", "4x"], "--valid-for: expected e.g. 90m, 4h or 2d"),
    (["--valid-until", "2000-01-01T00:00"], "--valid-until: already past"),
    (["--valid-for", "1h", "--valid-until", "2099-01-01T00:00"], "not both"),
    (["--gates", "nowhere"], "no gate named 'nowhere'"),
])
def test_issue_refuses_bad_options_in_one_line(tmp_path: Path, args: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped option of `codes issue` is one line naming it, not a traceback."""
    path = write_config(tmp_path)
    argv = ["-c", str(path), "codes", "issue", "--name", "Loodgieter", "--gates", "barrier",
            "--local", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_codes_issue_speaks_the_words_of_codes_put_and_keeps_the_old_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`codes issue` takes --valid-from/--valid-until/--max-uses/--digits as `codes put` and
    the CSV columns do; the old spellings (--start, --valid, --uses, --length) still work
    and are not shown in help."""
    from gated.site.store import connect, load_visitors

    path = write_config(tmp_path)
    common = ["-c", str(path), "codes", "issue", "--local", "--gates", "barrier"]
    assert main([*common, "--name", "New", "--valid-from", "2099-01-01T08:00",
                 "--valid-until", "2099-01-01T18:00", "--max-uses", "2", "--digits", "8"]) == 0
    assert len(capsys.readouterr().out.strip()) == 8
    assert main([*common, "--name", "Old", "--start", "2099-01-01T08:00", "--valid", "10h",
                 "--uses", "2", "--length", "8"]) == 0
    assert len(capsys.readouterr().out.strip()) == 8
    conn = connect(tmp_path / "state" / "entries.sqlite3")
    rows = {row.name: row for row in load_visitors(conn)}
    conn.close()
    assert (rows["New"].valid_from, rows["New"].valid_until, rows["New"].max_uses) == (
        rows["Old"].valid_from, rows["Old"].valid_until, rows["Old"].max_uses)
    with pytest.raises(SystemExit):
        main(["codes", "issue", "--help"])
    shown = capsys.readouterr().out
    assert "--valid-until" in shown and "--max-uses" in shown and "--digits" in shown
    for old in ("--start", "--uses", "--length", "--valid "):
        assert old not in shown


def test_output_cut_short_by_a_pipe_is_quiet(tmp_path: Path) -> None:
    """`gated check-config --codes | head`: the reader stops early, and gated says nothing more."""
    codes = "".join(f'[[codes]]\nname = "Code {n}"\ncode = "{70_000_000 + n}"\n'
                    f'gates = ["barrier"]\n' for n in range(4000))
    config = write_config(tmp_path, codes)
    reader = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    # ~100 KB: more than a pipe holds, so gated is still writing when head has gone.
    gated = subprocess.run([sys.executable, "-m", "gated", "check-config", "--codes",
                            str(config)], stdout=reader.stdin, stderr=subprocess.PIPE,
                           text=True, timeout=60, check=False)
    reader.stdin.close()
    reader.wait()
    assert gated.stderr == ""
    assert gated.returncode == 1


@pytest.mark.parametrize(("option", "limit"), [("--callername", 64), ("--destination", 64),
                                               ("--name", 120)])
def test_issue_bounds_what_a_visitor_code_carries(tmp_path: Path, option: str, limit: int,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A visitor code's texts are bounded as the config bounds a code's: one over is refused
    and nothing is issued; exactly at the bound is issued."""
    path = write_config(tmp_path)
    argv = ["-c", str(path), "codes", "issue", "--name", "Loodgieter", "--gates", "barrier",
            "--local"]
    with pytest.raises(SystemExit) as refused:
        main([*argv, option, "x" * (limit + 1)])
    assert refused.value.code == 2
    assert f"argument {option}: at most {limit} characters" in capsys.readouterr().err
    assert not (tmp_path / "state" / "entries.sqlite3").exists()
    assert main([*argv, option, "x" * limit]) == 0
