"""LoRA on the LLM's decoder layers (peft): inject, save, load and merge — the one place divico touches peft.

LoRA is always injected *under* the compression hooks (before :func:`divico.apply_compression`, or with the
compression removed and re-applied), so layer K-1's scoring reads the LoRA-adapted q/k projections. Newly injected
LoRA modules take the training mode of the model they are injected into: a model in eval mode runs no LoRA
dropout, so two loads of one checkpoint give the same logits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from divico.api import apply_compression, get_runtime, remove_compression, unwrap_model
from divico.registry import get_adapter

LORA_DIR = "lora"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
LORA_ADAPTER_NAME = "default"

#: Linear layers of a Llama-style decoder layer that LoRA adapts by default.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def has_lora(model: nn.Module) -> bool:
    """True when the (unwrapped) model holds peft LoRA layers with a ``peft_config``."""
    base = unwrap_model(model)
    return getattr(base, "peft_config", None) is not None and any(isinstance(m, LoraLayer) for m in base.modules())


def lora_target_regex(model: nn.Module, targets: list[str] | str | None) -> str:
    """Regex over module names that matches the chosen linear layers inside the LLM's decoder layers only.

    Parameters
    ----------
    model
        The (uncompressed) transformers model.
    targets
        Module-name suffixes (default :data:`DEFAULT_LORA_TARGETS`) or a ready regex (returned unchanged).

    Raises
    ------
    ValueError
        If ``targets`` is an empty list or holds a non-string / empty name.
    """
    if isinstance(targets, str):
        return targets
    base = unwrap_model(model)
    layers = get_adapter(base).decoder_layers()
    prefix = next((name for name, module in base.named_modules() if module is layers), None)
    if prefix is None:
        raise TypeError("Could not locate the decoder layers of the language model for LoRA.")
    names = list(targets) if targets is not None else list(DEFAULT_LORA_TARGETS)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"lora_target_modules must be non-empty module names, got {targets!r}.")
    return rf"^{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{'|'.join(re.escape(name) for name in names)})$"


def inject_lora(model: nn.Module, lora_config: LoraConfig) -> nn.Module:
    """Add LoRA layers to ``model`` in place, beneath any compression hooks.

    A compressed model has its compression removed and re-applied with the same config around the injection.
    ``requires_grad`` of existing parameters is left as it was; the new LoRA modules take the model's training mode.

    Raises
    ------
    ValueError
        If the LoRA config does not fit the model (no matching layer names).
    """
    base = unwrap_model(model)
    runtime = get_runtime(base)
    config = runtime.config if runtime is not None else None
    if config is not None:
        remove_compression(base)
    requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
    try:
        inject_adapter_in_model(lora_config, base, adapter_name=LORA_ADAPTER_NAME)
    except ValueError as error:
        raise ValueError(f"LoRA config does not fit {type(base).__name__}: {error}") from error
    for name, parameter in base.named_parameters():
        if name in requires_grad:
            parameter.requires_grad_(requires_grad[name])
    for module in base.modules():
        if isinstance(module, LoraLayer):
            module.train(base.training)
    if config is not None:
        apply_compression(base, config)
    return model


def save_lora(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Write the model's LoRA adapter in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``).

    Returns
    -------
    dict
        What a compressor's ``config.json`` records about the adapter (folder, rank, target modules, tensor count).
    """
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

    Raises
    ------
    FileNotFoundError
        If the adapter files are missing.
    ValueError
        If the adapter does not fit the model (other layer names or shapes).
    """
    folder = Path(directory)
    for name in (LORA_WEIGHTS_NAME, LORA_CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"LoRA adapter incomplete: {folder / name} is missing.")
    base = unwrap_model(model)
    state = load_file(str(folder / LORA_WEIGHTS_NAME))
    if not has_lora(model):
        try:
            inject_lora(model, LoraConfig.from_pretrained(str(folder)))
        except ValueError as error:
            raise ValueError(f"LoRA adapter at {folder} does not fit {type(base).__name__}: {error}") from error
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


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold injected LoRA layers into their base linear layers and remove them (in place)."""
    base = unwrap_model(model)
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, module.get_base_layer())
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove injected LoRA layers without merging them: the base layers come back unchanged (in place)."""
    base = unwrap_model(model)
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    return model
