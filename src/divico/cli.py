"""`divico` command line: one sub-command per module in :mod:`divico.commands`, plus registered plug-ins.

Each command module defines ``register(subparsers) -> None`` which adds its parser and sets
``func=callable(args) -> int``. Built-in commands are discovered in :mod:`divico.commands`; other distributions
(e.g. ``divico-testbed``: ``demo``, ``build-default``, ``make-data``, ``retrain-default``) add commands through
the ``divico.commands`` entry-point group, each entry naming such a module. Adding a command never edits this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from importlib.metadata import entry_points
from types import ModuleType

from divico import commands

COMMAND_ENTRY_POINT_GROUP = "divico.commands"


def command_modules() -> list[ModuleType]:
    """The built-in command modules, then those registered by installed plug-ins (sorted by entry-point name)."""
    modules = [
        importlib.import_module(f"{commands.__name__}.{info.name}")
        for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name)
    ]
    for entry in sorted(entry_points(group=COMMAND_ENTRY_POINT_GROUP), key=lambda e: e.name):
        module = entry.load()
        if not callable(getattr(module, "register", None)):
            raise TypeError(
                f"Entry point {entry.name!r} = {entry.value!r} in group {COMMAND_ENTRY_POINT_GROUP!r} must name a "
                "module with a register(subparsers) function."
            )
        modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="divico",
        description="Visual-token compression for vision-language models (DiViCo, FastV, DeCo).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
