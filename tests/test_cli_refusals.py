"""Staff commands that cannot do what was asked say why in one line and change nothing."""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gated.cli import main

from .broker import Mosquitto, mqtt_table
from .helpers import write_config


def assert_one_line_refusal(code: int, err: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("code_id", ["+", "#", "a/b"])
def test_codes_rm_refuses_an_id_that_is_a_topic_pattern(
        broker: Mosquitto, tmp_path: Path, code_id: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``codes rm '+'`` is refused before reaching the broker (a wildcard is no code id),
    and the codes on the broker stay."""
    config = str(write_config(tmp_path, mqtt_table(broker)))
    assert main(["-c", config, "codes", "put", "visitor-1", "--code", "246810",
                 "--gates", "barrier", "--wait", "0", "--plain"]) == 0
    capsys.readouterr()

    code = main(["-c", config, "codes", "rm", code_id])
    out, err = capsys.readouterr()
    assert_one_line_refusal(code, err)
    assert "a code id is 1 to 64 letters" in err
    assert out == ""

    assert main(["-c", config, "codes", "ls", "--broker", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["id"] for row in listed] == ["visitor-1"]


def test_codes_issue_on_a_full_disk_says_so_in_one_line(tmp_path: Path) -> None:
    """A store that cannot be written issues no code, prints no digits, and says why
    in one line."""
    config = write_config(tmp_path)
    issue = [sys.executable, "-m", "gated", "-c", str(config), "codes", "issue",
             "--name", "Visitor", "--gates", "barrier"]
    subprocess.run(issue, capture_output=True, check=True, timeout=60)
    store = tmp_path / "state" / "entries.sqlite3"

    def visitors() -> list[tuple[str, ...]]:
        conn = sqlite3.connect(store)
        try:
            return conn.execute("SELECT id, name FROM visitors").fetchall()
        finally:
            conn.close()

    before = visitors()

    def full_disk() -> None:
        # Writes past 1 KiB fail with EFBIG, as they would with ENOSPC on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    result = subprocess.run(issue, capture_output=True, text=True, timeout=60, check=False,
                            preexec_fn=full_disk)
    assert_one_line_refusal(result.returncode, result.stderr)
    assert result.stderr.startswith("error: no visitor code issued: the entry store")
    assert result.stdout == ""  # no digits for a code that was not stored
    assert visitors() == before
