"""``gated routes put|rm|ls``: staff manage routes on the broker, or list the file's.

A route is one retained JSON message under ``<prefix>/routes/<id>``
(``--fleet``: the fleet prefix) with the fields of a ``[[routes]]`` entry but
``file``. ``put`` checks it here first, with the rules gated applies, then
waits briefly for gated's verdict on the route's error topic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from gated.book import compiler
from gated.book.config import Config
from gated.book.messages import parse_route
from gated.book.routes import RouteError
from gated.commands.brokercodes import (
    DEFAULT_WAIT,
    StaffError,
    _base,
    _client_id,
    _verdict,
    broker_action,
    list_retained,
    remove,
)
from gated.core.console import print_table, split_names


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    routes = sub.add_parser("routes", help="smart routing: list routes, manage them on the "
                            "broker", parents=[common])
    actions = routes.add_subparsers(dest="routes_command", required=True, metavar="ACTION")

    def action(name: str, helptext: str) -> argparse.ArgumentParser:
        return broker_action(actions, common, "route", name, helptext)

    p = action("put", "publish a route to the broker (new or changed) and wait for gated's "
                      "verdict")
    p.add_argument("id", help="the route's id: letters, digits, _ . -")
    p.add_argument("--name", help="named in entries and events (default: the id)")
    p.add_argument("--callers", nargs="+", required=True,
                   help="E.164 numbers, or prefixes ending in * (space or comma separated)")
    p.add_argument("--numbers", nargs="+", default=[],
                   help="called numbers it answers on (default: every number of the site); "
                        "each a gate's number or a line the config's [[routes]] name")
    p.add_argument("--destination", default="", help="where the PBX puts the call through")
    p.add_argument("--callername", default="", help="shown on the phone's display")
    p.add_argument("--schedule", action="append", default=[],
                   help='weekly window, e.g. "mon-fri 08:00-18:00" (repeatable)')
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT,
                   help="seconds to wait for gated's verdict (0: do not wait)")
    p.set_defaults(func=cmd_put)

    p = action("rm", "delete a route from the broker (an empty retained message)")
    p.add_argument("id", help="the route's id, as put published it")
    p.set_defaults(func=cmd_rm)

    p = action("ls", "list the config's routes, or with --broker the broker's")
    p.add_argument("--broker", action="store_true",
                   help="list the routes on the MQTT broker instead, with gated's verdicts")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_ls)


def _site(args: argparse.Namespace) -> tuple[compiler.Loaded, Config]:
    loaded = compiler.load(args.config, staff=True)
    if loaded.config.mqtt is None:
        raise StaffError(f"{loaded.path} has no [mqtt] table: routes over MQTT need a broker "
                         "(routes in the file: [[routes]])")
    return loaded, loaded.config


def cmd_put(args: argparse.Namespace) -> int:
    loaded, config = _site(args)
    scope, base = _base(config, args.fleet)
    fields: dict[str, Any] = {"name": args.name or args.id,
                              "callers": split_names(args.callers)}
    optional = {"numbers": split_names(args.numbers), "destination": args.destination,
                "callername": args.callername, "schedule": args.schedule}
    fields.update({k: v for k, v in optional.items() if v not in ("", [])})
    body = json.dumps(fields, ensure_ascii=False).encode()
    try:
        parse_route(scope, args.id, body, config)
    except RouteError as exc:
        print(f"not published: {exc}")
        return 2
    topic = f"{base}/routes/{args.id}"
    error_topic = f"{topic}/error" if scope == "site" else f"{topic}/error/{config.site.id}"

    async def run() -> int:
        from gated.mqtt.link import connect

        assert config.mqtt is not None
        async with connect(config.mqtt, _client_id(config), ca_file=loaded.mqtt_ca_file) as client:
            await client.subscribe(error_topic, qos=1)
            await client.publish(topic, body, qos=1, retain=True)
            print(f"published {topic}")
            if args.wait <= 0:
                return 0
            return await _verdict(client, error_topic, args.wait, config.site.id)

    return asyncio.run(run())


def cmd_rm(args: argparse.Namespace) -> int:
    return remove(args, "route")


def cmd_ls(args: argparse.Namespace) -> int:
    if args.broker or args.fleet:
        return _ls_broker(args)
    loaded = compiler.load(args.config)
    rows: list[tuple[str, ...]] = [("route", "numbers", "callers", "destination", "callername",
                                    "schedule")]
    files = iter(loaded.book.routes.files)
    if args.json:
        for route in loaded.config.routes:
            item: dict[str, Any] = {
                "scope": "file", "name": route.name, "numbers": list(route.numbers),
                "callers": len(route.callers), "destination": route.destination,
                "callername": route.callername, "schedule": list(route.schedule)}
            if route.file:
                _path, count = next(files)
                item.update(file=route.file, file_callers=count)
            print(json.dumps(item, ensure_ascii=False))
        return 0
    for route in loaded.config.routes:
        callers = f"{len(route.callers)}"
        if route.file:
            _path, count = next(files)
            callers = f"{route.file}: {count:,}" + (f" + {callers}" if route.callers else "")
        rows.append((route.name, ",".join(route.numbers) or "(every)", callers,
                     route.destination or "-", route.callername or "-",
                     "; ".join(route.schedule) or "always"))
    if len(rows) == 1:
        print("no [[routes]] in the config")
        return 0
    print_table(rows)
    return 0


def _ls_broker(args: argparse.Namespace) -> int:
    loaded, config = _site(args)
    return list_retained(args, loaded, config, "route",
                         ["scope", "id", "name", "numbers", "callers", "destination",
                          "callername"])
