"""Throughput benchmarks of the ldm platform, one subcommand each.

A subcommand is a module of this package with `add_arguments(parser)` and `run(args)`, listed in COMMANDS;
its docstring is its `--help` (the first line, its line in the list of commands). A command that sets an
`ldm_options` default takes the options the tool does not know: they go to the `ldm` CLI after its `--config`s.
"""

from __future__ import annotations

import argparse
from typing import Protocol

from . import compare, data, resume, sample, train


class Command(Protocol):
    """A benchmark subcommand: its options, and a run on the parsed ones that prints a table and a JSON line."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> None: ...


COMMANDS: dict[str, Command] = {"data": data, "resume": resume, "train": train, "sample": sample, "compare": compare}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        doc = command.__doc__ or name
        command.add_arguments(commands.add_parser(name, help=doc.splitlines()[0], description=doc,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    args, unknown = parser.parse_known_args(argv)
    if unknown and not hasattr(args, "ldm_options"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.ldm_options = unknown
    COMMANDS[args.command].run(args)
