"""Help text for every command and option, examples on each main command, no markup."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from gated.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every parser under ``parser``: (its words, it, the help its parent lists it with)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from _parsers(sub, (*path, name))


def test_every_command_and_option_has_help_and_no_markup() -> None:
    """Each command and action is listed with a help line and describes itself; each option
    it shows has help; no --help prints reStructuredText markup such as ``gated``."""
    root = build_parser()
    assert "``" not in root.format_help()
    for path, parser, listed in _parsers(root):
        assert listed and parser.description, path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, (path, action.option_strings or action.dest)
        text = parser.format_help()
        assert "``" not in text, path


def test_each_main_command_shows_examples() -> None:
    """`gated --help` and every main command's --help end with examples."""
    root = build_parser()
    assert "examples:\n  gated " in root.format_help()
    for path, parser, _ in _parsers(root):
        if len(path) == 1:
            assert "examples:\n  " in parser.format_help(), path
