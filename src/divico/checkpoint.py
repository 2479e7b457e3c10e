"""Compressor checkpoints: save and load only what divico trains (compressor, DeCo's projector, LoRA) as
safetensors + JSON (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from divico.api import apply_compression, get_runtime, require_runtime, unwrap_model
from divico.config import CompressionConfig
from divico.lora import LORA_DIR, has_lora, load_lora, save_lora
from divico.registry import get_adapter

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "compressor.safetensors"
FORMAT_VERSION = 1


def _model_facts(model: nn.Module) -> dict[str, Any]:
    runtime = require_runtime(model)
    base = unwrap_model(model)
    return {
        "model_class": type(base).__name__,
        "base_model": getattr(base.config, "_name_or_path", "") or "",
        "hidden_size": runtime.adapter.hidden_size(),
        "num_layers": runtime.adapter.num_layers(),
    }


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of the modules the method trains, keyed ``<module name>.<parameter name>``."""
    runtime = require_runtime(model)
    state: dict[str, torch.Tensor] = {}
    for name, module in runtime.method.trainable_modules(runtime.adapter, runtime.compressor).items():
        for key, tensor in module.state_dict().items():
            state[f"{name}.{key}"] = tensor.detach().contiguous().cpu()
    return state


def save_compressor(model: nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` and ``compressor.safetensors`` (only trained parts) to ``directory``.

    When the model carries peft LoRA layers (e.g. after :func:`divico.training.train`), the adapter is written too:
    ``lora/adapter_model.safetensors`` + ``lora/adapter_config.json`` (peft's format), recorded in ``config.json``.

    Returns
    -------
    Path
        The directory.
    """
    runtime = require_runtime(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "compression": runtime.config.to_dict(), **_model_facts(model)}
    state = trainable_state_dict(model)
    meta["weights"] = sorted(state)
    if state:
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if has_lora(model):
        meta["lora"] = save_lora(model, out / LORA_DIR)
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


#: config.json keys that :func:`load_compressor` reads (save_compressor writes them all).
REQUIRED_KEYS = ("compression", "model_class", "hidden_size", "num_layers")
#: Fields that decide which modules a config builds; the other fields (keep ratio or count, layer, scoring, ...)
#: only decide how the same weights are used.
WEIGHT_SHAPING_FIELDS = ("method", "encoder")


def read_saved_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a compressor folder written by :func:`save_compressor`.

    Raises
    ------
    FileNotFoundError
        If ``directory/config.json`` does not exist.
    ValueError
        If it is not a JSON object with the keys :func:`load_compressor` needs.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No divico compressor at {str(directory)!r}: {path} is missing (expected the folder written by "
            f"divico.save_compressor: {CONFIG_NAME} + {WEIGHTS_NAME}, and lora/ when LoRA was trained)."
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    missing = [key for key in REQUIRED_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; a divico compressor config holds {list(REQUIRED_KEYS)}.")
    return meta


def saved_compression_config(directory: str | Path, **overrides: Any) -> CompressionConfig:
    """The compression a compressor folder was saved with, with ``overrides`` replacing some of its fields.

    This is how a trained compressor is evaluated at another rate or layer: its weight-shaping fields
    (``encoder_hidden_size``, ``encoder``...) stay as saved, ``overrides`` (e.g. ``keep_ratio=0.2``, ``layer=3``)
    replace the rest; ``keep_ratio`` and ``keep_tokens`` replace each other. Apply the result, then
    ``load_compressor(model, directory, override_config=True)``.

    Raises
    ------
    ValueError
        An override names no :class:`CompressionConfig` field, or the merged config is invalid.
    """
    settings = dict(read_saved_config(directory)["compression"])
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"{unknown} are not CompressionConfig fields (valid: {sorted(settings)}).")
    if overrides.get("keep_ratio") is not None or overrides.get("keep_tokens") is not None:
        settings["keep_ratio"] = settings["keep_tokens"] = None
    settings.update({name: value for name, value in overrides.items() if value is not None})
    return CompressionConfig.from_dict(settings)


def config_differences(saved: CompressionConfig, current: CompressionConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two configs: ``{field: (saved value, current value)}``."""
    saved_fields, current_fields = saved.to_dict(), current.to_dict()
    return {
        name: (saved_fields[name], current_fields[name])
        for name in saved_fields
        if saved_fields[name] != current_fields[name]
    }


def load_compressor(model: nn.Module, directory: str | Path, override_config: bool = False) -> nn.Module:
    """Restore a saved compressor (and its config) onto ``model``.

    If ``model`` is not compressed yet, the saved config is applied first. A model already compressed must use
    the saved config: a model compressed with another method or encoder is always refused, and one compressed
    with the same method but other settings (keep ratio or count, layer, scoring, ...) is refused unless
    ``override_config=True``, which keeps the model's own settings and loads the saved weights into them (e.g. to
    run a compressor trained at one rate at another; the weights have the same shapes). A model of another hidden
    size / class is refused. A saved LoRA adapter is injected into the model's decoder layers (before the
    compression hooks, so scoring sees the adapted q/k) and its weights restored; a base model whose layers do not
    match the adapter is refused. Every module divico adds takes the model's train/eval mode.

    Parameters
    ----------
    model
        The base transformers model (or a peft model wrapping one), compressed or not.
    directory
        A folder written by :func:`save_compressor`.
    override_config
        Only for a model that is already compressed: keep its config where it differs from the saved one in
        fields that do not shape the weights (everything except ``method`` and ``encoder``).

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    FileNotFoundError
        If ``config.json`` is missing.
    ValueError
        Another model class, hidden size or layer count (LoRA), another method / encoder, another config without
        ``override_config``, or weights that are not the ones the config builds (other names or shapes).
    """
    meta = read_saved_config(directory)
    config = CompressionConfig.from_dict(meta["compression"])
    base = unwrap_model(model)
    adapter = get_adapter(base)
    if meta["model_class"] != type(base).__name__:
        raise ValueError(
            f"Compressor at {str(directory)!r} was saved for model class {meta['model_class']}, not "
            f"{type(base).__name__}; load it onto a {meta['model_class']} (base model "
            f"{meta.get('base_model') or 'unnamed'!r})."
        )
    if int(meta["hidden_size"]) != adapter.hidden_size():
        raise ValueError(
            f"Compressor at {str(directory)!r} was saved for hidden size {meta['hidden_size']}, but this model's "
            f"hidden size is {adapter.hidden_size()}."
        )
    runtime = get_runtime(base)
    if runtime is not None:
        _check_config_matches(directory, config, runtime.config, override_config)
    lora_meta = meta.get("lora")
    if lora_meta:
        if int(meta["num_layers"]) != adapter.num_layers():
            raise ValueError(
                f"Compressor at {str(directory)!r} was saved with a LoRA adapter for {meta['num_layers']} decoder "
                f"layers, but this model has {adapter.num_layers()} (base model {meta.get('base_model')!r})."
            )
        load_lora(model, Path(directory) / LORA_DIR)
    runtime = get_runtime(base)
    if runtime is None:
        apply_compression(model, config)
        runtime = require_runtime(model)
    weights_path = Path(directory) / WEIGHTS_NAME
    expected = sorted(meta.get("weights", []))
    state = load_file(str(weights_path)) if weights_path.is_file() else {}
    if sorted(state) != expected:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        raise ValueError(
            f"{weights_path} does not hold the tensors its {CONFIG_NAME} lists ({len(expected)}): missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(state)} tensors in the file)."
        )
    modules = runtime.method.trainable_modules(runtime.adapter, runtime.compressor)
    built = sorted(f"{name}.{key}" for name, module in modules.items() for key in module.state_dict())
    if built != expected:
        raise ValueError(
            f"Compressor weights at {str(directory)!r} are not the ones the {runtime.config.method!r} config builds: "
            f"the checkpoint has {_names(sorted(set(expected) - set(built)))} that this model lacks and lacks "
            f"{_names(sorted(set(built) - set(expected)))}."
        )
    for name, module in modules.items():
        prefix = f"{name}."
        module_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = module.state_dict()
        wrong = {key: (tuple(value.shape), tuple(own[key].shape)) for key, value in module_state.items()
                 if tuple(value.shape) != tuple(own[key].shape)}
        if wrong:
            shapes = ", ".join(f"{name}.{key}: saved {saved}, built {here}" for key, (saved, here) in wrong.items())
            raise ValueError(
                f"Compressor weights at {str(directory)!r} do not fit the {name!r} module this config builds "
                f"({shapes}); its encoder_hidden_size is {runtime.config.encoder_hidden_size!r}. A checkpoint whose "
                "config.json left a size to its default (e.g. encoder_hidden_size: null, saved when that default "
                "was d) needs the size written into its config.json."
            )
        module.load_state_dict(module_state, strict=True)
    return model


def _names(keys: list[str]) -> str:
    return "nothing" if not keys else f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"


def _check_config_matches(
    directory: str | Path, saved: CompressionConfig, current: CompressionConfig, override_config: bool
) -> None:
    differences = config_differences(saved, current)
    shaping = {name: values for name, values in differences.items() if name in WEIGHT_SHAPING_FIELDS}
    if shaping:
        raise ValueError(
            f"Compressor at {str(directory)!r} is for method={saved.method!r} (encoder={saved.encoder!r}), but the "
            f"model is compressed with method={current.method!r} (encoder={current.encoder!r}); remove_compression "
            "first, or load a compressor of the same method and encoder."
        )
    if differences and not override_config:
        listed = ", ".join(f"{name}: saved {old!r}, model {new!r}" for name, (old, new) in differences.items())
        raise ValueError(
            f"Compressor at {str(directory)!r} was saved with another config than the model is compressed with "
            f"({listed}). Call remove_compression(model) first to use the saved config, or pass "
            "override_config=True to keep the model's config and load the weights into it."
        )
