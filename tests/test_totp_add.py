"""``gated totp add``: the config rewrite, its refusals, and the QR code it shows."""

from __future__ import annotations

import re
import resource
import signal
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gated.book import compiler
from gated.cli import main

from .helpers import write_config

ESCAPE = re.compile(r"\033\[([0-9;]*)m")
BLACK, WHITE = 0, 255
# A terminal's own colours: (foreground, background).
LIGHT_THEME = (BLACK, WHITE)
DARK_THEME = (WHITE, BLACK)


def gated(*argv: str, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in its own process; ``limit`` caps the size of any file it writes."""

    def cap_file_size() -> None:
        assert limit is not None
        # A write past the cap then fails with EFBIG instead of killing the process:
        # the same path through gated as a disk that is full.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "gated", *argv], capture_output=True,
                          text=True, timeout=60, check=False,
                          preexec_fn=cap_file_size if limit is not None else None)


def assert_one_line_refusal(code: int, err: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# Imports gated, says so, then waits for the go file: the commands then start
# within a millisecond of each other instead of spread over start-up times.
STARTING_BLOCK = """
import os, sys, time
from gated.cli import main
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
sys.exit(main(sys.argv[2:]))
"""


def test_parallel_totp_add_never_loses_the_config(tmp_path: Path) -> None:
    """Staff adding users at once: each one is added and kept, or refused in one line;
    the config always loads."""
    config = write_config(tmp_path)
    names = [f"U{i}" for i in range(8)]
    added: set[str] = set()
    for round_ in range(2):
        go = tmp_path / f"go-{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", STARTING_BLOCK, str(go), "-c",
                                   str(config), "totp", "add", f"{name}-{round_}", "--gates",
                                   "barrier"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in names]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        go.touch()
        results = [(proc.communicate(timeout=60)[1], proc.returncode) for proc in procs]
        for name, (err, code) in zip(names, results, strict=True):
            if code == 0:
                assert "added to" in err
                added.add(f"{name}-{round_}")
            else:
                assert_one_line_refusal(code, err)
        users = {t.name for t in compiler.load(config).config.totp}
        assert users == added
        assert not config.with_name("gated.toml.lock").exists()
    assert added


def test_a_full_disk_leaves_the_config_byte_identical(tmp_path: Path) -> None:
    """When the new config cannot be written, the old file stays as it was and the
    command says so in one line."""
    config = write_config(tmp_path)
    before = config.read_bytes()
    # Room for the old content, not for the user appended to it.
    result = gated("-c", str(config), "totp", "add", "Flat 12", "--gates", "barrier",
                   limit=len(before) + 16)
    assert_one_line_refusal(result.returncode, result.stderr)
    assert "not changed" in result.stderr and str(config) in result.stderr
    assert config.read_bytes() == before
    assert result.stdout == ""  # no QR code for a user that was not added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gated.toml"]


def test_a_held_lock_refuses_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A lock left by another command (or a killed one) is waited on briefly, then
    named, with the file untouched."""
    from gated.book import files

    config = write_config(tmp_path)
    before = config.read_bytes()
    files.lock_path(config).write_text("")
    monkeypatch.setattr(files, "LOCK_WAIT", 0.2)
    code = main(["-c", str(config), "totp", "add", "Flat 12", "--gates", "barrier"])
    out, err = capsys.readouterr()
    assert_one_line_refusal(code, err)
    assert "gated.toml.lock" in err and "delete that file" in err
    assert config.read_bytes() == before
    assert out == ""


@pytest.mark.parametrize(("args", "message"), [
    (["Flat \udcff12"], "not valid UTF-8"),
    (["X", "--period", "0"], "--period: expected a whole number from 15 to 120"),
    (["X", "--period", "500"], "--period: expected a whole number from 15 to 120"),
    (["X", "--period", "10", "--no-write"], "--period: expected a whole number from 15 to 120"),
    (["X", "--digits", "9"], "--digits: expected a whole number from 6 to 8"),
    (["X", "--qr", "code.jpg"], "--qr: the file name must end in .png or .svg"),
])
def test_totp_add_refuses_bad_arguments_in_one_line(tmp_path: Path, args: list[str],
                                                    message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """What the config would refuse is refused before anything is written or shown."""
    config = write_config(tmp_path)
    before = config.read_bytes()
    code = main(["-c", str(config), "totp", "add", *args, "--gates", "barrier"])
    out, err = capsys.readouterr()
    assert_one_line_refusal(code, err)
    assert message in err
    assert out == ""  # no QR code for a period the config refuses
    assert config.read_bytes() == before


def render(text: str, theme: tuple[int, int]) -> list[list[int]]:
    """What a terminal with ``theme`` shows for ``text``: one grey level per half cell."""
    palette = {16: BLACK, 231: WHITE}
    pixels: list[list[int]] = []
    for line in text.splitlines():
        fg, bg = theme
        top: list[int] = []
        bottom: list[int] = []
        position = 0
        for match in [*ESCAPE.finditer(line), None]:
            end = match.start() if match else len(line)
            for char in line[position:end]:
                upper, lower = {"\u2580": (fg, bg), "\u2584": (bg, fg), "\u2588": (fg, fg),
                                " ": (bg, bg)}[char]
                top.append(upper)
                bottom.append(lower)
            if match is None:
                break
            position = match.end()
            params = [int(p) for p in match.group(1).split(";") if p] or [0]
            while params:
                head = params.pop(0)
                if head == 0:
                    fg, bg = theme
                elif head in (38, 48) and params[:1] == [5]:
                    colour = palette[params[1]]
                    del params[:2]
                    fg, bg = (colour, bg) if head == 38 else (fg, colour)
                else:
                    raise AssertionError(f"unexpected escape {match.group(0)!r}")
        pixels += [top, bottom]
    return pixels


def decode(pixels: list[list[int]], page: int, tmp_path: Path) -> str:
    """zbarimg's reading of ``pixels`` (no inverted mode), shown on a ``page``-grey page."""
    scale, margin = 4, 8
    width = max(len(row) for row in pixels)
    rows = [[page] * (width + 2 * margin)] * margin
    rows += [[page] * margin + row + [page] * (width - len(row) + margin) for row in pixels]
    rows += [[page] * (width + 2 * margin)] * margin
    image = tmp_path / "screen.pgm"
    body = bytes(v for row in rows for _ in range(scale) for v in row for _ in range(scale))
    image.write_bytes(f"P5 {len(rows[0]) * scale} {len(rows) * scale} 255\n".encode() + body)
    result = subprocess.run(["zbarimg", "--raw", "-q", str(image)], capture_output=True,
                            text=True, timeout=30, check=False)
    return result.stdout.strip()


def test_terminal_qr_reads_on_light_and_dark_backgrounds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The QR code printed to the terminal carries its own colours and quiet zone, so a
    scanner reads it the same on a light and on a dark terminal."""
    config = write_config(tmp_path)
    assert main(["-c", str(config), "totp", "add", "Flat 12", "--gates", "barrier",
                 "--no-write"]) == 0
    out = capsys.readouterr().out
    *block, uri = out.splitlines()
    assert uri.startswith("otpauth://totp/")
    screen = "\n".join(block)
    assert decode(render(screen, LIGHT_THEME), WHITE, tmp_path) == uri
    assert decode(render(screen, DARK_THEME), BLACK, tmp_path) == uri


def svg_modules(path: Path) -> list[list[int]]:
    """The dark modules segno's SVG draws (horizontal strokes on half-module rows)."""
    root = ET.parse(path).getroot()  # noqa: S314 (our own output)
    width = int(root.attrib["width"]) // 8
    pixels = [[WHITE] * width for _ in range(width)]
    for element in root.iter("{http://www.w3.org/2000/svg}path"):
        if element.get("stroke") not in ("#000", "#000000"):
            continue
        x = y = 0.0
        for op, a, b in re.findall(r"([MmHh])(-?[\d.]+)(?: (-?[\d.]+))?", element.attrib["d"]):
            if op == "M":
                x, y = float(a), float(b)
            elif op == "m":
                x, y = x + float(a), y + float(b)
            else:
                for column in range(int(x), int(x + float(a))):
                    pixels[int(y)][column] = BLACK
                x += float(a)
    return pixels


@pytest.mark.parametrize("kind", ["png", "svg"])
def test_qr_file_holds_the_same_uri(tmp_path: Path, kind: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--qr FILE writes a scannable PNG or SVG, private to its owner, and nothing on the
    terminal but the URI."""
    config = write_config(tmp_path)
    target = tmp_path / f"flat12.{kind}"
    assert main(["-c", str(config), "totp", "add", "Flat 12", "--gates", "barrier",
                 "--qr", str(target)]) == 0
    out, err = capsys.readouterr()
    (uri,) = out.splitlines()
    assert f"scan the QR code in {target}" in err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # it holds the secret
    if kind == "png":
        result = subprocess.run(["zbarimg", "--raw", "-q", str(target)], capture_output=True,
                                text=True, timeout=30, check=False)
        assert result.stdout.strip() == uri
    else:
        assert decode(svg_modules(target), WHITE, tmp_path) == uri
    assert any(t.name == "Flat 12" for t in compiler.load(config).config.totp)
