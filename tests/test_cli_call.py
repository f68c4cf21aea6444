"""`gated call` says what happened: the entry's reason, the actuator's result, in words."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gated.cli import main

from .helpers import BARRIER, TOKEN
from .test_twiml import FLAT_12, LOBBY, VISITOR, twiml_table


def _call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


async def test_an_err_call_names_the_actuator_result_not_only_the_grant(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A right code for a call-box gate over VoIPGRID is ERR: `gated call` shows the
    actuator's needs_call and what it means, not only `reason: granted_code`."""
    running = await start_daemon(twiml_table())
    config = str(tmp_path / "gated.toml")
    code, out, _ = await asyncio.to_thread(_call, [
        "-c", config, "call", "--code", FLAT_12, "--from", VISITOR, "--to", LOBBY,
        "--url", running.url, "--token", TOKEN], capsys)
    assert code == 1
    assert "reason: granted_code" in out
    assert "actuator: needs_call" in out
    assert "tone" in out and "gated call --twiml" in out
    assert FLAT_12 not in out

    code, out, _ = await asyncio.to_thread(_call, [
        "-c", config, "call", "--json", "--code", FLAT_12, "--from", VISITOR, "--to", LOBBY,
        "--url", running.url, "--token", TOKEN], capsys)
    report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert (report["status"], report["entry"]["reason"], report["entry"]["actuator"]) == (
        "ERR", "granted_code", "needs_call")
    assert report["entry"]["time"].endswith("+01:00")  # ISO 8601, the site's zone
    assert FLAT_12 not in out and TOKEN not in out


async def test_a_call_to_a_number_no_gate_answers_says_what_unknown_number_means(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """unknown_number is explained as a called number no gate or route line answers on."""
    running = await start_daemon()
    config = str(tmp_path / "gated.toml")
    code, out, _ = await asyncio.to_thread(_call, [
        "-c", config, "call", "--code", "5555", "--from", VISITOR, "--to", "+31509999999",
        "--url", running.url, "--token", TOKEN], capsys)
    assert code == 1
    assert "reason: unknown_number" in out
    assert "--to must be one of a gate's numbers" in out


async def test_a_call_without_to_is_warned_about(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Leaving out --to (the called number, which selects the gate) gets a warning."""
    running = await start_daemon()
    _, _, err = await asyncio.to_thread(_call, [
        "call", "--code", "5555", "--from", VISITOR, "--url", running.url, "--token", TOKEN],
        capsys)
    assert "warning: no --to" in err
    _, _, err = await asyncio.to_thread(_call, [
        "call", "--code", "5555", "--from", VISITOR, "--to", BARRIER, "--url", running.url,
        "--token", TOKEN], capsys)
    assert "warning" not in err
