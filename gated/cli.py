"""The ``gated`` command: the daemon and the tools around it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import re
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gated import __version__
from gated import forward as forwards
from gated.book import compiler
from gated.book import config as config_mod
from gated.commands import codes as manage
from gated.commands import forwards as forward_commands
from gated.core.console import parse_since, print_table
from gated.core.errors import ActuatorError, ConfigError, GatedError, StoreError
from gated.core.printable import printable
from gated.pbx.voipgrid import WHAT_THE_DIAL_PLAN_DOES, parse_body

if TYPE_CHECKING:
    from gated.site.store import Entry


def _writable_cwd(loaded: compiler.Loaded) -> None:
    """Move to a writable folder: lgpio makes its notify pipe in the working directory.

    It does so when imported, so ``sudo -u gated gated pulse`` from a home
    directory the gated user cannot write would fail before touching a pin.
    """
    if os.access(".", os.W_OK):
        return
    for folder in (loaded.store_path.parent, Path(tempfile.gettempdir())):
        if folder.is_dir() and os.access(folder, os.W_OK):
            os.chdir(folder)
            return


def cmd_run(args: argparse.Namespace) -> int:
    from gated.daemon import Daemon, claim_state, long_lived
    from gated.site import logs
    from gated.site.heap import release_memory

    state = claim_state(args.config)
    with long_lived():
        # Mapped from the state directory when nothing changed since it was
        # compiled, else compiled by a child process first.
        loaded = compiler.load_for_daemon(args.config)
    logs.configure(loaded.config.log.format, loaded.config.log.level)
    compiler.warn_unkept(loaded)
    _writable_cwd(loaded)
    # The daemon keeps only what it needs: no reference here to the full config.
    daemon = Daemon(compiler.without_credentials(loaded), state_lock=state)
    del loaded
    release_memory()
    asyncio.run(daemon.run())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = compiler.load(args.file or args.config)
    config, book = loaded.config, loaded.book
    print(f"{loaded.path}: OK")
    print(f"site      {config.site.id} ({config.site.timezone}, region {config.site.region})")
    print(f"webhook   http://{config.server.listen}{config.server.path}"
          f"  ({len(config.server.tokens)} token(s), deadline {config.server.answer_deadline}s)")
    for name, gate in config.gates.items():
        actuator = gate.actuator
        detail = " ".join(f"{k}={v}" for k, v in _fields(actuator).items())
        numbers = ", ".join(sorted(book.gates[name].numbers)) or "(any number)"
        print(f"gate      {name}: {numbers}; {actuator.__struct_config__.tag} {detail}; "
              f"{len(gate.callers)} caller(s)")
    if config.twiml is not None:
        twiml = config.twiml
        auth = "signatures (auth_token)" if twiml.auth_token else "?token= as [server]"
        print(f"twiml     {twiml.public_url} -> http://{config.server.listen}{twiml.path}  "
              f"({auth}, {twiml.attempts} attempt(s), fallback {twiml.fallback or 'hang up'})")
    print(f"codes     {book.code_count} static, {book.totp_count} TOTP")
    if args.codes:
        for credential in book.credentials():
            gates = ",".join(sorted(credential.gates)) or "(route only)"
            print(f"  {credential.kind:7} {credential.name}: {gates}"
                  + (f", max {credential.max_uses} uses" if credential.max_uses else ""))
    if book.routes.routes:
        print(routes_summary(loaded))
    print(guessing_summary(loaded))
    print(f"entries   {loaded.store_path}")
    broker = f"{config.mqtt.host}:{config.mqtt.port}" if config.mqtt else "off"
    print(f"mqtt      {broker}")
    for forward in config.forward:
        # The host only: the rest of a URL may be a secret.
        host = urllib.parse.urlsplit(forward.url).hostname
        print(f"forward   {forward.name}: {forward.format} to {host}, caller {forward.caller}"
              + (", alarms too" if forward.alarms else ""))
    return 0


def routes_summary(loaded: compiler.Loaded) -> str:
    """[[routes]]: how many, their callers, the lines they make and their files."""
    book = loaded.book
    table = book.routes
    lines = sorted(n for n in table.numbers if n not in book.by_number)
    text = (f"routes    {table.routes} route(s), {table.rows:,} caller(s); lines: "
            f"{', '.join(lines) or '(none: routes answer on gate numbers only)'}")
    for file, rows in table.files:
        text += f"\n  file    {file}: {rows:,} row(s)"
    return text


def guessing_summary(loaded: compiler.Loaded) -> str:
    """What the lockout bounds a guesser to, against these codes."""
    from gated.core.lockout import guesses_per_year, hit_chance
    from gated.daemon import policy

    lengths = [len(c.code) for c in loaded.config.codes if c.code and c.gates]
    lengths += [t.digits for t in loaded.config.totp]
    guesses = guesses_per_year(policy(loaded))
    if not lengths:
        return f"guessing  at most {guesses:,} wrong codes a year (no codes that open)"
    shortest = min(lengths)
    valid = len(lengths) + 2 * len(loaded.config.totp)  # TOTP: 3 steps valid at once
    chance = hit_chance(guesses, valid, shortest)
    return (f"guessing  at most {guesses:,} wrong codes a year; against {valid} valid codes of "
            f"{shortest}+ digits a guesser's chance of a hit in a year is {chance:.1%}")


def _fields(struct: object) -> dict[str, object]:
    return {k: getattr(struct, k) for k in struct.__struct_fields__}  # type: ignore[attr-defined]


def cmd_call(args: argparse.Namespace) -> int:
    codes: list[str] = args.code or []
    if args.twiml:
        from gated.pbx import twiml_player

        platform = twiml_player.Platform.from_config(compiler.load(args.config).config,
                                                     args.url, args.timeout)
        return twiml_player.play(platform, caller=getattr(args, "from"), called=args.to,
                                 callername=args.callername, codes=codes)
    if len(codes) > 1:
        raise argparse.ArgumentTypeError("one --code per VoIPGRID call (several: --twiml)")
    url = args.url
    token = args.token
    loaded: compiler.Loaded | None = None
    # With a config the entry the call made can explain the answer.
    if url is None or token is None or args.config:
        loaded = compiler.load(args.config)
        server = loaded.config.server
        url = url or f"http://{server.listen}{server.path}"
        token = token or server.tokens[0]
    query = urllib.parse.urlencode({
        "token": token, "code": codes[0] if codes else "", "did": args.to or "",
        "callerid": getattr(args, "from") or "", "callername": args.callername or "",
    })
    target = f"{url}{'&' if '?' in url else '?'}{query}"
    shown = re.sub(r"(token|code)=[^&]*", r"\1=***", target)
    print(f"GET {shown}")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(target, timeout=args.timeout) as response:  # noqa: S310 (the URL is the user's)
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        print(f"HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}")
        return 2
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        # The webhook closes a connection from outside allow_from unanswered.
        hint = (" (closed unanswered: is this machine outside [server] allow_from?)"
                if isinstance(reason, ConnectionResetError) else "")
        print(f"no answer: {reason}{hint}")
        return 2
    elapsed = (time.monotonic() - started) * 1000
    print(f"HTTP {status} in {elapsed:.0f} ms: {body}")
    fields = parse_body(body)
    word = fields.get("status", "")
    meaning = WHAT_THE_DIAL_PLAN_DOES.get("NAK" if word not in ("ACK", "ERR") else word)
    print(f"-> {meaning}")
    for key in ("callername", "destination"):
        if fields.get(key):
            print(f"   {key}: {fields[key]}")
    if loaded is not None:
        _explain(loaded, args, time.time() - elapsed / 1000 - 1)
    return 0 if word == "ACK" else 1


def _explain(loaded: compiler.Loaded, args: argparse.Namespace, since: float) -> None:
    """Why, from this call's entry in the local store (when this user can read it)."""
    from gated.core.numbers import normalise
    from gated.site.store import read_entries

    try:
        did = normalise(args.to or None, loaded.config.site.region)
        caller = normalise(getattr(args, "from") or None, loaded.config.site.region)
        found = [e for e in read_entries(loaded.store_path, since=since, limit=20)
                 if e.did == did and e.caller == caller and e.source == "pbx"]
    except (GatedError, OSError, sqlite3.Error):
        return
    if not found:
        return
    entry = found[0]
    who = f" ({entry.kind} {entry.credential!r})" if entry.credential else ""
    print(f"   reason: {entry.reason}{who}")
    if entry.reason == "routed_caller":
        print("   a route for this caller: nothing was opened; the dial plan puts the call "
              "through to the destination")


def _printable(entry: Entry) -> Entry:
    # Rows stored before callernames were cleaned may hold control characters.
    text: dict[str, Any] = {k: printable(v) for k, v in entry.as_dict().items()
                            if isinstance(v, str)}
    return dataclasses.replace(entry, **text)


def cmd_log(args: argparse.Namespace) -> int:
    from gated.site.store import entries_to_json, read_entries

    tz: dt.tzinfo | None = None  # the machine's zone when only a store is given
    if args.db:
        path = Path(args.db)
    else:
        loaded = compiler.load(args.config)
        path, tz = loaded.store_path, loaded.config.tz
    local = tz or dt.datetime.now().astimezone().tzinfo
    assert local is not None
    since = parse_since(args.since, time.time(), local) if args.since else None
    entries = [_printable(e) for e in read_entries(path, since=since, gate=args.gate,
                                                   limit=args.limit)]
    if args.json:
        if entries:
            print(entries_to_json(reversed(entries)))
        return 0
    if not entries:
        print("no entries")
        return 0
    rows: list[tuple[str, ...]] = [
        ("time", "gate", "caller", "status", "reason", "who", "actuator", "ms", "source")]
    for e in reversed(entries):
        when = dt.datetime.fromtimestamp(e.time, local).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((when, e.gate or "-", e.caller or "-", e.status, e.reason,
                     e.credential or "-", e.actuator or "-", f"{e.latency_ms:.1f}", e.source))
    print_table(rows)
    return 0


def cmd_pulse(args: argparse.Namespace) -> int:
    from gated import actuators
    from gated.site import statelock

    loaded = compiler.load(args.config)
    gate = loaded.config.gates.get(args.gate)
    if gate is None:
        print(f"no gate {args.gate!r}; gates: {', '.join(loaded.config.gates)}", file=sys.stderr)
        return 2
    if isinstance(gate.actuator, config_mod.DtmfActuatorConfig):
        print(f"gate {args.gate!r} opens by a tone played into a call, not a relay; try it "
              "with: gated call --twiml --to NUMBER --code CODE", file=sys.stderr)
        return 2
    # A running daemon drives the relays: refuse rather than fight it for the
    # pin. No lock file yet means no daemon ever ran on this state, and
    # creating one here (as root, say) could keep the daemon from starting.
    lock = (statelock.hold(loaded.store_path)
            if statelock.lock_path(loaded.store_path).exists() else None)
    _writable_cwd(loaded)

    async def pulse() -> str:
        actuator = actuators.build(args.gate, gate.actuator)
        if gate.sensor is not None:
            # On the bench the sensor matters as much as the relay: the result
            # says confirmed, or the error says the gate did not move.
            from gated.site.sensor import ConfirmingActuator, GateSensor

            sensor = GateSensor.create(args.gate, gate.sensor, mock_factory=None,
                                       on_alarm=lambda *_: None)
            actuator = ConfirmingActuator(actuator, sensor)
        try:
            result = await actuator.open()
            await asyncio.sleep(getattr(gate.actuator, "pulse", 0) + 0.1)
            return result
        finally:
            await actuator.close()

    try:
        result = asyncio.run(pulse())
    finally:
        if lock is not None:
            lock.release()
    print(f"gate {args.gate}: {result}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from gated.commands import doctor

    path = args.config or config_mod.default_path()
    print(f"gated doctor: {path}")
    text, problems = doctor.report(doctor.diagnose(path, dev=Path(args.dev)))
    print(text)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gated", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gated {__version__}")
    parser.add_argument("-c", "--config", help="config file (default $GATED_CONFIG or "
                        f"{config_mod.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # -c works before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config file")

    def add(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, parents=[common])

    p = add("run", "run the daemon")
    p.set_defaults(func=cmd_run)

    p = add("check-config", "validate a config file and summarise it")
    p.add_argument("file", nargs="?", help="config file to check")
    p.add_argument("--codes", action="store_true", help="list every credential (never digits)")
    p.set_defaults(func=cmd_check_config)

    p = add("call", "call the webhook the way the PBX does, and explain the answer")
    p.add_argument("--code", action="append", help="digits the caller typed (none: no code); "
                   "with --twiml, again for each next attempt")
    p.add_argument("--twiml", action="store_true",
                   help="be the TwiML platform: a whole signed call, incoming then each code")
    p.add_argument("--from", dest="from", default="", metavar="NUMBER", help="caller's number")
    p.add_argument("--to", default="", metavar="NUMBER", help="the called number (selects gate)")
    p.add_argument("--callername", default="")
    p.add_argument("--url", help="webhook URL (default: from the config; --twiml: the "
                   "[twiml] path on server.listen)")
    p.add_argument("--token", help="token (default: the config's first)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_call)

    p = add("log", "show recent entries")
    p.add_argument("--since", help="10m, 2h, 3d, today, or an ISO time")
    p.add_argument("--gate")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--db", help="entry store path (default: from the config)")
    p.set_defaults(func=cmd_log)

    p = add("pulse", "pulse one gate's relay by hand (bench test; stop the daemon first)")
    p.add_argument("gate")
    p.set_defaults(func=cmd_pulse)

    p = add("doctor", "check the config, GPIO, state directory, broker and webhook; "
            "say what to fix")
    p.add_argument("--dev", default="/dev", help=argparse.SUPPRESS)  # tests point it elsewhere
    p.set_defaults(func=cmd_doctor)

    manage.add_parsers(sub, common)
    forward_commands.add_parsers(sub, common)
    from gated.commands import users as user_commands

    user_commands.add_parsers(sub, common)
    return parser


# Every load through the command line checks the forwards too.
config_mod.add_check(forwards.check)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, ActuatorError, GatedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `gated log | head`: the reader has what it wanted. Python would
        # complain again flushing stdout at exit, so point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # The machine's failures (a full disk, a file someone else owns) are one
    # line too, like every other refusal.
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"error: the entry store: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
