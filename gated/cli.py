"""The gated command: the daemon and the tools around it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
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
from gated.commands import lockout as lockout_commands
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


def _reload_changes(loaded: compiler.Loaded) -> list[str] | None:
    """What of this file only a restart applies, against the config the daemon runs with
    (the one list, ``config.RESTART_ONLY``); None when no daemon has run on this state."""
    running = compiler.read_in_force(loaded.store_path)
    return None if running is None else config_mod.restart_changes(running, loaded.config)


def _reload_word(loaded: compiler.Loaded) -> str:
    changes = _reload_changes(loaded)
    if changes is None:
        return "no daemon has run on this state yet: start it (nothing to reload)"
    if not changes:
        return "a reload applies this file (systemctl reload gated, or just save it)"
    return "a reload would refuse this file: restart gated for " + ", ".join(changes)


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.json:
        return _check_config_json(args)
    loaded = compiler.load(args.file or args.config)
    config, book = loaded.config, loaded.book
    print(f"{loaded.path}: OK")
    print(f"site      {config.site.id} ({config.site.zone}, region {config.site.region})")
    if config.site.timezone is None:
        print(f"warning: {compiler.NO_TIMEZONE}", file=sys.stderr)
    print(f"webhook   http://{config.server.listen}{config.server.path}"
          f"  ({len(config.server.tokens)} token(s), deadline {config.server.answer_deadline}s)")
    for name, gate in config.gates.items():
        actuator = gate.actuator
        detail = _set_fields(actuator)
        numbers = ", ".join(sorted(book.gates[name].numbers)) or "(any number)"
        print(f"gate      {name}: {numbers}; {actuator.__struct_config__.tag} {detail}; "
              f"{len(gate.callers)} caller(s)")
    if config.twiml is not None:
        twiml = config.twiml
        auth = "signatures (auth_token)" if twiml.auth_token else "?token= as [server]"
        print(f"twiml     {twiml.public_url} -> http://{config.server.listen}{twiml.path}  "
              f"({auth}, {twiml.attempts} attempt(s), fallback {twiml.fallback or 'hang up'})")
    print(f"codes     {book.code_count} static, {book.totp_count} TOTP")
    print(f"reload    {_reload_word(loaded)}")
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


def _check_config_json(args: argparse.Namespace) -> int:
    """check-config as one JSON object: ``ok`` and the summary, or ``ok`` false and why."""
    path = args.file or args.config or config_mod.default_path()
    try:
        loaded = compiler.load(path)
    except ConfigError as exc:
        print(json.dumps({"file": str(path), "ok": False, "error": str(exc)}, ensure_ascii=False))
        return 2
    config, book = loaded.config, loaded.book
    summary: dict[str, Any] = {
        "file": str(loaded.path), "ok": True,
        "site": {"id": config.site.id, "timezone": config.site.zone,
                 "timezone_set": config.site.timezone is not None,
                 "region": config.site.region},
        "webhook": {"url": f"http://{config.server.listen}{config.server.path}",
                    "tokens": len(config.server.tokens),
                    "answer_deadline": config.server.answer_deadline},
        "gates": [{"name": name, "numbers": sorted(book.gates[name].numbers),
                   "actuator": {"type": gate.actuator.__struct_config__.tag,
                                **{k: v for k, v in _fields(gate.actuator).items()
                                   if v is not None and v != ""}},
                   "callers": len(gate.callers)} for name, gate in config.gates.items()],
        "codes": {"static": book.code_count, "totp": book.totp_count},
        # null: no daemon has run on this state; [] a reload applies the file.
        "restart_needed_for": _reload_changes(loaded),
        "routes": {"routes": book.routes.routes, "callers": book.routes.rows},
        "entries": str(loaded.store_path),
        "mqtt": f"{config.mqtt.host}:{config.mqtt.port}" if config.mqtt else None,
        # The host only: the rest of a URL may be a secret.
        "forwards": [{"name": f.name, "format": f.format,
                      "host": urllib.parse.urlsplit(f.url).hostname, "caller": f.caller,
                      "alarms": f.alarms} for f in config.forward],
    }
    if args.codes:
        summary["credentials"] = [
            {"kind": c.kind, "name": c.name, "gates": sorted(c.gates), "max_uses": c.max_uses}
            for c in book.credentials()]
    print(json.dumps(summary, ensure_ascii=False, default=str))
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


def _toml_words(value: object) -> str:
    """A value as the config file writes it, not as Python prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_toml_words(v) for v in value)
    return str(value)


def _set_fields(struct: object) -> str:
    """``key=value`` for each key that is set (unset ones, None, are left out)."""
    return " ".join(f"{k}={_toml_words(v)}" for k, v in _fields(struct).items()
                    if v is not None and v != "")


# What an entry's reason or actuator result means, for `gated call` to say
# (docs/dialplan.md has the full table, with what to do).
REASON_WORDS = {
    "unknown_number": "no gate and no route line answers on the called number: --to must be "
                      "one of a gate's numbers ([gates.*] numbers) or a [[routes]] line",
    "no_route": "the called number is a route line, no code was typed, and no route matches "
                "this caller",
    "unknown_caller": "no code was typed and the caller is not on the gate's callers",
    "unknown_code": "no code matches the digits typed",
    "wrong_gate": "a valid code, but not for this gate",
    "locked_out": "too many wrong codes: this caller or the site is locked for a while "
                  "(gated lockout ls shows until when)",
    "used_up": "the code's max_uses is reached",
    "expired": "the code's valid_until has passed",
    "not_yet_valid": "the code's valid_from is still to come",
    "outside_schedule": "outside the code's weekly schedule",
    "wrong_caller": "the code is bound to other caller numbers",
    "store_failing": "the entry store cannot be written, so a code that spends a use is refused",
    "routed_caller": "a route for this caller: nothing was opened; the dial plan puts the call "
                     "through to the destination",
    "granted_route": "a route-only code: answered with its callername and destination, "
                     "nothing opened",
}
ACTUATOR_WORDS = {
    "needs_call": "nothing opened: the gate opens by a tone played into a call (a dtmf "
                  "gate), and a VoIPGRID answer cannot play one; try: gated call --twiml",
    "actuator_failed": "the open command could not be carried out (the journal says why)",
    "actuator_timeout": "the actuator did not confirm in time",
    "actuator_unreachable": "the actuator cannot be reached (is its MQTT broker up?)",
    "not_moved": "the open command went out but the gate's sensor saw no movement",
    "deadline": "the open did not finish within the answer deadline",
}


def cmd_call(args: argparse.Namespace) -> int:
    codes: list[str] = args.code or []
    if not args.to:
        print("warning: no --to: the webhook gets no called number, so no gate is selected "
              "(a site with one gate that lists no numbers excepted)", file=sys.stderr)
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
    report: dict[str, Any] = {"request": shown}
    say = (lambda _text: None) if args.json else print
    say(f"GET {shown}")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(target, timeout=args.timeout) as response:  # noqa: S310 (the URL is the user's)
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        _done(args, report, f"HTTP {exc.code}: {text}", http_status=exc.code, body=text)
        return 2
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        # The webhook closes a connection from outside allow_from unanswered.
        hint = (" (closed unanswered: is this machine outside [server] allow_from?)"
                if isinstance(reason, ConnectionResetError) else "")
        _done(args, report, f"no answer: {reason}{hint}", error=f"{reason}{hint}")
        return 2
    elapsed = (time.monotonic() - started) * 1000
    say(f"HTTP {status} in {elapsed:.0f} ms: {body}")
    fields = parse_body(body)
    word = fields.get("status", "")
    meaning = WHAT_THE_DIAL_PLAN_DOES.get("NAK" if word not in ("ACK", "ERR") else word)
    say(f"-> {meaning}")
    report.update(http_status=status, ms=round(elapsed, 1), body=body, status=word,
                  meaning=meaning)
    for key in ("callername", "destination"):
        if fields.get(key):
            report[key] = fields[key]
            say(f"   {key}: {fields[key]}")
    if loaded is not None:
        entry = _entry_of(loaded, args, time.time() - elapsed / 1000 - 1)
        if entry is not None:
            report["entry"] = _entry_json(entry, loaded.config.tz)
            for line in _explain(entry):
                say(f"   {line}")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    return 0 if word == "ACK" else 1


def _done(args: argparse.Namespace, report: dict[str, Any], text: str, **fields: Any) -> None:
    """A call that got no decision: one line, or the JSON report."""
    if args.json:
        print(json.dumps({**report, **fields}, ensure_ascii=False))
    else:
        print(text)


def _entry_of(loaded: compiler.Loaded, args: argparse.Namespace, since: float) -> Entry | None:
    """This call's entry in the local store (when this user can read it)."""
    from gated.core.numbers import normalise
    from gated.site.store import read_entries

    try:
        did = normalise(args.to or None, loaded.config.site.region)
        caller = normalise(getattr(args, "from") or None, loaded.config.site.region)
        found = [e for e in read_entries(loaded.store_path, since=since, limit=20)
                 if e.did == did and e.caller == caller and e.source == "pbx"]
    except (GatedError, OSError, sqlite3.Error):
        return None
    return found[0] if found else None


def _explain(entry: Entry) -> list[str]:
    """Why, in words: the reason and, when the gate was asked, what the actuator did."""
    who = f" ({entry.kind} {entry.credential!r})" if entry.credential else ""
    lines = [f"reason: {entry.reason}{who}"]
    if entry.reason in REASON_WORDS:
        lines.append(f"  {REASON_WORDS[entry.reason]}")
    if entry.actuator:
        lines.append(f"actuator: {entry.actuator}")
        if entry.actuator in ACTUATOR_WORDS:
            lines.append(f"  {ACTUATOR_WORDS[entry.actuator]}")
    return lines


def _entry_json(entry: Entry, tz: dt.tzinfo | None) -> dict[str, Any]:
    """An entry as JSON: its time in ISO 8601 with the offset (the site's zone when known)."""
    data = entry.as_dict()
    data["time"] = (dt.datetime.fromtimestamp(entry.time, tz).astimezone(tz)
                    .isoformat(timespec="milliseconds"))
    return data


def _printable(entry: Entry) -> Entry:
    # Rows stored before callernames were cleaned may hold control characters.
    text: dict[str, Any] = {k: printable(v) for k, v in entry.as_dict().items()
                            if isinstance(v, str)}
    return dataclasses.replace(entry, **text)


def cmd_log(args: argparse.Namespace) -> int:
    from gated.site.store import read_entries

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
        # ISO 8601 with the offset, as the MQTT events write it.
        for e in reversed(entries):
            print(json.dumps(_entry_json(e, local), ensure_ascii=False))
        return 0
    if not entries:
        print("no entries")
        return 0
    # The daemon's journal is in UTC (its lines end in Z); this table says its zone.
    zone = getattr(local, "key", None) or dt.datetime.now(local).strftime("%Z")
    rows: list[tuple[str, ...]] = [
        (f"time ({zone})", "gate", "caller", "status", "reason", "who", "actuator", "ms",
         "source")]
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
    if args.json:
        findings = doctor.diagnose(path, dev=Path(args.dev))
        problems = sum(1 for f in findings if f.level == "problem")
        print(json.dumps({"config": path, "problems": problems,
                          "findings": [dataclasses.asdict(f) for f in findings]},
                         ensure_ascii=False))
        return 1 if problems else 0
    print(f"gated doctor: {path}")
    text, problems = doctor.report(doctor.diagnose(path, dev=Path(args.dev)))
    print(text)
    return 1 if problems else 0


# Examples under each main command's --help (and a few of their actions').
EXAMPLES = {
    (): ["gated check-config", "gated call --code 471123 --from 0612345678 --to +31501234567",
         "gated log --since 1h", "gated doctor", "gated COMMAND --help"],
    ("run",): ["gated run", "gated -c /etc/gated/gated.toml run"],
    ("check-config",): ["gated check-config", "gated check-config /etc/gated/gated.toml --codes",
                        "gated check-config --json"],
    ("call",): ["gated call --code 471123 --from 0612345678 --to +31501234567",
                "gated call --from +31612345678 --to +31501234567   (a caller, no code)",
                "gated call --twiml --to +31201234567 --code 111111 --code 246810",
                "gated call --json --code 471123 --to +31501234567"],
    ("log",): ["gated log --since 10m", "gated log --since today --gate barrier",
               "gated log --json --since 2026-12-01T00:00"],
    ("pulse",): ["sudo systemctl stop gated && sudo -u gated gated pulse barrier"],
    ("doctor",): ["sudo -u gated gated doctor", "gated doctor --json"],
    ("codes",): ["gated codes issue --name Plumber --gates barrier --valid-for 4h --max-uses 1",
                 "gated codes put cleaner --gates barrier --valid-until 2026-12-24T18:00",
                 "gated codes import codes.csv", "gated codes ls", "gated codes ls --broker --json",
                 "gated codes hash"],
    ("codes", "issue"): [
        "gated codes issue --name Plumber --gates barrier --valid-for 4h --max-uses 1",
        "gated codes issue --name Movers --gates barrier door --valid-from 2026-12-01T08:00 "
        "--valid-until 2026-12-01T18:00"],
    ("codes", "put"): ["gated codes put cleaner --gates barrier door --max-uses 10",
                       "gated codes put day-shift --gates '*' --schedule 'mon-fri 07:00-18:00'"],
    ("codes", "import"): ["gated codes import codes.csv", "gated codes import --replace codes.csv",
                          "gated codes import couriers.csv --fleet"],
    ("codes", "ls"): ["gated codes ls", "gated codes ls --json", "gated codes ls --broker --fleet"],
    ("routes",): ["gated routes ls", "gated routes put acme --callers +31201234567 "
                  "--destination 201", "gated routes rm acme", "gated routes ls --broker --json"],
    ("totp",): ["gated totp add 'Flat 12' --gates barrier,door",
                "gated totp add 'Flat 12' --gates barrier --qr flat12.png"],
    ("forward",): ["gated forward ls", "gated forward ls --json", "gated forward retry crm"],
    ("lockout",): ["gated lockout ls", "gated lockout clear +31612345678",
                   "gated lockout clear --site", "gated lockout clear withheld"],
    ("users",): ["sudo -u gated gated users add ada --role admin",
                 "echo \"$PASSWORD\" | gated users add bob --role staff --password-stdin",
                 "gated users ls", "gated users passwd bob", "gated users rm bob"],
}


def _finish(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Every command's --help: its description, and examples where there are some."""
    if path in EXAMPLES:
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[path])
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None:
                    sub.description = helps.get(name)
                _finish(sub, (*path, name))


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
    p.add_argument("--json", action="store_true",
                   help="one JSON object: ok and the summary, or ok false and the error")
    p.set_defaults(func=cmd_check_config)

    p = add("call", "call the webhook the way the PBX does, and explain the answer")
    p.add_argument("--code", action="append", help="digits the caller typed (none: no code); "
                   "with --twiml, again for each next attempt")
    p.add_argument("--twiml", action="store_true",
                   help="be the TwiML platform: a whole signed call, incoming then each code")
    p.add_argument("--from", dest="from", default="", metavar="NUMBER", help="caller's number")
    p.add_argument("--to", default="", metavar="NUMBER", help="the called number (selects gate)")
    p.add_argument("--callername", default="", help="the caller's name, as the PBX passes it")
    p.add_argument("--url", help="webhook URL (default: from the config; --twiml: the "
                   "[twiml] path on server.listen)")
    p.add_argument("--token", help="token (default: the config's first)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the answer (default 10)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: the answer, and the entry the call made")
    p.set_defaults(func=cmd_call)

    p = add("log", "show recent entries")
    p.add_argument("--since", help="10m, 2h, 3d, today, or an ISO time")
    p.add_argument("--gate", help="only this gate's entries")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--db", help="entry store path (default: from the config)")
    p.set_defaults(func=cmd_log)

    p = add("pulse", "pulse one gate's relay by hand (bench test; stop the daemon first)")
    p.add_argument("gate", help="the gate's name, as in [gates.NAME]")
    p.set_defaults(func=cmd_pulse)

    p = add("doctor", "check the config, GPIO, state directory, broker and webhook; "
            "say what to fix")
    p.add_argument("--dev", default="/dev", help=argparse.SUPPRESS)  # tests point it elsewhere
    p.add_argument("--json", action="store_true",
                   help="one JSON object: the findings (level, topic, message, fix)")
    p.set_defaults(func=cmd_doctor)

    manage.add_parsers(sub, common)
    forward_commands.add_parsers(sub, common)
    lockout_commands.add_parsers(sub, common)
    from gated.commands import users as user_commands

    user_commands.add_parsers(sub, common)
    _finish(parser)
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
