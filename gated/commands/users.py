"""``gated users add|ls|rm|passwd``: the staff page's users, in the state directory.

A password is asked twice on a terminal, or read as one line from stdin with
``--password-stdin``; it is never an argument (a process list shows those).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys
from pathlib import Path
from typing import cast

from gated.book import compiler
from gated.core.console import print_table
from gated.web import users as users_mod
from gated.web.users import ROLES, Role, User, UserError


def _state_dir(args: argparse.Namespace) -> Path:
    loaded = compiler.load(args.config)
    return loaded.store_path.parent


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the two passwords differ; nothing changed")
    return users_mod.check_password(password)


def cmd_add(args: argparse.Namespace) -> int:
    path = users_mod.users_path(_state_dir(args))
    name = users_mod.check_name(args.name)
    if name in users_mod.load(path):  # said before the password is asked for
        raise UserError(f"user {name!r} exists; use `gated users passwd {name}`")
    made = users_mod.make(name, cast(Role, args.role), _password(args))

    def add(users: dict[str, User]) -> None:
        # Read again under the lock: the password took its time, and the page
        # (or another command) may have changed the file meanwhile.
        if name in users:
            raise UserError(f"user {name!r} exists; use `gated users passwd {name}`")
        users[name] = made

    users_mod.update(path, add)
    print(f"user {name} added ({args.role})", file=sys.stderr)
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    path = users_mod.users_path(_state_dir(args))
    if args.name not in users_mod.load(path):
        raise UserError(f"no user {args.name!r}")
    # Its hash and stamp; the role is taken as it is when the file is written.
    made = users_mod.make(args.name, args.role or "viewer", _password(args))

    def passwd(users: dict[str, User]) -> None:
        user = users.get(args.name)
        if user is None:
            raise UserError(f"no user {args.name!r}")
        # The role as it is now, unless a new one was asked for.
        users[user.name] = User(user.name, args.role or user.role, made.hash, made.changed)

    users_mod.update(path, passwd)
    print(f"password of {args.name} changed; their sessions have ended", file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    path = users_mod.users_path(_state_dir(args))

    def remove(users: dict[str, User]) -> None:
        if users.pop(args.name, None) is None:
            raise UserError(f"no user {args.name!r}")

    users_mod.update(path, remove)
    print(f"user {args.name} removed; their sessions have ended", file=sys.stderr)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    users = users_mod.load(users_mod.users_path(_state_dir(args)))
    if not users:
        print("no users yet: gated users add NAME --role admin", file=sys.stderr)
        return 0
    print_table([["name", "role", "password set"], *(
        [u.name, u.role, dt.datetime.fromtimestamp(u.changed).strftime("%Y-%m-%d %H:%M")]
        for u in sorted(users.values(), key=lambda u: u.name))])
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    users = sub.add_parser("users", help="the staff page's users", parents=[common])
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    p = users_sub.add_parser("add", parents=[common], help="add a user of the staff page")
    p.add_argument("name", help="the name they log in with")
    p.add_argument("--role", required=True, choices=ROLES,
                   help="viewer: the log and gate state; staff: also visitor codes and "
                        "opening gates; admin: also users and codes")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_add)
    p = users_sub.add_parser("passwd", parents=[common],
                             help="set a user's password (ends their sessions)")
    p.add_argument("name", help="the user's name")
    p.add_argument("--role", choices=ROLES, help="also change the role")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_passwd)
    p = users_sub.add_parser("rm", parents=[common], help="remove a user (ends their sessions)")
    p.add_argument("name", help="the user's name")
    p.set_defaults(func=cmd_rm)
    p = users_sub.add_parser("ls", parents=[common], help="list users and their roles")
    p.set_defaults(func=cmd_ls)
