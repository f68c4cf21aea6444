"""``gated forward ls`` and ``gated forward retry NAME``: the outbox, seen from outside."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

from gated.book import compiler
from gated.core.console import print_table


def cmd_ls(args: argparse.Namespace) -> int:
    from gated.forward import outbox

    loaded = compiler.load(args.config)
    tz = loaded.config.tz
    names = [f.name for f in loaded.config.forward]
    conn = outbox.open_store(loaded.store_path, readonly=True)
    try:
        found = outbox.summaries(conn, names)
    finally:
        conn.close()
    if args.json:
        for s in found:
            oldest = (None if s.oldest_pending is None else
                      dt.datetime.fromtimestamp(s.oldest_pending, tz).isoformat())
            print(json.dumps({
                "endpoint": s.endpoint, "in_config": s.endpoint in names,
                "delivered": s.delivered, "pending": s.pending, "oldest_pending": oldest,
                "rejected": [{"status": status, "why": why, "count": count}
                             for status, why, count in s.rejected],
                "expired": s.expired}, ensure_ascii=False))
        return 0
    if not found:
        print("no [[forward]] endpoints")
        return 0
    now = time.time()
    rows: list[tuple[str, ...]] = [
        ("endpoint", "delivered", "pending", "oldest pending", "rejected", "expired")]
    for s in found:
        oldest = "-"
        if s.oldest_pending is not None:
            when = dt.datetime.fromtimestamp(s.oldest_pending, tz).strftime("%Y-%m-%d %H:%M:%S")
            oldest = f"{when} ({_age(now - s.oldest_pending)} ago)"
        name = s.endpoint if s.endpoint in names else f"{s.endpoint} (not in the config)"
        rows.append((name, str(s.delivered), str(s.pending), oldest,
                     str(sum(count for _, _, count in s.rejected)), str(s.expired)))
    print_table(rows)
    for s in found:
        for status, why, count in s.rejected:
            print(f"rejected  {s.endpoint}: {count} x {why or status}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from gated.forward import outbox

    loaded = compiler.load(args.config)
    names = [f.name for f in loaded.config.forward]
    if args.name not in names:
        print(f"no [[forward]] called {args.name!r}; endpoints: {', '.join(names) or 'none'}")
        return 2
    conn = outbox.open_store(loaded.store_path, readonly=False)
    try:
        count = outbox.retry(conn, args.name)
    finally:
        conn.close()
    print(f"{args.name}: {count} rejected forward(s) queued again"
          + (" (the daemon sends them within seconds)" if count else ""))
    return 0


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    forward = sub.add_parser("forward", help="forwarded entries: queues and refusals",
                             parents=[common])
    forward_sub = forward.add_subparsers(dest="forward_command", required=True,
                                         metavar="ACTION")
    p = forward_sub.add_parser("ls", parents=[common], help="per endpoint: delivered, pending, "
                               "oldest pending, rejected and why")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_ls)
    p = forward_sub.add_parser("retry", parents=[common],
                               help="queue an endpoint's rejected forwards again")
    p.add_argument("name", help="the [[forward]] name")
    p.set_defaults(func=cmd_retry)
