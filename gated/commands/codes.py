"""Staff commands for credentials: visitor codes, code hashes, TOTP users, listings."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyotp

from gated.book import compiler, sitekey
from gated.book import config as config_mod
from gated.book.messages import ManagedCode, NotHere, Rejected, parse
from gated.core.console import parse_duration, parse_time, print_table, split_names
from gated.core.credential import CODE_RE, Credential
from gated.core.errors import ConfigError, StoreError
from gated.site import visitors
from gated.site.store import add_visitor, connect, load_visitors, migrate


def _between(low: int, high: int) -> Callable[[str], int]:
    def number(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}")
        return int(text)

    return number


def _at_least(low: int) -> Callable[[str], int]:
    return _between(low, 1_000_000)


def _at_most(count: int) -> Callable[[str], str]:
    """Text a code carries, bounded as in the config (the PBX shows 64 characters)."""
    def text(value: str) -> str:
        if len(value) > count:
            raise argparse.ArgumentTypeError(f"at most {count} characters")
        return value

    return text


def cmd_issue(args: argparse.Namespace) -> int:
    loaded = compiler.load(args.config, create_key=True)
    config, book = loaded.config, loaded.book
    now = time.time()
    start = (parse_time(args.valid_from, config.tz, "--valid-from").timestamp()
             if args.valid_from else None)
    if args.valid_until is not None and args.valid_for is not None:
        raise argparse.ArgumentTypeError("give --valid-for or --valid-until, not both")
    if args.valid_until is not None:
        until = parse_time(args.valid_until, config.tz, "--valid-until").timestamp()
        if until <= max(start or now, now):
            raise argparse.ArgumentTypeError("--valid-until: already past (or before "
                                             "--valid-from)")
    else:
        until = (start or now) + parse_duration(args.valid_for or "4h", "--valid-for")
    if config.mqtt is not None and not args.local:
        return _issue_on_broker(args, loaded, start, until)
    try:
        conn = connect(loaded.store_path)
        try:
            migrate(conn)
            visitors.install(book, load_visitors(conn))
            # Codes managed over MQTT sit in the daemon's book too: never their digits.
            taken = frozenset(code.digest(book) for code in _managed(conn, config))
            while True:
                issued = visitors.make(
                    book, name=args.name, gates=split_names(args.gates), valid_from=start,
                    valid_until=until, max_uses=args.max_uses, length=args.digits or
                    config.visitors.length, now=now, callername=args.callername,
                    destination=args.destination, taken=taken)
                if add_visitor(conn, issued.row):
                    break
        finally:
            conn.close()
    except sqlite3.Error as exc:
        # A full disk, or a store the daemon has locked: one line, nothing issued.
        raise StoreError(f"no visitor code issued: the entry store {loaded.store_path}: "
                         f"{exc}") from exc
    when = dt.datetime.fromtimestamp(until, config.tz).strftime("%Y-%m-%d %H:%M %Z")
    uses = ("" if args.max_uses is None else
            f", {args.max_uses} use{'s' if args.max_uses != 1 else ''}")
    print(f"{issued.code}")
    print(f"visitor code for {args.name}: {', '.join(issued.row.gates) or 'route only'}, "
          f"valid until {when}{uses} (id {issued.row.id}; the digits are not stored, "
          "note them now)", file=sys.stderr)
    return 0


def _issue_on_broker(args: argparse.Namespace, loaded: compiler.Loaded,
                     start: float | None, until: float) -> int:
    """With [mqtt], a visitor code is a managed code like any other (id ``v-…``),
    published as a keyed hash, so every tool that lists the broker's codes sees it."""
    from gated.book.messages import VISITOR_PREFIX
    from gated.commands import brokercodes as staff

    tz = loaded.config.tz
    length = args.digits or loaded.config.visitors.length
    code = visitors.random_digits(length)
    fields: dict[str, object] = {
        "name": args.name, "code": code, "gates": split_names(args.gates),
        "valid_until": dt.datetime.fromtimestamp(until, tz).isoformat(),
    }
    if start is not None:
        fields["valid_from"] = dt.datetime.fromtimestamp(start, tz).isoformat()
    if args.max_uses is not None:
        fields["max_uses"] = args.max_uses
    for key in ("callername", "destination"):
        if getattr(args, key):
            fields[key] = getattr(args, key)
    return staff.publish(loaded, "site", f"{VISITOR_PREFIX}{secrets.token_hex(4)}", fields,
                         code, show_code=True, wait=staff.DEFAULT_WAIT)


def cmd_hash(args: argparse.Namespace) -> int:
    loaded = compiler.load(args.config, create_key=True)  # the book's key is the site key
    code = args.code
    if code is None:
        code = getpass.getpass("code: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not CODE_RE.fullmatch(code):
        print("a code is 4 to 16 digits", file=sys.stderr)
        return 2
    print(f'code_hash = "{sitekey.code_hash(loaded.book.key, code)}"')
    return 0


def _validity(credential: Credential, tz: dt.tzinfo) -> str:
    def fmt(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M")

    parts = []
    if credential.valid_from is not None:
        parts.append(f"from {fmt(credential.valid_from)}")
    if credential.valid_until is not None:
        parts.append(f"until {fmt(credential.valid_until)}")
    if credential.schedule is not None:
        parts.append("scheduled")
    return " ".join(parts) or "always"


def _credential_json(credential: Credential, tz: dt.tzinfo, used: int) -> dict[str, object]:
    """One credential as `codes ls --json` gives it: ISO 8601 times, never digits."""
    def iso(ts: float | None) -> str | None:
        return None if ts is None else dt.datetime.fromtimestamp(ts, tz).isoformat()

    return {
        "kind": credential.kind, "name": credential.name, "id": credential.id,
        "gates": sorted(credential.gates), "valid_from": iso(credential.valid_from),
        "valid_until": iso(credential.valid_until),
        "scheduled": credential.schedule is not None,
        "uses_left": None if credential.max_uses is None
        else max(credential.max_uses - used, 0),
    }


def _managed(conn: sqlite3.Connection, config: config_mod.Config) -> list[ManagedCode]:
    """Codes managed over MQTT, from the daemon's local copy (no broker needed)."""
    found = []
    for scope, code_id, body in conn.execute("SELECT scope, id, body FROM managed_codes"):
        with contextlib.suppress(Rejected, NotHere):  # the daemon drops these too
            found.append(parse(scope, code_id, bytes(body), config))
    return found


def cmd_ls(args: argparse.Namespace) -> int:
    if args.broker or args.fleet:
        from gated.commands import brokercodes as staff

        return staff.cmd_ls(args)
    loaded = compiler.load(args.config)
    config, book = loaded.config, loaded.book
    uses: dict[str, int] = {}
    managed: list[Credential] = []
    if loaded.store_path.exists():
        conn = connect(loaded.store_path, readonly=True)
        try:
            uses = dict(conn.execute("SELECT credential_id, count FROM uses"))
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= 2:
                visitors.install(book, load_visitors(conn))
            if version >= 3:
                managed = [code.credential for code in _managed(conn, config)]
        finally:
            conn.close()
    digits = {c.id or c.name: c.code for c in config.codes if c.code}
    everything = [*book.credentials(), *book.visitors.values(), *managed]
    if args.json:
        for credential in sorted(everything, key=lambda c: (c.kind, c.name.lower())):
            item = _credential_json(credential, book.tz, uses.get(credential.id, 0))
            if args.show_codes and credential.id in digits:
                item["code"] = digits[credential.id]
            print(json.dumps(item, ensure_ascii=False))
        return 0
    header = ("kind", "name", "gates", "valid", "uses left")
    rows: list[tuple[str, ...]] = [(*header, "code") if args.show_codes else header]
    for credential in sorted(everything, key=lambda c: (c.kind, c.name.lower())):
        left = "-" if credential.max_uses is None else str(
            max(credential.max_uses - uses.get(credential.id, 0), 0))
        gates = ",".join(sorted(credential.gates)) or "(route)"
        row: tuple[str, ...] = (credential.kind, credential.name, gates,
                                _validity(credential, book.tz), left)
        if args.show_codes:
            shown = digits.get(credential.id)
            row = (*row, shown if shown is not None else
                   ("(hashed)" if credential.kind == "code" else "-"))
        rows.append(row)
    print_table(rows)
    return 0


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def _checked(text: str, path: Path) -> None:
    """Parse ``text`` as the config at ``path`` would be, or raise ConfigError."""

    def site_key(config: config_mod.Config) -> bytes | None:
        return sitekey.read_key(config_mod.key_path(path.resolve(), config))

    compiler.parse(text, source=str(path), key=site_key)


def _totp_number(text: str, option: str, bounds: tuple[int, int]) -> int:
    """``--digits``/``--period`` by the bounds the config itself puts on ``[[totp]]``."""
    try:
        return _between(*bounds)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{option}: {exc}, got {text!r}") from None


def cmd_totp_add(args: argparse.Namespace) -> int:
    from gated.book import files
    from gated.commands import qr

    path = Path(args.config or config_mod.default_path())
    digits = _totp_number(args.digits, "--digits", config_mod.TOTP_DIGITS)
    period = _totp_number(args.period, "--period", config_mod.TOTP_PERIOD)
    try:
        args.name.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the name is not valid UTF-8 text") from None
    qr_file = Path(args.qr) if args.qr else None
    if qr_file is not None:
        qr.check_file(qr_file)
    loaded = compiler.load(path)
    gates = split_names([args.gates])
    unknown = [g for g in gates if g not in loaded.config.gates]
    if unknown or not gates:
        print(f"--gates: no gate named {unknown[0] if unknown else '(none)'!r}; "
              f"gates: {', '.join(loaded.config.gates)}", file=sys.stderr)
        return 2
    secret = pyotp.random_base32(32)
    block = (f"\n[[totp]]\nname = {_toml_string(args.name)}\nsecret = {_toml_string(secret)}\n"
             f"gates = [{', '.join(_toml_string(g) for g in gates)}]\n")
    if digits != 6:
        block += f"digits = {digits}\n"
    if period != 30:
        block += f"period = {period}\n"
    try:
        if args.no_write:
            _checked(path.read_text(encoding="utf-8").rstrip("\n") + "\n" + block, path)
        else:
            # Read again under the lock: another `totp add` may have added its
            # user since the load above, and this one must keep it.
            with files.replacing(path, through_link=True) as replacement:
                original = path.read_text(encoding="utf-8")
                changed = original.rstrip("\n") + "\n" + block
                _checked(changed, path)
                replacement.commit(changed.encode("utf-8"))
    except ConfigError as exc:
        print(f"not added: {exc}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        print(f"not added: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    otp = pyotp.TOTP(secret, digits=digits, interval=period)
    uri = otp.provisioning_uri(name=args.name, issuer_name=f"gated {loaded.config.site.id}")
    code = qr.make(uri)
    if qr_file is not None:
        # The user is in the config already: the URI first, so a QR file that
        # cannot be written still leaves a way to enrol.
        print(uri)
        qr.save(code, qr_file)
    else:
        qr.terminal(code, sys.stdout)
        print(uri)
    where = "not written (--no-write)" if args.no_write else f"added to {path}"
    scan = f"the QR code in {qr_file}" if qr_file is not None else "the code above"
    print(f"TOTP user {args.name!r} for {', '.join(gates)}: {where}; scan {scan} "
          "with any authenticator app.", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    codes = sub.add_parser("codes", help="manage codes", parents=[common])
    codes_sub = codes.add_subparsers(dest="codes_command", required=True, metavar="ACTION")

    helptext = "issue a random visitor code for a limited time"
    p = codes_sub.add_parser("issue", parents=[common], help=helptext, description=helptext)
    p.add_argument("--name", required=True, type=_at_most(config_mod.MAX_NAME),
                   help="who it is for (shown in the log)")
    p.add_argument("--gates", required=True, nargs="+",
                   help="gate names, space- or comma-separated")
    p.add_argument("--valid-for", help="how long: 90m, 4h, 2d (default 4h)")
    p.add_argument("--valid", dest="valid_for", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--valid-until",
                   help="when it ends instead (ISO time, e.g. 2026-12-24T18:00, site time)")
    p.add_argument("--valid-from",
                   help="when it starts (ISO time, e.g. 2026-12-01T07:00, site time; "
                        "default now)")
    p.add_argument("--start", dest="valid_from", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--max-uses", type=_at_least(1), default=None,
                   help="how many entries (default unlimited)")
    p.add_argument("--uses", dest="max_uses", type=_at_least(1),
                   help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--digits", type=_between(6, 12),
                   help="length of the code, 6 to 12 (default [visitors] length)")
    p.add_argument("--length", dest="digits", type=_between(6, 12),
                   help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--callername", default="", type=_at_most(config_mod.MAX_CALLERNAME),
                   help="shown to the PBX on success")
    p.add_argument("--destination", default="", type=_at_most(config_mod.MAX_DESTINATION),
                   help="where the PBX routes the call")
    p.add_argument("--local", action="store_true",
                   help="keep it in this machine's store even when [mqtt] is configured")
    p.set_defaults(func=cmd_issue)

    p = codes_sub.add_parser("hash", parents=[common],
                             help="print the keyed hash of a code, for code_hash in the config")
    p.add_argument("--code", help="the digits (default: read from the terminal or stdin)")
    p.set_defaults(func=cmd_hash)

    p = codes_sub.add_parser("ls", parents=[common],
                             help="list credentials: names, gates, validity, uses left")
    p.add_argument("--show-codes", action="store_true", help="also print the digits in the file")
    p.add_argument("--broker", action="store_true",
                   help="list the codes on the MQTT broker instead, with gated's verdicts")
    p.add_argument("--fleet", action="store_true", help="with --broker: only the fleet's")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_ls)

    from gated.commands import brokercodes as staff

    staff.add_actions(codes_sub, common)

    from gated.commands import routes as routestaff

    routestaff.add_parsers(sub, common)

    totp = sub.add_parser("totp", help="manage TOTP users", parents=[common])
    totp_sub = totp.add_subparsers(dest="totp_command", required=True, metavar="ACTION")
    p = totp_sub.add_parser("add", parents=[common],
                            help="create a TOTP user: secret, otpauth URI and QR code")
    p.add_argument("name", help="who the user is (shown in the log and the app)")
    p.add_argument("--gates", required=True, help="comma-separated gate names")
    p.add_argument("--digits", default="6", help="digits per code, 6 to 8 (default 6)")
    p.add_argument("--period", default="30",
                   help="seconds each code lasts, 15 to 120 (default 30)")
    p.add_argument("--qr", metavar="FILE",
                   help="write the QR code to FILE (.png or .svg) instead of the terminal")
    p.add_argument("--no-write", action="store_true", help="print only; do not edit the config")
    p.set_defaults(func=cmd_totp_add)

