"""The paper's analyses (Figs. 1, 5-8, Table II) as functions and as ``divico analyze`` sub-commands.

Every module of this package is imported here, which registers its :class:`~divico.analysis.base.Analysis`;
adding an analysis never edits this file.
"""

from __future__ import annotations

import importlib
import pkgutil

from divico.analysis.base import Analysis, available_analyses, get_analysis, register_analysis

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Analysis", "available_analyses", "get_analysis", "register_analysis"]
