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


def read_saved_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No divico compressor at {directory}: {CONFIG_NAME} is missing.")
    return json.loads(path.read_text())


def load_compressor(model: nn.Module, directory: str | Path) -> nn.Module:
    """Restore a saved compressor (and its config) onto ``model``.

    If ``model`` is not compressed yet, the saved config is applied first. A model already compressed with
    another method, or a model of another hidden size / class, is refused with a clear error. A saved LoRA adapter
    is injected into the model's decoder layers (before the compression hooks, so scoring sees the adapted q/k)
    and its weights restored; a base model whose layers do not match the adapter is refused.

    Returns
    -------
    nn.Module
        ``model``.
    """
    meta = read_saved_config(directory)
    config = CompressionConfig.from_dict(meta["compression"])
    base = unwrap_model(model)
    adapter = get_adapter(base)
    if meta["model_class"] != type(base).__name__:
        raise ValueError(
            f"Compressor at {directory} was saved for {meta['model_class']}, not {type(base).__name__}."
        )
    if int(meta["hidden_size"]) != adapter.hidden_size():
        raise ValueError(
            f"Compressor at {directory} was saved for hidden size {meta['hidden_size']}, but this model's hidden "
            f"size is {adapter.hidden_size()}."
        )
    lora_meta = meta.get("lora")
    if lora_meta:
        if int(meta["num_layers"]) != adapter.num_layers():
            raise ValueError(
                f"Compressor at {directory} was saved with a LoRA adapter for {meta['num_layers']} decoder layers, "
                f"but this model has {adapter.num_layers()} (base model {meta.get('base_model')!r})."
            )
        load_lora(model, Path(directory) / LORA_DIR)
    runtime = get_runtime(base)
    if runtime is None:
        apply_compression(model, config)
        runtime = require_runtime(model)
    elif runtime.config.method != config.method or runtime.config.encoder != config.encoder:
        raise ValueError(
            f"Compressor at {directory} is for method={config.method!r} (encoder={config.encoder!r}), but the model "
            f"is compressed with method={runtime.config.method!r} (encoder={runtime.config.encoder!r})."
        )
    weights_path = Path(directory) / WEIGHTS_NAME
    expected = meta.get("weights", [])
    state = load_file(str(weights_path)) if weights_path.is_file() else {}
    if sorted(state) != sorted(expected):
        raise ValueError(f"{weights_path} holds {sorted(state)[:5]}..., expected {expected[:5]}...")
    for name, module in runtime.method.trainable_modules(runtime.adapter, runtime.compressor).items():
        prefix = f"{name}."
        module_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(module_state, strict=True)
        except RuntimeError as error:  # shapes differ: another width than this config builds
            raise ValueError(
                f"Compressor weights at {directory} do not fit the {name!r} module this config builds: {error}. "
                "A checkpoint whose config.json left a size to its default (e.g. encoder_hidden_size: null, "
                "saved when that default was d) needs the size written into its config.json."
            ) from error
    return model
