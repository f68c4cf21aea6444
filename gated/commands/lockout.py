"""Locks by hand: who is locked out and until when; lifting a lock, recorded as an entry."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sqlite3
import sys
import time

from gated.book import compiler
from gated.core.console import print_table
from gated.core.errors import StoreError
from gated.core.lockout import SITE, WITHHELD
from gated.core.numbers import normalise
from gated.site.store import Entry, Lock, clear_lock, connect, migrate, read_locks

# What the command line calls the keys the lockout counts under.
WITHHELD_WORD = "withheld"


def _who(key: str) -> str:
    return {SITE: "site", WITHHELD: WITHHELD_WORD}.get(key, key)


def _as_json(lock: Lock, now: float, tz: dt.tzinfo) -> dict[str, object]:
    return {
        "locked": "site" if lock.key == SITE else "caller",
        "caller": None if lock.key == SITE else _who(lock.key),
        "until": dt.datetime.fromtimestamp(lock.until, tz).isoformat(timespec="seconds"),
        "seconds_left": round(lock.until - now),
        "locks": lock.locks,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    loaded = compiler.load(args.config)
    tz = loaded.config.tz
    now = time.time()
    locks: list[Lock] = []
    if loaded.store_path.exists():
        try:
            conn = connect(loaded.store_path, readonly=True)
            try:
                locks = read_locks(conn, now)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the entry store {loaded.store_path}: {exc}") from exc
    if args.json:
        for lock in locks:
            print(json.dumps(_as_json(lock, now, tz), ensure_ascii=False))
        return 0
    if not locks:
        print("nothing is locked")
        return 0
    rows: list[tuple[str, ...]] = [("locked", "until", "left", "locks in a row")]
    for lock in locks:
        until = dt.datetime.fromtimestamp(lock.until, tz).strftime("%Y-%m-%d %H:%M:%S %Z")
        left = round(lock.until - now)
        rows.append((_who(lock.key), until, f"{left // 60}m{left % 60:02d}s", str(lock.locks)))
    print_table(rows)
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    if args.site == (args.caller is not None):
        raise argparse.ArgumentTypeError("say what to clear: a CALLER number, or --site")
    loaded = compiler.load(args.config)
    if args.site:
        key = SITE
    elif args.caller.strip().lower() == WITHHELD_WORD:
        key = WITHHELD
    else:
        # Stored as the gatekeeper normalised it: +31612345678 for 0612345678.
        number = normalise(args.caller, loaded.config.site.region)
        if number is None:
            raise argparse.ArgumentTypeError(f"not a phone number: {args.caller!r}")
        key = number
    if not loaded.store_path.exists():
        print(f"nothing is locked (no entry store at {loaded.store_path} yet)")
        return 1
    now = time.time()
    entry = Entry(time=now, gate=None, caller=None if key == SITE else key, did=None,
                  status="STAFF", reason="lockout_cleared", credential=getpass.getuser(),
                  kind="staff", source="cli")
    try:
        conn = connect(loaded.store_path)
        try:
            migrate(conn)
            cleared = clear_lock(conn, key, entry)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"nothing cleared: the entry store {loaded.store_path}: {exc}") from exc
    if not cleared:
        print(f"{_who(key)} is not locked; nothing cleared", file=sys.stderr)
        return 1
    print(f"cleared the lock on {'the site' if key == SITE else _who(key)}; recorded in the "
          "entry log (a running daemon follows within a few seconds)")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    what = "see and lift the guessing locks (too many wrong codes)"
    lockout = sub.add_parser("lockout", help=what, parents=[common], description=what)
    actions = lockout.add_subparsers(dest="lockout_command", required=True, metavar="ACTION")

    helptext = "who is locked out and until when (the site first)"
    p = actions.add_parser("ls", parents=[common], help=helptext, description=helptext)
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_ls)

    helptext = ("lift one lock now: a caller's or the whole site's; recorded as an entry, "
                "and a running daemon follows")
    p = actions.add_parser("clear", parents=[common], help=helptext, description=helptext)
    p.add_argument("caller", nargs="?", metavar="CALLER",
                   help="the caller's number as the log shows it, or 'withheld'")
    p.add_argument("--site", action="store_true", help="lift the site-wide lock")
    p.set_defaults(func=cmd_clear)
