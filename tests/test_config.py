from __future__ import annotations

from pathlib import Path

import pytest

from gated.book import compiler
from gated.book.config import GpioActuatorConfig, MockActuatorConfig
from gated.core.errors import ConfigError

from .helpers import config_text

ROOT = Path(__file__).resolve().parent.parent


def load_text(tmp_path: Path, text: str) -> compiler.Loaded:
    path = tmp_path / "gated.toml"
    path.write_text(text)
    return compiler.load(path)


def test_example_config_is_valid() -> None:
    """The shipped example loads, uses mock pins and keeps an always-valid demo code."""
    loaded = compiler.load(ROOT / "config" / "gated.example.toml")
    assert {g.actuator.__class__ for g in loaded.config.gates.values()} == {MockActuatorConfig}
    demo = [c for c in loaded.config.codes if c.code == "471123"]
    assert demo and not demo[0].schedule and demo[0].valid_until is None


def test_relative_store_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """A relative [log] path does not depend on the working directory."""
    text = config_text(tmp_path).replace(str(tmp_path / "state" / "entries.sqlite3"), "db.sqlite3")
    assert load_text(tmp_path, text).store_path == tmp_path / "db.sqlite3"


def test_a_symlinked_config_keeps_its_name_and_relative_paths_follow_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded through a symlink: the path stays the link (what a reload reads again), and
    relative paths are relative to the folder of the file it points to."""
    release = tmp_path / "releases" / "v2"
    release.mkdir(parents=True)
    text = config_text(tmp_path).replace(str(tmp_path / "state" / "entries.sqlite3"), "db.sqlite3")
    (release / "gated.toml").write_text(text)
    link = tmp_path / "gated.toml"
    link.symlink_to(release / "gated.toml")
    loaded = compiler.load(link)
    assert loaded.path == link
    assert loaded.store_path == release / "db.sqlite3"
    assert loaded.key_path == release / "site.key"
    monkeypatch.chdir(tmp_path)  # named relative to the working directory: kept absolute
    assert compiler.load("gated.toml").path == link


@pytest.mark.parametrize(
    ("change", "path", "line_of"),
    [
        # (replace this, with this), key path in the message, text on the reported line
        (("[site]\n", "[site]\ncolour = 'red'\n"), "site.colour", "colour = 'red'"),
        (("pulse = 0.2 }", "pulse = 0.2, pn = 3 }"), "gates.barrier.actuator.pn",
         "actuator = { type = \"mock\", pin = 17"),
        (("pulse = 0.2 }", "pulse = 60 }"), "gates.barrier.actuator.pulse",
         "actuator = { type = \"mock\", pin = 17"),
        (('type = "mock", pin = 17', 'type = "relay", pin = 17'), "gates.barrier.actuator.type",
         'type = "relay"'),
        (('gates = ["barrier"]', 'gates = ["barier"]'), "codes[1].gates[0]", 'gates = ["barier"]'),
        (('code = "5555"', 'code = "55a5"'), "codes[1].code", 'code = "55a5"'),
        (('code = "5555"', 'code = "471123"'), "codes[1].code", 'code = "471123"'),
        (('numbers = ["0501234568"]', 'numbers = ["not a number"]'), "gates.door.numbers[0]",
         'numbers = ["not a number"]'),
        (('numbers = ["0501234568"]', 'numbers = ["+31501234567"]'), "gates.door.numbers[0]",
         'numbers = ["+31501234567"]'),
        (('timezone = "Europe/Amsterdam"', 'timezone = "Mars/Olympus"'), "site.timezone",
         "Mars/Olympus"),
        (('answer_deadline = 3.0', 'answer_deadline = "soon"'), "server.answer_deadline",
         'answer_deadline = "soon"'),
        (('name = "Barrier only"', 'name = "Demo"'), "codes[1].name", 'name = "Demo"'),
        (('[[codes]]\nname = "Sales"\ncode = "9000"\n', '[[codes]]\nname = "Sales"\ncode = "9000"\n'
          'schedule = ["someday 07:00-18:00"]\n'), "codes[2].schedule", "someday"),
        (('tokens = ["test-token-0123456789", "second-token-abcdefgh"]', 'tokens = ["short"]'),
         "server.tokens[0]", 'tokens = ["short"]'),
    ],
)
def test_errors_name_the_key_path_and_line(tmp_path: Path, change: tuple[str, str], path: str,
                                           line_of: str) -> None:
    """A bad config names the key path and the line to fix."""
    text = config_text(tmp_path, deadline=3.0)
    old, new = change
    assert old in text
    text = text.replace(old, new, 1)
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, text)
    error = raised.value
    assert error.path == path, str(error)
    assert error.line is not None
    assert line_of in text.splitlines()[error.line - 1], str(error)
    assert f"gated.toml:{error.line}: {path}: " in str(error)


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    """Leaving out a required key names it."""
    text = config_text(tmp_path).replace('tokens = ["test-token-0123456789", '
                                         '"second-token-abcdefgh"]\n', "")
    with pytest.raises(ConfigError, match=r"server\.tokens: required key is missing"):
        load_text(tmp_path, text)


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    """A TOML syntax error reports its line."""
    text = config_text(tmp_path).replace("[gates.door]", "[gates.door")
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, text)
    assert raised.value.line == text.splitlines().index("[gates.door") + 1


def test_several_gates_need_numbers(tmp_path: Path) -> None:
    """With two gates, a gate without called numbers is ambiguous and refused."""
    text = config_text(tmp_path).replace('numbers = ["0501234568"]\n', "")
    with pytest.raises(ConfigError, match=r"gates\.door\.numbers"):
        load_text(tmp_path, text)


def test_gpio_type_parses(tmp_path: Path) -> None:
    """type = "gpio" selects the GPIO adapter's config."""
    text = config_text(tmp_path).replace('type = "mock", pin = 17', 'type = "gpio", pin = 17')
    gate = load_text(tmp_path, text).config.gates["barrier"]
    assert isinstance(gate.actuator, GpioActuatorConfig)
    assert gate.actuator.pin == 17


def test_code_digits_are_never_in_errors(tmp_path: Path) -> None:
    """A clash between two codes is reported by name, not by digits."""
    text = config_text(tmp_path).replace('code = "5555"', 'code = "471123"')
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, text)
    assert "Demo" in str(raised.value)
    assert "471123" not in str(raised.value).split(": ", 2)[-1]
