"""Public entry points: apply / remove compression and read the last report (peft-style `apply` on a stock model)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from divico.config import CompressionConfig
from divico.registry import available_methods, get_adapter, get_method_class
from divico.report import CompressionReport
from divico.runtime import CompressionRuntime

_RUNTIME_ATTR = "_divico_runtime"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_runtime(model: nn.Module) -> CompressionRuntime | None:
    """The runtime attached by :func:`apply_compression`, or None."""
    return getattr(unwrap_model(model), _RUNTIME_ATTR, None)


def require_runtime(model: nn.Module) -> CompressionRuntime:
    """The runtime attached by :func:`apply_compression`; a clear error if the model is not compressed."""
    runtime = get_runtime(model)
    if runtime is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no divico compression; call apply_compression.")
    return runtime


def apply_compression(model: nn.Module, config: CompressionConfig) -> nn.Module:
    """Make a stock transformers LVLM compress its visual tokens (in place).

    Parameters
    ----------
    model
        e.g. ``LlavaForConditionalGeneration`` (or a peft model wrapping one), any attention implementation.
    config
        What to compress, how much and at which layer.

    Returns
    -------
    nn.Module
        ``model`` itself: ``model.generate(**inputs)`` and ``model(**inputs)`` work as before, at any batch size.

    Raises
    ------
    TypeError
        Unsupported model class (the message lists the supported ones) or a config of the wrong type.
        Also a method that needs a capability the model's adapter lacks (e.g. VisionZip on a model whose vision
        tower's attention the adapter does not expose); the message lists the methods that work for it.
    ValueError
        ``config.layer`` outside [1, num_layers - 1], or the model is already compressed.
    """
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a divico.CompressionConfig, got {type(config).__name__}.")
    base = unwrap_model(model)
    adapter = get_adapter(base)
    if get_runtime(base) is not None:
        raise ValueError("This model is already compressed; call divico.remove_compression(model) first.")
    method = get_method_class(config.method)(config)
    missing = method.required_capabilities - adapter.capabilities
    if missing:
        usable = [name for name in available_methods()
                  if get_method_class(name).required_capabilities <= adapter.capabilities]
        raise TypeError(
            f"Method {config.method!r} needs {', '.join(sorted(missing))} from the model adapter, which "
            f"{type(adapter).__name__} ({type(base).__name__}) does not provide; methods for this model: "
            f"{', '.join(usable)}."
        )
    num_layers = adapter.num_layers()
    if method.level == "layer" and not (1 <= config.layer <= num_layers - 1):
        raise ValueError(
            f"layer={config.layer} is out of range for a model with {num_layers} decoder layers; "
            f"valid range is [1, {num_layers - 1}]."
        )
    runtime = CompressionRuntime(base, config, adapter, method)
    runtime.attach()
    setattr(base, _RUNTIME_ATTR, runtime)
    return model


def remove_compression(model: nn.Module) -> nn.Module:
    """Remove every hook and the compressor module: the model behaves exactly as before :func:`apply_compression`."""
    base = unwrap_model(model)
    runtime = getattr(base, _RUNTIME_ATTR, None)
    if runtime is not None:
        runtime.detach()
        delattr(base, _RUNTIME_ATTR)
    return model


def last_report(model: nn.Module) -> CompressionReport:
    """What the last compressed prefill did (kept positions, scores, sequence lengths, KL).

    Raises
    ------
    ValueError
        If the model is not compressed or has not run a prefill with visual tokens yet.
    """
    runtime = require_runtime(model)
    if runtime.report is None:
        raise ValueError("No prefill with visual tokens has run since apply_compression.")
    return runtime.report


def compression_config(model: nn.Module) -> CompressionConfig:
    """The config the model is compressed with."""
    return require_runtime(model).config


@contextmanager
def compressed(model: nn.Module, config: CompressionConfig) -> Iterator[nn.Module]:
    """Compress ``model`` for the duration of a ``with`` block; the model is restored on exit, also after an exception.

    >>> with divico.compressed(model, divico.CompressionConfig("fastv", keep_ratio=0.25)) as m:
    ...     out = m.generate(**inputs)

    Yields
    ------
    nn.Module
        ``model`` itself, compressed.

    Raises
    ------
    ValueError, TypeError
        As :func:`apply_compression` (nothing is changed then).
    """
    apply_compression(model, config)
    try:
        yield model
    finally:
        remove_compression(model)
