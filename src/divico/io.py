"""Save and load only what divico trains (compressor, and the projector for DeCo): safetensors + JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from divico.api import _require_runtime, apply_compression, get_runtime, unwrap_model
from divico.config import CompressionConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "compressor.safetensors"
FORMAT_VERSION = 1


def _model_facts(model: nn.Module) -> dict[str, Any]:
    runtime = _require_runtime(model)
    base = unwrap_model(model)
    return {
        "model_class": type(base).__name__,
        "base_model": getattr(base.config, "_name_or_path", "") or "",
        "hidden_size": runtime.adapter.hidden_size(),
        "num_layers": runtime.adapter.num_layers(),
    }


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of the modules the method trains, keyed ``<module name>.<parameter name>``."""
    runtime = _require_runtime(model)
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
    runtime = _require_runtime(model)
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
    from divico.adapters.base import get_adapter

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
        runtime = _require_runtime(model)
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
        module.load_state_dict(module_state, strict=True)
    return model


# --- LoRA adapters (peft) ------------------------------------------------------------------------------------------
LORA_DIR = "lora"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
LORA_ADAPTER_NAME = "default"


def has_lora(model: nn.Module) -> bool:
    """True when the (unwrapped) model holds peft LoRA layers with a ``peft_config``."""
    from peft.tuners.lora import LoraLayer

    base = unwrap_model(model)
    return getattr(base, "peft_config", None) is not None and any(isinstance(m, LoraLayer) for m in base.modules())


def save_lora(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Write the model's LoRA adapter in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``).

    Returns
    -------
    dict
        What ``config.json`` records about the adapter (folder, rank, target modules, tensor count).
    """
    from peft import get_peft_model_state_dict

    base = unwrap_model(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lora_config = base.peft_config[LORA_ADAPTER_NAME]
    lora_config.base_model_name_or_path = getattr(base.config, "_name_or_path", "") or None
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(base).items()}
    save_file(state, str(out / LORA_WEIGHTS_NAME), metadata={"format": "pt"})
    lora_config.save_pretrained(str(out))
    target = lora_config.target_modules
    return {
        "path": LORA_DIR,
        "r": int(lora_config.r),
        "lora_alpha": float(lora_config.lora_alpha),
        "target_modules": target if isinstance(target, str) else sorted(target or []),
        "num_tensors": len(state),
    }


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject (if needed) and load a LoRA adapter written by :func:`save_lora`.

    LoRA is injected *under* the compression hooks: if the model is already compressed, the compression is
    removed and re-applied with the same config, so layer K-1's scoring hooks see the LoRA-adapted q/k projections.
    ``requires_grad`` of existing parameters is left as it was.

    Raises
    ------
    FileNotFoundError
        If the adapter files are missing.
    ValueError
        If the adapter does not fit the model (other layer names or shapes).
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from divico.api import remove_compression

    folder = Path(directory)
    for name in (LORA_WEIGHTS_NAME, LORA_CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"LoRA adapter incomplete: {folder / name} is missing.")
    base = unwrap_model(model)
    state = load_file(str(folder / LORA_WEIGHTS_NAME))
    if not has_lora(model):
        runtime = get_runtime(base)
        config = runtime.config if runtime is not None else None
        if config is not None:
            remove_compression(model)
        requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
        lora_config = LoraConfig.from_pretrained(str(folder))
        try:
            inject_adapter_in_model(lora_config, base, adapter_name=LORA_ADAPTER_NAME)
        except ValueError as error:
            raise ValueError(f"LoRA adapter at {folder} does not fit {type(base).__name__}: {error}") from error
        for name, parameter in base.named_parameters():
            if name in requires_grad:
                parameter.requires_grad_(requires_grad[name])
        if config is not None:
            apply_compression(model, config)
    reference = next(p for n, p in base.named_parameters() if "lora_" in n)
    state = {k: v.to(device=reference.device, dtype=reference.dtype) for k, v in state.items()}
    try:
        result = set_peft_model_state_dict(base, state, adapter_name=LORA_ADAPTER_NAME)
    except RuntimeError as error:  # size mismatch: adapter trained on another base model
        raise ValueError(f"LoRA adapter at {folder} does not fit this model: {error}") from error
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing_lora = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing_lora:
        raise ValueError(
            f"LoRA adapter at {folder} does not match this model's LoRA layers: unexpected {unexpected[:3]}, "
            f"missing {missing_lora[:3]} (was it trained on another base model?)."
        )
    return model
