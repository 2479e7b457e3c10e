"""The registries of compression methods and model adapters: the only lists of either.

A method is one file in :mod:`divico.methods` with ``@register_method("name")``; a model family is one file in
:mod:`divico.adapters` with ``@register_adapter``. Importing :mod:`divico` imports both packages, which registers
everything shipped; a user's own method or adapter registers the same way from any module. This module imports
neither package, so nothing here can form an import cycle.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

# Values are CompressionMethod / ModelAdapter subclasses; typed loosely because those modules import this one.
_METHODS: dict[str, type] = {}
_ADAPTERS: dict[str, type] = {}
M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`~divico.methods.base.CompressionMethod` under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered by another class.
    """
    if not isinstance(name, str) or not name or name == "none":
        raise ValueError(f"A method name must be a non-empty string other than 'none', got {name!r}.")

    def decorator(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"Method name {name!r} is already registered by {_METHODS[name].__name__}.")
        _METHODS[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and plug-ins that define a method temporarily)."""
    _METHODS.pop(name, None)


def available_methods() -> list[str]:
    """Names of the registered compression methods, sorted."""
    return sorted(_METHODS)


def trainable_methods() -> list[str]:
    """Names of the registered methods that ``divico train`` can train (``trainable = True``), sorted."""
    return sorted(name for name, cls in _METHODS.items() if cls.trainable)


def get_method_class(name: str) -> type:
    """The class registered under ``name``.

    Raises
    ------
    ValueError
        If no method has that name (the message lists the registered ones).
    """
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def register_adapter(cls: M) -> M:
    """Class decorator: register a :class:`~divico.adapters.base.ModelAdapter` for the class names in
    ``cls.model_classes``.

    Raises
    ------
    ValueError
        If ``model_classes`` is empty or a class name is already served by another adapter.
    """
    names = tuple(getattr(cls, "model_classes", ()))
    if not names:
        raise ValueError(f"{cls.__name__}.model_classes must name at least one transformers model class.")
    for name in names:
        if name in _ADAPTERS and _ADAPTERS[name] is not cls:
            raise ValueError(f"Model class {name!r} is already served by {_ADAPTERS[name].__name__}.")
    for name in names:
        _ADAPTERS[name] = cls
    return cls


def unregister_adapter(cls: type) -> None:
    """Remove an adapter registered with :func:`register_adapter`."""
    for name in [name for name, registered in _ADAPTERS.items() if registered is cls]:
        del _ADAPTERS[name]


def available_models() -> list[str]:
    """Class names of the supported transformers models, sorted."""
    return sorted(_ADAPTERS)


def adapter_classes() -> list[type]:
    """The registered adapter classes, each once, in order of their first model class name."""
    seen: dict[type, None] = {}
    for name in sorted(_ADAPTERS):
        seen.setdefault(_ADAPTERS[name], None)
    return list(seen)


def get_adapter(model: nn.Module) -> Any:
    """Adapter instance for ``model``.

    Raises
    ------
    TypeError
        If the model's class has no registered adapter (the message names the supported classes).
    """
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise TypeError(
            f"Unsupported model class {name}; divico supports: {', '.join(sorted(_ADAPTERS))}. "
            "Pass the top-level *ForConditionalGeneration model (a peft PeftModel wrapping one also works)."
        )
    return _ADAPTERS[name](model)
