"""`divico analyze <analysis>`: the paper's analyses (attention maps, kept tokens, disentanglement, ...) as PNG + JSON.

One sub-command per registered analysis (:func:`divico.analysis.available_analyses`); each gets the common options
(``--model``, ``--merge``, ``--dtype``, ``--device``, ``--out``, ``--no-progress``) and its own. Adding an analysis
never edits this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from divico.analysis import available_analyses, get_analysis
from divico.analysis.common import add_common_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="the paper's analyses (Fig. 1 attention, Fig. 6 kept tokens, Fig. 7 disentanglement, ...): PNG + JSON",
        description=(
            "Run one analysis on a model and write its figures (PNG) and numbers (JSON) to --out. Example: divico "
            "analyze attention --model default --merge testbed/src/divico_testbed/assets/default/stage2 --data "
            "records.jsonl --out runs/attention"
        ),
    )
    analyses = parser.add_subparsers(dest="analysis", metavar="ANALYSIS")
    for name in available_analyses():
        analysis = get_analysis(name)
        sub = analyses.add_parser(name, help=analysis.help, description=analysis.help)
        add_common_arguments(sub)
        analysis.add_arguments(sub)
        sub.set_defaults(func=run)
    parser.set_defaults(func=_missing_analysis(parser))


def _missing_analysis(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``divico analyze`` without an analysis name: the help, exit status 2."""

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show_help


def run(args: argparse.Namespace) -> int:
    analysis = get_analysis(args.analysis)()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = analysis.run(args, args.out)
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"divico analyze {args.analysis}: {error}", file=sys.stderr)
        return 2
    figures = summary.get("figures", {}) if isinstance(summary, dict) else {}
    for name, path in figures.items():
        if path:
            print(f"{name}: {path}")
    headline = summary.get("headline") if isinstance(summary, dict) else None
    if headline:
        print(json.dumps(headline, indent=2))
    print(f"numbers: {args.out}")
    return 0
