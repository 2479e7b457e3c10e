"""`divico` command line: one sub-command per module in :mod:`divico.commands`.

Each module there defines ``register(subparsers) -> None`` which adds its parser and sets
``func=callable(args) -> int``; commands are discovered, so adding one never edits this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from divico import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="divico",
        description="Visual-token compression for vision-language models (DiViCo, FastV, DeCo).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
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
