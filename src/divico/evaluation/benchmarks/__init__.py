"""The shipped benchmarks, one module each: importing this package imports (and so registers) every module in it.

Modules are discovered, so adding a benchmark is one new file here with ``@register_benchmark("name")``.
"""

from __future__ import annotations

import importlib
import pkgutil

MODULES: tuple[str, ...] = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__)))

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
