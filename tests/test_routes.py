"""Smart routing (§11), the pure part: precedence, lines, schedules, CSV files."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from gated.book import compiler
from gated.book.codes import CodeBook
from gated.book.messages import parse_route
from gated.book.routes import Normaliser
from gated.core.decide import Changes, Decision, Ledger, Request, Status, decide
from gated.core.errors import ConfigError, NumberError
from gated.core.lockout import Policy
from gated.core.numbers import normalise

from .helpers import BARRIER, DOOR, RESIDENT, TOKEN, config_text, local

LINE = "+31501234500"  # a number of no gate: a line
SALES = "+31501234501"  # another line
ACME = "+31201234567"  # an Amsterdam caller, on several routes
ACME_OFFICE = "+31201299999"
OFFICE = "+31301234567"
UNKNOWN = "+31687654321"
WEDNESDAY_NOON = local(2026, 12, 9, 12, 0)
SUNDAY_NOON = local(2026, 12, 13, 12, 0)

ROUTES = """
[[routes]]
name = "Key accounts"
numbers = ["+31501234500"]
callers = ["+31201234567"]
destination = "+31501234510"
callername = "Acme (key account)"

[[routes]]
name = "Amsterdam"
callers = ["+3120*"]
destination = "+31501234520"

[[routes]]
name = "Amsterdam centre"
callers = ["+312012*"]
destination = "+31501234530"

[[routes]]
name = "CRM"
numbers = ["+31501234500", "+31501234567"]
file = "accounts.csv"
destination = "+31501234540"
callername = "Customer"

[[routes]]
name = "Later exact"
callers = ["+31201234567", "0612345678"]
destination = "+31501234550"

[[routes]]
name = "Office hours"
numbers = ["0501234501"]
callers = ["+31301234567"]
schedule = ["mon-fri 08:00-18:00"]
destination = "+31501234560"

[[routes]]
name = "Anyone from Utrecht"
numbers = ["+31501234501"]
callers = ["+3130*"]
destination = "+31501234570"
"""

CSV = """number,destination,callername
+31201234567,+31501234599,Acme BV
020 129 9999,,Acme office
+3120123*,+31501234598,
"""


@pytest.fixture
def book(tmp_path: Path) -> CodeBook:
    (tmp_path / "accounts.csv").write_text(CSV)
    path = tmp_path / "gated.toml"
    path.write_text(config_text(tmp_path, ROUTES))
    book = compiler.load(path).book
    # Two routes over MQTT (after the file's, by id) on an exact number the
    # file's routes also name, and on one nobody else does.
    config = compiler.load(path).config
    for route_id, callers in (("zz", ["+31401234567", "+31201234567"]), ("aa", ["+31401234567"])):
        body = f'{{"callers": {callers!r}, "destination": "mqtt-{route_id}"}}'.replace("'", '"')
        book.routes.put(parse_route("site", route_id, body.encode(), config).route)
    return book


@pytest.fixture
def ledger() -> Ledger:
    return Ledger.fresh(Policy(caller_failures=3, site_failures=1000))


def call(book: CodeBook, ledger: Ledger, did: str | None, caller: str | None,
         now: float = WEDNESDAY_NOON, code: str | None = None) -> Decision:
    request = Request(did=did, caller=caller, code=code)
    decision = decide(request, book, ledger, now)
    ledger.apply(request, decision, now)
    return decision


@pytest.mark.parametrize(("did", "caller", "now", "expected"), [
    # An exact number beats any prefix, whatever its source; among exact
    # numbers the file's order, a route's CSV rows at its place.
    (LINE, ACME, WEDNESDAY_NOON, ("routed_caller", "Key accounts", "+31501234510",
                                  "Acme (key account)")),
    # On a gate's number "Key accounts" does not answer: the CSV row (route 4)
    # comes before route 5's exact number and every prefix.
    (BARRIER, ACME, WEDNESDAY_NOON, ("routed_caller", "CRM", "+31501234599", "Acme BV")),
    # The door is on neither: route 5's exact number, before the prefixes.
    (DOOR, ACME, WEDNESDAY_NOON, ("routed_caller", "Later exact", "+31501234550", "")),
    # A row in any form, normalised; its empty destination is the route's.
    (LINE, ACME_OFFICE, WEDNESDAY_NOON, ("routed_caller", "CRM", "+31501234540",
                                         "Acme office")),
    # Longer prefix first: the CSV's +3120123* (7) beats +312012* (6) where CRM
    # answers, and +312012* beats +3120* elsewhere.
    (LINE, "+31201230000", WEDNESDAY_NOON, ("routed_caller", "CRM", "+31501234598",
                                            "Customer")),
    (DOOR, "+31201230000", WEDNESDAY_NOON, ("routed_caller", "Amsterdam centre",
                                            "+31501234530", "")),
    (DOOR, "+31209999999", WEDNESDAY_NOON, ("routed_caller", "Amsterdam", "+31501234520", "")),
    # The file's routes before those over MQTT; among MQTT routes, by id.
    (DOOR, "+31401234567", WEDNESDAY_NOON, ("routed_caller", "aa", "mqtt-aa", "")),
    # A schedule: in hours the exact route, out of hours the prefix route.
    (SALES, OFFICE, WEDNESDAY_NOON, ("routed_caller", "Office hours", "+31501234560", "")),
    (SALES, OFFICE, SUNDAY_NOON, ("routed_caller", "Anyone from Utrecht", "+31501234570", "")),
    (SALES, OFFICE, local(2026, 12, 9, 18, 0), ("routed_caller", "Anyone from Utrecht",
                                                "+31501234570", "")),
    # A route's numbers bound it: Utrecht callers are routed on the sales line only.
    (DOOR, OFFICE, WEDNESDAY_NOON, ("unknown_caller", "", "", "")),
    # A line with no route for the caller: no_route; a number of neither: unknown_number.
    (LINE, UNKNOWN, WEDNESDAY_NOON, ("no_route", "", "", "")),
    (LINE, None, WEDNESDAY_NOON, ("no_route", "", "", "")),
    (BARRIER, UNKNOWN, WEDNESDAY_NOON, ("unknown_caller", "", "", "")),
    ("+31509999999", ACME, WEDNESDAY_NOON, ("unknown_number", "", "", "")),
    # A caller on the gate's list opens it first, though a route names them too.
    (BARRIER, RESIDENT, WEDNESDAY_NOON, ("granted_caller", "", "", "")),
    (DOOR, RESIDENT, WEDNESDAY_NOON, ("routed_caller", "Later exact", "+31501234550", "")),
])
def test_route_precedence(book: CodeBook, ledger: Ledger, did: str, caller: str | None,
                          now: float, expected: tuple[str, str, str, str]) -> None:
    """Exact beats prefix whatever the source, longer prefix beats shorter, then file
    order (CSV rows at their route's place), then MQTT routes by id; lines and numbers
    bound where routes answer."""
    decision = call(book, ledger, did, caller, now)
    assert (decision.reason, decision.who, decision.destination, decision.callername) == expected
    routed = decision.reason == "routed_caller"
    assert decision.status is (Status.ACK if routed or decision.reason == "granted_caller"
                               else Status.NAK)
    if routed:
        assert not decision.opens
        assert decision.credential is not None and decision.credential.kind == "route"
        assert decision.gate == (None if did in (LINE, SALES) else
                                 {BARRIER: "barrier", DOOR: "door"}[did])


def test_a_line_takes_route_only_codes_and_counts_wrong_ones(book: CodeBook,
                                                              ledger: Ledger) -> None:
    """On a line a route-only code routes; a gate's code is wrong_gate and an unknown one
    unknown_code; only the unknown one is counted as a guess; nothing opens there."""
    routed = call(book, ledger, LINE, UNKNOWN, code="9000")
    assert (routed.status, routed.reason, routed.opens, routed.gate) == (
        Status.ACK, "granted_route", False, None)
    assert call(book, ledger, LINE, UNKNOWN, code="5555").reason == "wrong_gate"
    assert call(book, ledger, LINE, UNKNOWN, code="1234").reason == "unknown_code"
    assert ledger.lockout.callers[UNKNOWN].failures == 1


def test_a_valid_code_on_a_line_never_drives_its_caller_toward_a_lock(
        book: CodeBook, ledger: Ledger) -> None:
    """A resident who types their gate's code on a line (a number routes answer on) is
    refused there, wrong_gate, but no guesser: however often, neither they nor the site
    come nearer a lock, and the code still opens its gate after."""
    for _ in range(5):  # more than caller_failures
        decision = call(book, ledger, LINE, RESIDENT, code="5555")
        assert (decision.status, decision.reason, decision.opens) == (
            Status.NAK, "wrong_gate", False)
    assert ledger.lockout.strikes(RESIDENT) is None
    assert not ledger.lockout.recent
    assert call(book, ledger, BARRIER, RESIDENT, code="5555").reason == "granted_code"


def test_routing_neither_counts_toward_nor_is_blocked_by_lockout(book: CodeBook,
                                                                 ledger: Ledger) -> None:
    """Being routed wipes none of a caller's failures (the next wrong code still locks
    them), and a locked-out caller is still routed: no code is typed."""
    for _ in range(2):
        assert call(book, ledger, BARRIER, ACME, code="0000").reason == "unknown_code"
    request = Request(did=LINE, caller=ACME)
    decision = decide(request, book, ledger, WEDNESDAY_NOON)
    assert decision.reason == "routed_caller"
    assert ledger.apply(request, decision, WEDNESDAY_NOON) == Changes()
    assert ledger.lockout.callers[ACME].failures == 2
    assert call(book, ledger, BARRIER, ACME, code="0000").reason == "unknown_code"
    assert call(book, ledger, BARRIER, ACME, code="5555").reason == "locked_out"
    assert call(book, ledger, LINE, ACME).reason == "routed_caller"
    assert call(book, ledger, BARRIER, ACME).reason == "routed_caller"


def test_a_one_gate_site_without_numbers_leaves_the_lines_to_routes(tmp_path: Path) -> None:
    """A numberless gate takes every number but those routes name."""
    text = f"""
[site]
id = "one"
timezone = "Europe/Amsterdam"

[server]
tokens = ["{TOKEN}"]

[gates.barrier]
actuator = {{ type = "mock", pin = 17 }}
callers = ["{RESIDENT}"]

[[routes]]
name = "Sales"
numbers = ["{LINE}"]
callers = ["+3120*"]
destination = "+31501234510"

[log]
path = "{tmp_path / 'entries.sqlite3'}"
"""
    _, book = compiler.parse(text)
    ledger = Ledger.fresh(Policy())
    assert list(book.gates) == ["barrier"]
    assert call(book, ledger, "+31509999999", RESIDENT).reason == "granted_caller"
    assert call(book, ledger, LINE, RESIDENT).reason == "no_route"
    assert call(book, ledger, LINE, ACME).destination == "+31501234510"
    assert call(book, ledger, "+31509999999", ACME).reason == "unknown_caller"


@pytest.mark.parametrize(("moment", "expected"), [
    (local(2026, 3, 29, 1, 59, 59), "Desk"),  # CET, before the window
    (local(2026, 3, 29, 1, 59, 59) + 1, "Desk"),  # the next second is 03:00 CEST
    (local(2026, 3, 30, 2, 30), "Night"),
    (local(2026, 10, 25, 2, 30), "Night"),  # 02:30 CEST
    (local(2026, 10, 25, 2, 30) + 3600, "Night"),  # 02:30 again, CET
    (local(2026, 10, 25, 2, 30) + 5400, "Desk"),  # 03:00 CET
    (local(2026, 3, 27, 8, 0), "Day"),  # 08:00 in winter time
    (local(2026, 3, 30, 8, 0), "Day"),  # and in summer time
    (local(2026, 3, 30, 7, 59, 59), "Desk"),
])
def test_route_schedules_follow_the_sites_wall_clock_across_dst(
        tmp_path: Path, moment: float, expected: str) -> None:
    """Route schedules are site-local wall-clock windows: the spring-forward hour never
    comes, the fall-back hour comes twice, 08:00 is 08:00 in both halves of the year."""
    _, book = compiler.parse(config_text(tmp_path, """
        [[routes]]
        name = "Night"
        callers = ["+3120*"]
        schedule = ["daily 02:00-03:00"]
        destination = "Night"

        [[routes]]
        name = "Day"
        callers = ["+3120*"]
        schedule = ["mon-fri 08:00-18:00"]
        destination = "Day"

        [[routes]]
        name = "Desk"
        callers = ["+31*"]
        destination = "Desk"
        """))
    decision = call(book, Ledger.fresh(Policy()), DOOR, ACME, moment)
    assert decision.destination == expected


# -- config and CSV files -------------------------------------------------------------


def write(tmp_path: Path, routes: str, csv: str | None = None) -> Path:
    if csv is not None:
        (tmp_path / "accounts.csv").write_text(csv)
    path = tmp_path / "gated.toml"
    path.write_text(config_text(tmp_path, routes))
    return path


ONE_FILE = '[[routes]]\nname = "CRM"\nfile = "accounts.csv"\ndestination = "+31501234540"\n'


@pytest.mark.parametrize(("csv", "line", "message"), [
    ("number,destination,callername\n+31201234567,,A\nnot a number,,B\n", 3,
     "not a phone number: 'not a number'"),
    ("number,destination,callername\n+31201234567,,A\n+31201234568,x\n", 3,
     "expected 3 fields, got 2"),
    ("number;destination\n+31201234567;x\n+31-20*x*;y\n", 3,
     "a prefix is + and 1 to 15 digits"),
    ("number,destination,callername\n\n+31201234567," + "x" * 65 + ",\n", 3,
     "destination: at most 64 characters"),
    ("number,destination,callername\n+31201234567,,A\x07\n", 2, "control characters"),
    ("phone,destination\n+31201234567,x\n", 1, "expected a header row"),
    ("", 1, "empty"),
    ('number,destination,callername\n+31201234567,"x\n', 2, "not valid CSV"),
])
def test_a_bad_csv_row_is_a_config_error_naming_file_and_line(
        tmp_path: Path, csv: str, line: int, message: str) -> None:
    """The error names the CSV file and the line of the bad row, and why."""
    with pytest.raises(ConfigError) as raised:
        compiler.load(write(tmp_path, ONE_FILE, csv))
    assert raised.value.file == str(tmp_path / "accounts.csv")
    assert raised.value.line == line
    assert str(raised.value).startswith(f"{tmp_path / 'accounts.csv'}:{line}: routes[0].file: ")
    assert message in str(raised.value)


@pytest.mark.parametrize(("route", "key", "line", "message"), [
    ('[[routes]]\nname = "R"\ncallers = ["+3120*"]\n', "routes[0].destination", 1,
     "a route needs a destination or a callername"),
    ('[[routes]]\nname = "R"\ndestination = "1"\n', "routes[0].callers", 1,
     "a route needs callers (or a file of them)"),
    ('[[routes]]\nname = "R"\ndestination = "1"\ncallers = ["020*"]\n', "routes[0].callers[0]",
     4, "a prefix is + and 1 to 15 digits"),
    ('[[routes]]\nname = "R"\ndestination = "1"\ncallers = ["+3120*"]\ncolour = "red"\n',
     "routes[0].colour", 5, "unknown key"),
    ('[[routes]]\nname = "R"\ndestination = "1"\ncallers = ["+3120*"]\nschedule = ["soon"]\n',
     "routes[0].schedule", 5, "expected e.g."),
    ('[[routes]]\nname = "R"\ndestination = "1"\nfile = "missing.csv"\n', "routes[0].file",
     None, "cannot read"),
])
def test_route_config_errors_name_key_and_line(tmp_path: Path, route: str, key: str,
                                               line: int | None, message: str) -> None:
    """A route without an answer, without callers, with a bad prefix, key or schedule,
    or a file that is not there: a config error naming where."""
    path = write(tmp_path, route)
    with pytest.raises(ConfigError) as raised:
        compiler.load(path)
    assert raised.value.path == key
    assert message in raised.value.detail
    if line is not None:
        first = path.read_text().splitlines().index("[[routes]]") + 1
        assert raised.value.line == first + line - 1


def test_csv_paths_are_relative_to_the_configs_folder(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``file`` is found beside the config, wherever gated is started from."""
    path = write(tmp_path, ONE_FILE, "number\n+31201234567\n")
    monkeypatch.chdir("/")
    table = compiler.load(path).book.routes
    assert (table.routes, table.rows, table.files) == (1, 1, [(str(tmp_path / "accounts.csv"),
                                                               1)])


def test_a_crm_export_with_semicolons_a_bom_and_any_column_order_loads(tmp_path: Path) -> None:
    """Spreadsheets export with ';' and a byte-order mark; columns go by the header."""
    csv = "\ufeffCallername;Number;Destination\r\nAcme;06 1234 5678;+31501234599\r\n"
    book = compiler.load(write(tmp_path, ONE_FILE, csv)).book
    row = book.routes.find(DOOR, RESIDENT, WEDNESDAY_NOON, book.tz)
    assert row is not None and row[1:] == ("+31501234599", "Acme")


def test_100k_csv_rows_load_and_answer_each_caller(tmp_path: Path) -> None:
    """A CRM export of 100,000 rows, in mixed number forms, routes every caller to their
    own row (first, last, national form, prefix) and no one else."""
    rng = random.Random(13)
    numbers = rng.sample(range(10_000_000, 100_000_000), 100_000)
    lines = ["number,destination,callername"]
    for i, n in enumerate(numbers):
        shown = f"06{n}" if i % 3 == 0 else (f"+31 6 {n}" if i % 3 == 1 else f"+316{n}")
        lines.append(f"{shown},+3150{i % 100:07d},Customer {i}")
    lines.append("+3170*,+31501234000,The Hague")
    book = compiler.load(write(tmp_path, ONE_FILE, "\n".join(lines) + "\n")).book
    assert book.routes.rows == 100_001
    for i in (0, 1, 2, 50_000, 99_999):
        row = book.routes.find(DOOR, f"+316{numbers[i]}", WEDNESDAY_NOON, book.tz)
        assert row is not None and row[1:] == (f"+3150{i % 100:07d}", f"Customer {i}")
    hague = book.routes.find(DOOR, "+31701234567", WEDNESDAY_NOON, book.tz)
    assert hague is not None and hague[1] == "+31501234000"
    assert book.routes.find(DOOR, "+31101234567", WEDNESDAY_NOON, book.tz) is None


@pytest.mark.parametrize("region", ["NL", "BE", "DE", "US", "GB", "AR", "IT"])
def test_csv_numbers_normalise_exactly_as_the_webhook_does(region: str) -> None:
    """The CSV's shortcut (one phonenumbers call per number shape) gives what
    normalise gives a caller id, for every number in every form that normalise
    accepts, in several regions."""
    rng = random.Random(region)
    forms = ["+31 6 {}", "06{}", "+310{}", "0031 6 {}", "+1 212 {}", "+54 9 11 {}",
             "+39 06 {}", "+44 20 {}", "+32 4{}", "0{}", "+49 30 {}", "({}) ", "+3120{}",
             "011 {}", "1{}"]
    normal = Normaliser(region)
    checked = 0
    for _ in range(3000):
        raw = rng.choice(forms).format(rng.randrange(10**6, 10**8))
        try:
            expected = normalise(raw, region)
        except NumberError:
            # A row phonenumbers refuses may pass the shortcut: it then keys the
            # digits as given, which only a caller id of those digits can match.
            continue
        assert normal(raw) == expected, raw
        checked += 1
    assert checked > 1500


def test_routing_imports_neither_aiohttp_nor_paho(tmp_path: Path) -> None:
    """The routing logic is pure (DESIGN §6): compiling routes and deciding a routed call
    loads no HTTP, MQTT or GPIO library."""
    import subprocess
    import sys

    (tmp_path / "accounts.csv").write_text(CSV)
    path = tmp_path / "gated.toml"
    path.write_text(config_text(tmp_path, ROUTES))
    script = (
        "import sys\n"
        "from gated.book import compiler\n"
        "from gated.core.decide import Ledger, Request, decide\n"
        "from gated.core.lockout import Policy\n"
        f"book = compiler.load({str(path)!r}).book\n"
        f"d = decide(Request({LINE!r}, {ACME!r}), book, Ledger.fresh(Policy()), 0.0)\n"
        "assert d.reason == 'routed_caller', d\n"
        "print(sorted(m for m in ('aiohttp', 'paho', 'aiomqtt', 'gpiozero') "
        "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


# -- a route whose file carries the answers ---------------------------------------------


def test_a_route_whose_csv_rows_carry_the_answers_needs_none_of_its_own(
        tmp_path: Path) -> None:
    """A route with numbers and a file whose rows each carry a destination or a
    callername loads without a destination of its own, and each row answers with its
    own."""
    csv = ("number,destination,callername\n+31201234567,+31501234599,Acme BV\n"
           "+31301234567,,Utrecht desk\n")
    route = '[[routes]]\nname = "CRM"\nnumbers = ["+31501234500"]\nfile = "accounts.csv"\n'
    book = compiler.load(write(tmp_path, route, csv)).book
    assert book.routes.rows == 2
    assert book.routes.find(LINE, ACME, WEDNESDAY_NOON, book.tz) is not None
    decision = call(book, Ledger.fresh(Policy()), LINE, ACME)
    assert (decision.reason, decision.destination, decision.callername) == (
        "routed_caller", "+31501234599", "Acme BV")
    decision = call(book, Ledger.fresh(Policy()), LINE, OFFICE)
    assert (decision.reason, decision.destination, decision.callername) == (
        "routed_caller", "", "Utrecht desk")


@pytest.mark.parametrize(("route", "csv", "key", "line", "message"), [
    # A row with neither, and the route has neither to give it: the file's line.
    ('[[routes]]\nname = "CRM"\nfile = "accounts.csv"\n',
     "number,destination\n+31201234567,+31501234599\n+31301234567,\n", "routes[0].file", 3,
     "a row needs a destination or a callername (the route gives neither)"),
    # The route's own callers have no row to carry an answer: the route needs one.
    ('[[routes]]\nname = "CRM"\ncallers = ["+3120*"]\nfile = "accounts.csv"\n',
     "number,destination\n+31301234567,+31501234599\n", "routes[0].destination", None,
     "a route needs a destination or a callername"),
])
def test_a_route_answer_left_empty_is_an_error_naming_where(
        tmp_path: Path, route: str, csv: str, key: str, line: int | None,
        message: str) -> None:
    """With no answer of the route's own, a CSV row left with neither destination nor
    callername is a config error naming the file and line; callers listed in the route
    itself still need the route's answer."""
    with pytest.raises(ConfigError) as raised:
        compiler.load(write(tmp_path, route, csv))
    assert raised.value.path == key
    assert message in raised.value.detail
    if line is not None:
        assert (raised.value.file, raised.value.line) == (str(tmp_path / "accounts.csv"), line)


@pytest.mark.parametrize(("numbers", "refused"), [
    ([LINE], None),
    (["0501234501"], None),  # the file's other line, in national form
    ([BARRIER, DOOR], None),  # a gate's own numbers stay the gate's: routes answer beside it
    (["+31509999999"], "numbers[0]"),  # a number of neither would become a new line
    ([LINE, "+31509999999"], "numbers[1]"),
])
def test_a_route_over_mqtt_answers_only_on_numbers_the_sites_file_gives_it(
        tmp_path: Path, numbers: list[str], refused: str | None) -> None:
    """A route over MQTT may name the lines of the site's file and its gates' numbers, never
    a number of neither: that would make it a line the file does not have."""
    import json

    from gated.book.routes import RouteError

    (tmp_path / "accounts.csv").write_text(CSV)
    config = compiler.load(write(tmp_path, ROUTES)).config
    message = json.dumps({"callers": ["+3120*"], "numbers": numbers,
                          "destination": "+31501234510"}).encode()
    if refused is None:
        route = parse_route("fleet", "r", message, config).route
        assert route.numbers == frozenset(normalise(n, "NL") for n in numbers)
    else:
        with pytest.raises(RouteError, match=rf"^{re.escape(refused)}: "):
            parse_route("fleet", "r", message, config)
