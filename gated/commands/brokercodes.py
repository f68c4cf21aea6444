"""``gated codes put|rm|ls --broker``: staff manage codes on the broker with the daemon's config.

A code is one retained JSON message under ``<prefix>/codes/<id>`` (``--fleet``:
the fleet prefix). ``put`` checks it here first, with the same rules gated
applies, then waits briefly for gated's verdict on the code's error topic.
Digits are printed only when gated made them up (``put`` without ``--code``)
or when asked (``ls --show-codes``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import secrets
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gated.book import compiler, signing, sitekey
from gated.book.config import Config, fleet_key_path
from gated.book.messages import ID_RE, NotHere, Rejected, Scope, parse
from gated.commands import sets as setstaff
from gated.core.console import Progress, counted, parse_time, print_table, split_names
from gated.core.errors import GatedError

if TYPE_CHECKING:
    import aiomqtt

DEFAULT_WAIT = 5.0
# A set of 100,000 codes takes a site a few seconds to check, write and map.
IMPORT_WAIT = 60.0


class StaffError(GatedError):
    """A staff command could not do what was asked; the message says why."""


def broker_action(actions: Any, common: argparse.ArgumentParser, what: str, name: str,
                  helptext: str) -> argparse.ArgumentParser:
    """One action on the broker's ``what`` (a code, a route): site's or, with
    ``--fleet``, every site's."""
    p: argparse.ArgumentParser = actions.add_parser(name, help=helptext, description=helptext,
                                                    parents=[common])
    p.add_argument("--fleet", action="store_true",
                   help=f"under [mqtt] fleet_prefix: a {what} for every site")
    return p


def add_actions(actions: Any, common: argparse.ArgumentParser) -> None:
    """Register ``codes put|rm`` (the broker's codes) beside the local actions."""

    def action(name: str, helptext: str) -> argparse.ArgumentParser:
        return broker_action(actions, common, "code", name, helptext)

    p = action("put", "publish a code to the broker (new or changed) and wait for gated's "
                      "verdict")
    p.add_argument("id", help="the code's id: letters, digits, _ . -")
    p.add_argument("--code", help="the digits (default: make up --digits random ones)")
    p.add_argument("--digits", type=int, default=6, help="length of a made-up code")
    p.add_argument("--gates", nargs="+", default=[],
                   help="gates it opens (space or comma separated; * for all); none "
                        "for a route-only code with --callername/--destination")
    p.add_argument("--name", help="who or what it is for (default: the id)")
    p.add_argument("--valid-from", help="ISO time, e.g. 2026-12-01T07:00 (site time)")
    p.add_argument("--valid-until", help="ISO time, e.g. 2026-12-24T18:00 (site time)")
    p.add_argument("--schedule", action="append", default=[],
                   help='weekly window, e.g. "mon-fri 07:00-18:00" (repeatable)')
    p.add_argument("--max-uses", type=int, help="how many entries (default unlimited)")
    p.add_argument("--callers", nargs="+", default=[], help="only from these numbers")
    p.add_argument("--callername", default="", help="shown to the PBX on success")
    p.add_argument("--destination", default="", help="where the PBX routes the call")
    p.add_argument("--plain", action="store_true",
                   help="publish the digits when this machine has no site key")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT,
                   help="seconds to wait for gated's verdict (0: do not wait)")
    p.set_defaults(func=cmd_put)

    p = action("rm", "delete a code from the broker (an empty retained message)")
    p.add_argument("id", help="the code's id, as put published it")
    p.set_defaults(func=cmd_rm)

    p = action("import", "publish the codes of a CSV file as a signed code set: laid over "
                         "the site's set (with --replace: the file is the whole set), or with "
                         "--fleet as the fleet's whole set; then wait for gated's word")
    p.add_argument("file", help="CSV with the header name,code,gates,... (docs/import.md)")
    p.add_argument("--replace", action="store_true",
                   help="the file is the site's whole set: codes of the set it does not "
                        "name are withdrawn")
    p.add_argument("--wait", type=float, default=IMPORT_WAIT,
                   help="seconds to wait for the site to say it applied the set (0: do "
                        "not wait)")
    p.set_defaults(func=cmd_import)

    p = actions.add_parser("fleet-key", parents=[common],
                           help="show the fleet's keys, or make them",
                           description="show the fleet key's fingerprint and the signing "
                                       "keys (compare them across sites), or make the fleet's "
                                       "keys with --new")
    p.add_argument("--new", action="store_true",
                   help="make the fleet key and the staff's signing key where missing; copy "
                        "fleet.key and fleet-signing.pub to every site (mode 0600), and keep "
                        "fleet-signing.key on staff machines only")
    p.set_defaults(func=cmd_fleet_key)


def _site(args: argparse.Namespace) -> tuple[compiler.Loaded, Config]:
    loaded = compiler.load(args.config, staff=True)
    if loaded.config.mqtt is None:
        raise StaffError(f"{loaded.path} has no [mqtt] table: codes live on the broker")
    return loaded, loaded.config


def _base(config: Config, fleet: bool) -> tuple[Scope, str]:
    if not fleet:
        return "site", config.mqtt_prefix
    assert config.mqtt is not None
    if config.mqtt.fleet_prefix is None:
        raise StaffError("--fleet needs [mqtt] fleet_prefix in the config")
    return "fleet", config.mqtt.fleet_prefix


def _client_id(config: Config) -> str:
    return f"gated-cli-{config.site.id}-{secrets.token_hex(4)}"



def _time(text: str | None, option: str) -> str | None:
    """Checked, and kept as typed: site-local unless it has an offset, as in the config."""
    if text is None:
        return None
    parse_time(text, dt.UTC, option)  # only checks: the zone is the daemon's to apply
    return dt.datetime.fromisoformat(text).isoformat()


def build_body(args: argparse.Namespace, code: str) -> dict[str, Any]:
    gates = split_names(args.gates)
    body: dict[str, Any] = {"name": args.name or args.id, "code": code, "gates": gates}
    optional = {
        "valid_from": _time(args.valid_from, "--valid-from"),
        "valid_until": _time(args.valid_until, "--valid-until"),
        "schedule": args.schedule, "max_uses": args.max_uses, "callers": args.callers,
        "callername": args.callername, "destination": args.destination,
    }
    body.update({k: v for k, v in optional.items() if v not in (None, "", [])})
    return body


def cmd_put(args: argparse.Namespace) -> int:
    loaded, config = _site(args)
    scope, _base_topic = _base(config, args.fleet)
    made_up = args.code is None
    if made_up and not 4 <= args.digits <= 16:
        raise StaffError("--digits: a code is 4 to 16 digits")
    code = args.code or "".join(secrets.choice("0123456789") for _ in range(args.digits))
    return publish(loaded, scope, args.id, build_body(args, code), code,
                   show_code=made_up, wait=args.wait, plain=args.plain)


def publish(loaded: compiler.Loaded, scope: Scope, code_id: str, fields: dict[str, Any],
            code: str, *, show_code: bool, wait: float, plain: bool = False) -> int:
    """Check a code here, publish it retained, and wait for gated's verdict.

    A site code goes out as a keyed hash when this machine holds the site key:
    the broker, its backups and everyone subscribed never see the digits. A
    fleet code goes out as a hash under the fleet key, as a delta on the
    fleet's set (``gated.commands.sets``).
    """
    config = loaded.config
    _scope, base = _base(config, scope == "fleet")
    body = json.dumps(fields, ensure_ascii=False).encode()
    try:
        parse(scope, code_id, body, config)
    except Rejected as exc:
        if config.gates or "gate" not in str(exc):
            print(f"not published: {exc}")
            return 2
        # A staff machine's file names no gates: the site's gated checks them
        # and its verdict (below) says so.
    except NotHere:
        if config.gates:
            print(f"note: no gate of that name at site {config.site.id}; "
                  "other sites may have one")
    if scope == "fleet":
        return _publish_fleet(loaded, code_id, setstaff.hashed_body(
            fields, code, setstaff.fleet_key(loaded)), code if show_code else None, wait)
    book = loaded.book
    hashed_here = scope == "site" and book.site_key  # the book's key is the site key
    if scope == "site" and not hashed_here and not plain:
        raise StaffError(f"no site key at {loaded.key_path}, so the digits would go to the "
                         "broker in clear; run this where gated runs, or add --plain")
    if hashed_here:
        hashed = {k: v for k, v in fields.items() if k != "code"}
        hashed["code_hash"] = sitekey.code_hash(book.key, code)
        body = json.dumps(hashed, ensure_ascii=False).encode()
    topic = f"{base}/codes/{code_id}"
    error_topic = (f"{topic}/error" if scope == "site"
                   else f"{topic}/error/{config.site.id}")

    async def run() -> int:
        from gated.mqtt.link import connect

        assert config.mqtt is not None
        async with connect(config.mqtt, _client_id(config), ca_file=loaded.mqtt_ca_file) as client:
            await client.subscribe(error_topic, qos=1)
            await client.publish(topic, body, qos=1, retain=True)
            print(f"published {topic}" + (" (as a keyed hash)" if hashed_here else ""))
            if show_code:
                print(f"code: {code}")
            if wait <= 0:
                return 0
            return await _verdict(client, error_topic, wait, config.site.id)

    return asyncio.run(run())


async def _verdict(client: aiomqtt.Client, error_topic: str, wait: float, site: str) -> int:
    try:
        async with asyncio.timeout(wait):
            async for message in client.messages:
                if message.retain:
                    continue  # a refusal of some earlier version
                payload = bytes(message.payload)
                if not payload:
                    print(f"applied by gated at site {site}")
                    return 0
                print(f"refused by gated at site {site}: {_reason(payload)}")
                return 1
    except TimeoutError:
        pass
    print(f"no word from gated at site {site} within {wait:g}s; the code is retained "
          "on the broker and applied when gated connects")
    return 0


def _publish_fleet(loaded: compiler.Loaded, code_id: str, body: bytes | None,
                   shown: str | None, wait: float) -> int:
    """A fleet code put (``body``) or deleted (None): a delta on the fleet's set.

    No site answers an applied fleet code (a word from every site on every
    change is a storm); refusals are retained on ``…/error/<site>``, so this
    waits ``wait`` seconds for them and says which sites refused.
    """
    config = loaded.config
    _scope, base = _base(config, True)
    keys = setstaff.fleet_keys(loaded)
    topic = f"{base}/codes/{code_id}"

    async def run() -> int:
        from gated.mqtt.link import connect

        assert config.mqtt is not None
        client_id = _client_id(config)
        async with connect(config.mqtt, client_id, ca_file=loaded.mqtt_ca_file) as client:
            await client.subscribe(f"{topic}/error/+", qos=1)
            manifest = await setstaff.change(
                client, keys, f"{config.mqtt_prefix}/sync/{client_id}", code_id, body)
            verb = "published" if body is not None else "deleted"
            print(f"{verb} {topic} in the fleet's set (serial {manifest.serial}, "
                  f"{counted(manifest.codes, 'code')} in the set, "
                  f"{counted(len(manifest.deltas), 'delta')}; "
                  "digits as the fleet key's hash)")
            if shown is not None:
                print(f"code: {shown}")
            if body is None or wait <= 0:
                return 0
            refused = await _refusals(client, f"{topic}/error/", wait)
        for site, reason in sorted(refused.items()):
            print(f"refused by gated at site {site}: {reason}")
        if not refused:
            print(f"no site refused it within {wait:g}s (sites say nothing when they apply "
                  "a fleet code)")
        return 1 if refused else 0

    return asyncio.run(run())


def _reason(payload: bytes) -> str:
    """What a refusal on an error topic says."""
    try:
        return str(json.loads(payload)["error"])
    except (ValueError, TypeError, KeyError):
        return payload.decode(errors="replace")


async def _refusals(client: aiomqtt.Client, prefix: str, wait: float) -> dict[str, str]:
    refused: dict[str, str] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            async for message in client.messages:
                topic = message.topic.value
                if message.retain or not message.payload or not topic.startswith(prefix):
                    continue
                refused[topic.removeprefix(prefix)] = _reason(bytes(message.payload))
    return refused


def cmd_import(args: argparse.Namespace) -> int:
    from gated.book import csvcodes

    loaded, config = _site(args)
    scope, _base_topic = _base(config, args.fleet)
    if args.replace and scope == "fleet":
        raise StaffError("--replace is for a site's set: a fleet import always replaces")
    # 100,000 codes take seconds to check and as many to hash: say how far it got.
    checking = Progress(f"checking {args.file}, line")
    try:
        rows = csvcodes.read(Path(args.file), config, scope=scope, progress=checking)
    finally:
        checking.done()
    keys = setstaff.fleet_keys(loaded) if scope == "fleet" else setstaff.site_keys(loaded)
    hashing = Progress("hashing codes", len(rows))
    entries = []
    for done, row in enumerate(rows):
        if not done % 1000:
            hashing(done)
        entries.append(setstaff.entry_of(row.id, setstaff.hashed_body(
            row.fields, row.fields["code"], keys.hmac), keys.hmac))
    hashing.done()
    state_topic = f"{config.mqtt_prefix}/{'fleet' if scope == 'fleet' else 'codeset'}"

    async def run() -> int:
        from gated.mqtt.link import connect

        assert config.mqtt is not None
        client_id = _client_id(config)
        marker = f"{config.mqtt_prefix}/sync/{client_id}"
        async with connect(config.mqtt, client_id, ca_file=loaded.mqtt_ca_file) as client:
            await client.subscribe(state_topic, qos=1)
            if scope == "fleet" or args.replace:
                manifest, replaced = await setstaff.replace_all(client, keys, marker, entries)
                if replaced is not None:
                    print(f"note: replaced what was on the broker: {replaced}")
            else:
                manifest = await setstaff.merge(client, keys, marker, entries)
            what = "the fleet's set" if scope == "fleet" else f"site {config.site.id}'s set"
            print(f"published {counted(len(entries), 'code')} from {args.file} into {what} "
                  f"(serial {manifest.serial}: {counted(manifest.codes, 'code')}, "
                  f"{manifest.size:,} bytes in {counted(manifest.chunks, 'chunk')}; digits as "
                  f"the {'fleet' if scope == 'fleet' else 'site'} key's hash)")
            if args.wait <= 0:
                return 0
            return await _applied(client, state_topic, manifest.serial, args.wait,
                                  config.site.id)

    return asyncio.run(run())


async def _applied(client: aiomqtt.Client, topic: str, serial: int, wait: float,
                   site: str) -> int:
    """Wait for the site's word that it holds the set of ``serial``, and say it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            async for message in client.messages:
                if message.topic.value != topic or not message.payload:
                    continue
                try:
                    state = json.loads(message.payload)
                except ValueError:
                    continue
                if not isinstance(state, dict) or state.get("serial") != serial:
                    continue
                print(f"applied by gated at site {site}: {state.get('codes')} codes in force "
                      f"from its sets ({'complete' if state.get('complete') else 'INCOMPLETE'})")
                return 0 if state.get("complete") else 1
    print(f"no word from gated at site {site} within {wait:g}s; the set is retained on the "
          "broker and applied when gated connects (`gated codes ls --broker` says if it is "
          "whole)")
    return 0


def cmd_fleet_key(args: argparse.Namespace) -> int:
    loaded = compiler.load(args.config, staff=True)
    said, whole = setstaff.describe_key(loaded, loaded.config, args.new)
    print(said)
    return 0 if whole else 1


def cmd_rm(args: argparse.Namespace) -> int:
    if args.fleet:
        if not ID_RE.fullmatch(args.id):
            raise StaffError(f"no code {args.id!r}: a code id is 1 to 64 letters, digits, "
                             "'_', '.' or '-'")
        loaded, _config = _site(args)
        return _publish_fleet(loaded, args.id, None, None, 0)
    return remove(args, "code")


def remove(args: argparse.Namespace, noun: str) -> int:
    """Delete the retained ``<noun>s/<id>`` (a code or a route) from the broker."""
    if not ID_RE.fullmatch(args.id):
        # '+' or '#' would reach the broker as a wildcard, which no one can publish to.
        raise StaffError(f"no {noun} {args.id!r}: a {noun} id is 1 to 64 letters, digits, "
                         "'_', '.' or '-'")
    loaded, config = _site(args)
    _scope, base = _base(config, args.fleet)
    topic = f"{base}/{noun}s/{args.id}"

    async def run() -> int:
        from gated.mqtt.link import connect, read_retained

        assert config.mqtt is not None
        client_id = _client_id(config)
        async with connect(config.mqtt, client_id, ca_file=loaded.mqtt_ca_file) as client:
            found, complete = await read_retained(
                client, [topic], marker_topic=f"{config.mqtt_prefix}/sync/{client_id}")
            await client.publish(topic, b"", qos=1, retain=True)
        if complete and not found:
            print(f"{topic} was not on the broker; nothing to delete")
            return 1
        print(f"deleted {topic}")
        return 0

    return asyncio.run(run())


def cmd_ls(args: argparse.Namespace) -> int:
    loaded, config = _site(args)
    header = ["scope", "id", "name", "gates", "valid_until", "max_uses", "schedule"]
    if args.show_codes:
        header.insert(2, "code")
    # The hash is long and no use to a reader; digits only when asked for.
    hide = {"code_hash"} if args.show_codes else {"code_hash", "code"}
    return list_retained(args, loaded, config, "code", header, hide)


def list_retained(args: argparse.Namespace, loaded: compiler.Loaded, config: Config,
                  noun: str, header: list[str], hide: Collection[str] = ()) -> int:
    """List the retained ``<noun>s/<id>`` of this site (and the fleet) and their refusals."""
    assert config.mqtt is not None
    bases: list[tuple[Scope, str]] = [("site", config.mqtt_prefix)]
    if config.mqtt.fleet_prefix is not None:
        bases.append(("fleet", config.mqtt.fleet_prefix))
    if args.fleet:
        bases = [_base(config, True)]

    async def run() -> tuple[list[Any], bool]:
        from gated.mqtt.link import connect, read_retained

        assert config.mqtt is not None
        client_id = _client_id(config)
        filters = [f"{base}/{noun}s/{suffix}" for _, base in bases
                   for suffix in ("+", "+/error", f"+/error/{config.site.id}")]
        if noun == "code":
            filters += [f"{base}/{tail}" for _, base in bases for tail in ("set", "set/+")]
        async with connect(config.mqtt, client_id, ca_file=loaded.mqtt_ca_file) as client:
            return await read_retained(client, filters,
                                       marker_topic=f"{config.mqtt_prefix}/sync/{client_id}")

    found, complete = asyncio.run(run())
    rows = _rows(found, bases, noun, hide)
    said = []
    for scope, base in bases if noun == "code" else []:
        if not any(m.topic == f"{base}/set" for m in found):
            continue
        # A set's codes as its signed manifest says, not one message each.
        trust = (signing.Trust(signing.public_path(fleet_key_path(loaded.source, config)))
                 if scope == "fleet" else signing.Trust(signing.public_path(loaded.key_path)))
        broker = setstaff.from_messages(found, base, trust)
        set_rows, whole, line = setstaff.rows(broker, config.tz, scope)
        for row in set_rows:
            for hidden in hide:
                row.pop(hidden, None)
        own = {r["id"]: r for r in rows if r["scope"] == scope}
        refused = {r["id"]: r["refused"] for r in own.values() if "refused" in r}
        for row in set_rows:
            if row["id"] in refused:
                row["refused"] = refused[row["id"]]
        if scope == "fleet":
            rows = [r for r in rows if r["scope"] != scope] + set_rows
        else:
            # A site code published on its own takes the place of the set's copy.
            rows = rows + [r for r in set_rows if r["id"] not in own]
        said.append(line)
        complete = complete and whole
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    elif not rows:
        print(f"no {noun}s on the broker")
    else:
        _print_table(rows, header)
    for line in said:
        print(line)
    if not complete:
        print("(the list is incomplete: what is shown is not all the broker should hold)")
        return 1
    return 0


def _rows(found: list[Any], bases: list[tuple[Scope, str]], noun: str,
          hide: Collection[str]) -> list[dict[str, Any]]:
    items: dict[tuple[str, str], dict[str, Any]] = {}
    errors: dict[tuple[str, str], str] = {}
    for message in found:
        for scope, base in bases:
            rest = message.topic.removeprefix(f"{base}/{noun}s/")
            if rest == message.topic:
                continue
            item_id, _, tail = rest.partition("/")
            if not tail:
                try:
                    fields = json.loads(message.payload)
                except ValueError:
                    fields = {"unreadable": True}
                if not isinstance(fields, dict):
                    fields = {"unreadable": True}
                for hidden in hide:
                    fields.pop(hidden, None)
                items[(scope, item_id)] = {"scope": scope, "id": item_id, **fields}
            elif message.payload:
                try:
                    errors[(scope, item_id)] = json.loads(message.payload).get("error", "")
                except (ValueError, AttributeError):
                    errors[(scope, item_id)] = message.payload.decode(errors="replace")
    for where, error in errors.items():
        if where in items:
            items[where]["refused"] = error
    return [items[where] for where in sorted(items)]


def _print_table(rows: list[dict[str, Any]], header: list[str]) -> None:
    lines = [header]
    for row in rows:
        cells = []
        for key in header:
            value = row.get(key, "")
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            cells.append("-" if value in ("", None) else str(value))
        lines.append(cells)
    print_table(lines)
    for row in rows:
        if "refused" in row:
            print(f"! {row['scope']} {row['id']}: gated refused the latest version: "
                  f"{row['refused']}")

