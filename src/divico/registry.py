"""Registry of compression methods: adding a method is one file in `divico.methods` and one `@register_method`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from divico.methods.base import CompressionMethod

_METHODS: dict[str, type["CompressionMethod"]] = {}
M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`~divico.methods.base.CompressionMethod` under ``name``."""

    def decorator(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"Method name {name!r} is already registered by {_METHODS[name].__name__}.")
        _METHODS[name] = cls  # type: ignore[assignment]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def _ensure_loaded() -> None:
    import divico.methods  # noqa: F401  (importing the package registers every method module)


def available_methods() -> list[str]:
    """Names of the registered compression methods, sorted."""
    _ensure_loaded()
    return sorted(_METHODS)


def get_method_class(name: str) -> type["CompressionMethod"]:
    _ensure_loaded()
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]
