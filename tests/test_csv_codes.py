"""Reading a CSV file of codes for ``gated codes import``: gated/book/csvcodes.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from gated import cli
from gated.book import config, csvcodes
from gated.book.config import Config
from gated.book.messages import ID_RE, Scope
from gated.commands import brokercodes as staff
from gated.core.console import Progress
from gated.core.errors import GatedError

from .helpers import config_text

ROOT = Path(__file__).resolve().parent.parent
HEADER = "name,code,gates,valid_from,valid_until,schedule,max_uses,callers,callername,destination"


def site(tmp_path: Path) -> Config:
    return config.parse(config_text(tmp_path))[0]


def write(tmp_path: Path, text: str, name: str = "codes.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, site_config: Config, scope: Scope = "site") -> list[str]:
    with pytest.raises(csvcodes.BadFile) as raised:
        csvcodes.read(path, site_config, scope=scope)
    return [str(p) for p in raised.value.problems]


def test_every_column_reads_as_codes_put_would_publish_it(tmp_path: Path) -> None:
    """A line with every column gives the fields `gated codes put` makes of the same values."""
    path = write(tmp_path, "id,name,code,gates,valid_from,valid_until,schedule,max_uses,"
                 "callers,callername,destination\n"
                 "jan-1,Jan's visitor,246810,barrier;door,2026-12-01T07:00,"
                 "2026-12-24 18:00+01:00,\"mon-fri 07:00-18:00;sat,sun 09:00-12:00\",3,"
                 "+31612345678;0612345679,Welcome Jan,201\n"
                 ",Parcel service,580214,*,,,,,,,\n")
    rows = csvcodes.read(path, site(tmp_path), scope="site")
    put = cli.build_parser().parse_args([
        "codes", "put", "jan-1", "--code", "246810", "--gates", "barrier", "door",
        "--name", "Jan's visitor", "--valid-from", "2026-12-01T07:00",
        "--valid-until", "2026-12-24 18:00+01:00", "--schedule", "mon-fri 07:00-18:00",
        "--schedule", "sat,sun 09:00-12:00", "--max-uses", "3",
        "--callers", "+31612345678", "0612345679", "--callername", "Welcome Jan",
        "--destination", "201"])
    parcel = cli.build_parser().parse_args([
        "codes", "put", rows[1].id, "--code", "580214", "--gates", "*",
        "--name", "Parcel service"])
    assert [(r.id, r.line, r.here) for r in rows] == [
        ("jan-1", 2, True), (csvcodes.derive_id("Parcel service"), 3, True)]
    assert rows[0].fields == staff.build_body(put, "246810")
    assert rows[1].fields == staff.build_body(parcel, "580214")
    assert list(rows[0].fields) == list(staff.build_body(put, "246810"))
    assert "246810" not in repr(rows[0])


def test_the_example_file_is_valid_against_the_example_config() -> None:
    """config/codes.example.csv reads cleanly against config/gated.example.toml."""
    example = config.parse((ROOT / "config" / "gated.example.toml").read_text())[0]
    rows = csvcodes.read(ROOT / "config" / "codes.example.csv", example, scope="site")
    assert len(rows) == 6
    assert {column for row in rows for column in row.fields} == set(csvcodes.FIELDS) - {"id"}


def test_the_docs_example_is_the_example_file() -> None:
    """docs/import.md shows config/codes.example.csv as it is."""
    example = (ROOT / "config" / "codes.example.csv").read_text()
    assert f"```csv\n{example}```" in (ROOT / "docs" / "import.md").read_text()


@pytest.mark.parametrize(("line", "column", "message"), [
    ("Jan,12345678901234567,barrier", "code", "a code is 4 to 16 digits"),
    ("Jan,123,barrier", "code", "a code is 4 to 16 digits"),
    ("Jan,12a456,barrier", "code", "a code is 4 to 16 digits"),
    ("Jan,,barrier", "code", "a code is 4 to 16 digits"),
    ("Jan,246810,garage", "gates[0]", "no gate named 'garage'"),
    ("Jan,246810,barrier;garage", "gates[1]", "no gate named 'garage'"),
    ("Jan,246810,", "gates", "a code needs gates to open, or callername/destination to route"),
    ('Jan,246810,"barrier,door"', "gates[0]", "no gate named 'barrier,door'"),
    (",246810,barrier", "name", "give a name (or an id)"),
    ("Jan,246810,barrier,2026-12-01", "valid_from", "give a time too, e.g. 2026-12-01T18:00"),
    ("Jan,246810,barrier,soon", "valid_from", "not an ISO time: 'soon'"),
    ("Jan,246810,barrier,2026-12-02T00:00,2026-12-01T00:00", "valid_until",
     "must be after valid_from"),
    ("Jan,246810,barrier,,,weekdays 7-18", "schedule",
     "expected e.g. 'mon-fri 07:00-18:00', got 'weekdays 7-18'"),
    ("Jan,246810,barrier,,,,0", "max_uses", "Expected `int` >= 1"),
    ("Jan,246810,barrier,,,,once", "max_uses", "a whole number, 1 or more"),
    ("Jan,246810,barrier,,,,,n/a", "callers[0]", "not a phone number"),
    ("Jan,246810,barrier,,,,,,,,", "", "expected 8 fields, got 11"),
    ("Jan,246810", "", "expected 8 fields, got 2"),
])
def test_a_bad_line_is_named_by_file_line_and_column(tmp_path: Path, line: str, column: str,
                                                     message: str) -> None:
    """Each kind of bad line is one error, `file:line: column: what is wrong`."""
    if "fields" not in message:  # the cells left out are empty
        line += "," * (8 - len(next(csv.reader([line]))))
    path = write(tmp_path, "name,code,gates,valid_from,valid_until,schedule,max_uses,callers\n"
                 "Good,5555,barrier,,,,,\n\n" + line + "\n")
    found = problems(path, site(tmp_path))
    where = f"{path}:4: {column}: " if column else f"{path}:4: "
    assert len(found) == 1 and found[0].startswith(where), found
    assert message in found[0]


def test_a_bad_id_is_named(tmp_path: Path) -> None:
    """An id that cannot be a topic level is refused, as `codes put` refuses it."""
    path = write(tmp_path, "id,name,code,gates\ngate/1,Jan,246810,barrier\n")
    assert problems(path, site(tmp_path)) == [
        f"{path}:2: id: a code id is 1 to 64 letters, digits, '_', '.' or '-'"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "1: expected a header line first: " + HEADER),
    ("\nname,code\n", "1: expected a header line first: " + HEADER),
    ("name,code,gate\n", "1: unknown column 'gate'; the columns are id," + HEADER),
    ("name,code,code_hash\n", "1: unknown column 'code_hash'"),
    ("name,gates\n", "1: the 'code' column is required"),
    ("code,gates,name,code\n", "1: column 'code' is there twice"),
])
def test_a_bad_header_is_named(tmp_path: Path, text: str, message: str) -> None:
    """The header is required, and a column it does not know is named, not ignored."""
    path = write(tmp_path, text)
    found = problems(path, site(tmp_path))
    assert found[0].startswith(f"{path}:{message}"), found


def test_a_header_alone_is_no_codes(tmp_path: Path) -> None:
    """A file with the header and nothing else reads as no codes."""
    path = write(tmp_path, "code,name\r\n\r\n")
    assert csvcodes.read(path, site(tmp_path), scope="site") == []


def test_repeated_ids_and_codes_name_both_lines(tmp_path: Path) -> None:
    """Two lines with one id, or one code, are an error naming both; never the digits."""
    path = write(tmp_path, "id,name,code,gates\n"
                 ",Flat 12,246810,barrier\n"
                 ",Flat 12,135791,barrier\n"
                 "cleaner,Cleaner,864209,door\n"
                 "cleaner,Cleaner 2,975318,door\n"
                 ",Flat 14,246810,barrier\n"
                 "975318,Who,112233,door\n"
                 "975318,Again,445566,door\n")
    found = problems(path, site(tmp_path))
    again = "the same id as line {} (the same name? give each line an id)"
    assert found == [
        f"{path}:3: id: " + again.format(2),
        f"{path}:5: id: " + again.format(4),
        f"{path}:6: code: the same code as line 2",
        f"{path}:8: id: " + again.format(7),
    ]


CODES = ["86753091", "24681357", "5550123", "90210"]


def test_no_error_ever_holds_a_codes_digits(tmp_path: Path) -> None:
    """Whatever is wrong, and wherever a code ends up, an error never shows its digits."""
    a, b, c, d = CODES
    lines = [
        f"Jan,{a}0000000000,barrier,,",          # too long
        f"Joop,{a[:3]},barrier,,",               # too short
        f"Joke,{a}x,barrier,,",                  # not digits
        f"Kees,{b},barrier,{b},",                # a column shifted: the code as a time
        f"Karel,{c},{c},,",                      # ... as a gate
        f"Piet,{d},barrier,,",
        f"Pim,{d},barrier,,{d}x",                # ... in a caller's number
        f"Klaas,{d},barrier,,",                  # a repeat of line 7's code
        f"{c},{c},barrier,,",                    # the code as the name, so as the id
        f"{c},{a},barrier,,",                    # ... again
        f'"Jan,{b}",{b}',                        # the wrong number of fields
        f"Bob,1234,barrier,{a}-{b}T{c},",        # line 5's code in another's time
    ]
    path = write(tmp_path, "name,code,gates,valid_from,callers\n" + "\n".join(lines) + "\n")
    headless = write(tmp_path, "\n".join(lines[5:6] + lines) + "\n", "headless.csv")
    for name in (path, headless):
        with pytest.raises(csvcodes.BadFile) as raised:
            csvcodes.read(name, site(tmp_path), scope="site")
        text = str(raised.value)
        for digits in CODES:
            assert digits not in text, text
            for problem in raised.value.problems:
                assert digits not in problem.detail and digits not in problem.path
    assert raised.value.total == 1
    with pytest.raises(csvcodes.BadFile) as raised:
        csvcodes.read(path, site(tmp_path), scope="site")
    assert raised.value.total == len(lines) - 2  # lines 7 and 10 are good
    assert [p.line for p in raised.value.problems] == [2, 3, 4, 5, 6, 8, 9, 11, 12, 13]


def test_bom_crlf_and_semicolons_read_like_a_plain_file(tmp_path: Path) -> None:
    """Excel's byte-order mark, CRLF, `;` between fields and blank lines change nothing."""
    plain = ("name,code,gates,schedule,callername\n"
             "Flat 12,246810,barrier;door,\"mon-fri 07:00-18:00;sat,sun 09:00-12:00\",Flat 12\n"
             "Zoë,1357,*,,\n")
    excel = ("\ufeffname;code;gates;schedule;callername\r\n"
             "Flat 12;246810;\"barrier;door\";\"mon-fri 07:00-18:00;sat,sun 09:00-12:00\";"
             "Flat 12\r\n"
             ";;;;\r\n"
             "Zoë;1357;*;;\r\n\r\n\r\n")
    site_config = site(tmp_path)
    expected = csvcodes.read(write(tmp_path, plain, "plain.csv"), site_config, scope="site")
    path = tmp_path / "excel.csv"
    path.write_bytes(excel.encode())
    got = csvcodes.read(path, site_config, scope="site")
    assert [(r.id, r.fields) for r in got] == [(r.id, r.fields) for r in expected]
    assert [r.line for r in got] == [2, 4]
    assert expected[0].fields["schedule"] == ["mon-fri 07:00-18:00", "sat,sun 09:00-12:00"]


def test_a_file_that_is_not_utf8_is_one_error_naming_its_line(tmp_path: Path) -> None:
    """A sheet saved in Windows-1252 is an error naming the line, not a traceback."""
    path = tmp_path / "codes.csv"
    path.write_bytes("name,code,gates\nJan,246810,barrier\nZoë,1357,door\n".encode("cp1252"))
    with pytest.raises(csvcodes.BadFile) as raised:
        csvcodes.read(path, site(tmp_path), scope="site")
    assert isinstance(raised.value, GatedError)  # `gated` prints it as an error, one line
    assert str(raised.value) == f'{path}:3: not UTF-8 text: save the sheet as "CSV UTF-8"'


def test_a_line_too_long_for_any_code_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A file that is one endless line (not a sheet at all) is not read into memory."""
    path = tmp_path / "codes.csv"
    with path.open("wb") as out:
        out.write(b"name,code,gates\nJan,")
        out.write(b"1" * 10_000_000)
    assert problems(path, site(tmp_path)) == [
        f"{path}:2: a line of more than 65536 bytes: not a file of codes"]


def test_a_missing_file_is_one_error(tmp_path: Path) -> None:
    """A file that is not there is a BadFile naming it, like any other."""
    path = tmp_path / "nowhere.csv"
    assert problems(path, site(tmp_path)) == [f"{path}: cannot read: No such file or directory"]


def test_an_unclosed_quote_is_an_error_at_its_line(tmp_path: Path) -> None:
    """A quote left open does not swallow the rest of the file into one cell."""
    path = write(tmp_path, 'name,code,gates\nJan,246810,barrier\n"Piet,1357,door\n'
                 "Kees,9753,door\n")
    found = problems(path, site(tmp_path))
    assert len(found) == 1 and found[0].startswith(f"{path}:3: not valid CSV: ")


def test_one_bad_line_returns_nothing_and_many_are_cut_short(tmp_path: Path) -> None:
    """All or nothing: good lines are not returned beside a bad one; past 20 errors,
    the rest are counted."""
    good = [f"Visitor {i},{100000 + i},barrier" for i in range(50)]
    bad = [f"Bad {i},{i},barrier" for i in range(25)]
    path = write(tmp_path, "name,code,gates\n" + "\n".join(good + bad + good[:0]) + "\n")
    with pytest.raises(csvcodes.BadFile) as raised:
        csvcodes.read(path, site(tmp_path), scope="site")
    assert (len(raised.value.problems), raised.value.total) == (csvcodes.MAX_REPORTED, 25)
    text = str(raised.value).splitlines()
    assert text[0] == f"{path}: 25 bad lines, nothing imported:"
    assert text[1] == f"  {path}:52: code: a code is 4 to 16 digits"
    assert text[-1] == "  ... and 5 more"


def test_derived_ids_stay_the_same_when_other_names_change(tmp_path: Path) -> None:
    """Importing an edited file again gives every unchanged name the id it had."""
    site_config = site(tmp_path)
    before = write(tmp_path, "name,code,gates\nFlat 12,246810,barrier\nflat-12,1357,door\n"
                   "Zoë,9753,door\nA much longer name than any id could hold: "
                   "the residents' association of block C,8642,door\n")
    after = write(tmp_path, "name,code,gates\nflat 12,246810,barrier\nflat-12,1357,door\n"
                  "Zoë,9753,door\n王芳,8642,door\n", "after.csv")
    first = [r.id for r in csvcodes.read(before, site_config, scope="site")]
    second = [r.id for r in csvcodes.read(after, site_config, scope="site")]
    assert first[1:3] == second[1:3] and first[0] != second[0] and first[3] != second[3]
    assert first[1] == "flat-12" and first[2].startswith("zoe-") and second[3].startswith("code-")
    assert len(set(first + second)) == 6
    assert all(ID_RE.fullmatch(i) for i in first + second)
    assert first[3].startswith("a-much-longer-name") and len(first[3]) == 64
    # The same name typed on macOS (decomposed) and on Windows (composed) is one id.
    assert csvcodes.derive_id("Zoe\u0308") == csvcodes.derive_id("Zo\u00eb") == first[2]


def test_fleet_codes_for_other_sites_gates_are_kept(tmp_path: Path) -> None:
    """A fleet code naming none of this site's gates is no error (other sites have them);
    as a site code it is."""
    path = write(tmp_path, "name,code,gates\nGarage,246810,garage\nBoth,1357,barrier;garage\n")
    rows = csvcodes.read(path, site(tmp_path), scope="fleet")
    assert [(r.line, r.here, r.fields["gates"]) for r in rows] == [
        (2, False, ["garage"]), (3, True, ["barrier", "garage"])]
    assert problems(path, site(tmp_path)) == [f"{path}:2: gates[0]: no gate named 'garage'",
                                              f"{path}:3: gates[1]: no gate named 'garage'"]


def test_100k_lines_are_read(tmp_path: Path) -> None:
    """A file of 100,000 codes is read and checked, each line as its own code."""
    path = tmp_path / "big.csv"
    with path.open("w") as out:
        out.write("name,code,gates\n")
        out.writelines(f"Visitor {i},{i:08d},barrier;door\n" for i in range(100_000))
    rows = csvcodes.read(path, site(tmp_path), scope="site")
    assert len(rows) == 100_000 and len({r.id for r in rows}) == 100_000
    assert (rows[-1].line, rows[-1].fields["code"]) == (100_001, "00099999")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_import_counts_its_lines_on_a_terminal_and_says_nothing_in_a_pipe(
        tmp_path: Path) -> None:
    """Checking a large CSV shows a line count on a terminal once it lasts over a second,
    clears it at the end, and writes nothing to a pipe or for quick work."""
    site_config = site(tmp_path)
    path = tmp_path / "codes.csv"
    path.write_text("name,code,gates\n" + "".join(
        f"Code {n},{10_000_000 + n},barrier\n" for n in range(5000)))
    ticks = iter(range(0, 1000))

    def clock() -> float:
        return next(ticks) * 0.5  # each look at the clock: half a second later

    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = Progress("checking codes.csv, line", stream=stream, clock=clock)
        assert len(csvcodes.read(path, site_config, scope="site", progress=progress)) == 5000
        progress.done()
    shown = terminal.getvalue()
    assert "checking codes.csv, line: 4,000" in shown
    assert shown.endswith("\r\x1b[K")
    assert pipe.getvalue() == ""

    quick = _Terminal()
    progress = Progress("hashing codes", 10, stream=quick)  # the real clock: well within 1 s
    for done in range(10):
        progress(done)
    progress.done()
    assert quick.getvalue() == ""
