"""Base class and registry of the paper's analyses (one subclass per file, registered with `@register_analysis`).

``divico analyze <name>`` builds one sub-parser per registered analysis from :meth:`Analysis.add_arguments` and
calls :meth:`Analysis.run`; every analysis is also a plain Python function in its own module (the class only
wires it to the command line). Each run writes its figures (PNG) and numbers (JSON) to ``out_dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

_ANALYSES: dict[str, type["Analysis"]] = {}

A = TypeVar("A", bound=type)


class Analysis:
    """One analysis of ``divico analyze``.

    Class attributes
    ----------------
    name
        Sub-command name (set by ``@register_analysis``).
    help
        One line for ``divico analyze --help``.
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Options of this analysis (``--model``/``--out`` and the common ones are added by the command)."""

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        """Run from parsed arguments; write PNG + JSON under ``out_dir``; return the JSON summary written."""
        raise TypeError(f"{type(self).__name__} must define run().")


def register_analysis(name: str) -> Callable[[A], A]:
    """Class decorator: make an :class:`Analysis` subclass available as ``divico analyze <name>``."""

    def decorator(cls: A) -> A:
        if name in _ANALYSES and _ANALYSES[name] is not cls:
            raise ValueError(f"Analysis {name!r} is already registered by {_ANALYSES[name].__name__}.")
        cls.name = name
        _ANALYSES[name] = cls
        return cls

    return decorator


def available_analyses() -> list[str]:
    """Registered analysis names, sorted."""
    return sorted(_ANALYSES)


def get_analysis(name: str) -> type[Analysis]:
    """The analysis class registered as ``name``."""
    if name not in _ANALYSES:
        raise ValueError(f"Unknown analysis {name!r}; known analyses: {', '.join(sorted(_ANALYSES)) or 'none'}.")
    return _ANALYSES[name]
