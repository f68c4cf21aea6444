"""Config errors and the check-config summary in the words of the people writing the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gated.book import compiler
from gated.cli import main
from gated.core.errors import ConfigError

from .helpers import TOKEN, config_text

MQTT_GATE = """
[mqtt]
host = "localhost"

[gates.garage]
numbers = ["+31501234569"]
actuator = { type = "mqtt", command_topic = "cmnd/garage/POWER" }
"""


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gated.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        compiler.load(path)
    return str(caught.value)


def test_a_code_written_as_a_number_is_told_to_go_in_quotes(tmp_path: Path) -> None:
    """`code = 123456` (a TOML number) says to put the code in quotes, names the key, and
    does not echo the digits."""
    text = config_text(tmp_path).replace('code = "5555"', "code = 123456")
    message = _error(tmp_path, text)
    assert "codes[1].code" in message
    assert "put it in quotes" in message
    assert "Expected" not in message and "`" not in message
    assert "123456" not in message


def test_a_short_token_says_how_long_it_must_be(tmp_path: Path) -> None:
    """A token shorter than the minimum says the length it must have, not msgspec's words."""
    text = config_text(tmp_path).replace(TOKEN, "short")
    message = _error(tmp_path, text)
    assert "server.tokens[0]" in message
    assert "at least 12 characters" in message
    assert "Expected" not in message


def test_a_number_out_of_bounds_says_the_bound_in_words(tmp_path: Path) -> None:
    """A max_uses of 0 says it must be at least 1."""
    text = config_text(tmp_path).replace('code = "5555"', 'code = "5555"\nmax_uses = 0')
    assert "must be at least 1" in _error(tmp_path, text)


def test_check_config_summary_prints_no_python_reprs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config's gate lines show the keys that are set, with no None, True or quotes."""
    path = tmp_path / "gated.toml"
    path.write_text(config_text(tmp_path, MQTT_GATE))
    assert main(["check-config", str(path)]) == 0
    gates = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gate ")]
    assert len(gates) == 3
    for line in gates:
        for repr_word in ("None", "True", "False", "'"):
            assert repr_word not in line, line
    assert "command_topic=cmnd/garage/POWER" in "\n".join(gates)


def test_a_site_without_a_timezone_is_warned_about_not_silently_utc(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file without [site] timezone still loads (as UTC), and check-config and the
    daemon's start say so; a file with one says nothing."""
    path = tmp_path / "gated.toml"
    path.write_text(config_text(tmp_path).replace('timezone = "Europe/Amsterdam"\n', ""))
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "test (UTC" in out
    assert "timezone is not set" in err and "read as UTC" in err
    with capture_logs() as logs:
        compiler.warn_unkept(compiler.load(path))
    assert any("timezone is not set" in e["event"] for e in logs)

    path.write_text(config_text(tmp_path))
    assert main(["check-config", str(path)]) == 0
    assert "timezone" not in capsys.readouterr().err
    with capture_logs() as logs:
        compiler.warn_unkept(compiler.load(path))
    assert not logs
