"""Vision-tower outputs shared by the demo's runs.

Every run of the demo answers the same images with the same frozen vision tower (DINOv2), and MMBench asks each
image four times (circular rotations): encoding it once per image, not once per question and run, saves about a
quarter of the demo's time on a CPU. Only the tower is cached; the projector and everything after it (where
DeCo, DiViCo and the other methods act) run for every question.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

__all__ = ["VisionFeatureCache", "vision_tower_of"]


def vision_tower_of(model: nn.Module) -> nn.Module:
    """The vision tower of a LLaVA-architecture model (``model.model.vision_tower``)."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "vision_tower", None)
    if not isinstance(tower, nn.Module):
        raise TypeError(f"{type(model).__name__} has no LLaVA-style model.vision_tower to cache.")
    return tower


def _observed(tower: nn.Module) -> bool:
    """Whether anything hooks into the tower (e.g. VisionZip's [CLS]-attention capture): a cached output would
    skip those hooks."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in tower.modules())


class VisionFeatureCache:
    """Per-image vision-tower outputs, shared by every model it is attached to.

    An image's key is a hash of its ``pixel_values`` row (bytes, dtype, shape) and of the call's keyword arguments;
    the tower runs once on a batch's new images, and each image's slices of the output fields (``last_hidden_state``,
    ``pooler_output``, every ``hidden_states`` entry) are stored until ``max_bytes`` is reached (no eviction: in
    the demo's fixed order, evicting would only trade one miss for another).

    Parameters
    ----------
    max_bytes
        Memory for stored outputs (default 2 GiB; > 0).
    """

    def __init__(self, max_bytes: int = 2 * 2**30) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}.")
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[str, dict[str, Any]] = {}
        self._output_class: type[ModelOutput] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> VisionFeatureCache:
        return self  # copies of a cached model share one cache

    def attach(self, model: nn.Module) -> bool:
        """Serve ``model``'s vision tower from this cache; False (nothing attached) when hooks observe the tower."""
        tower = vision_tower_of(model)
        if _observed(tower):
            return False
        original = tower.forward
        tower.forward = self._cached_forward(original)
        return True

    def _key(self, row: torch.Tensor, kwargs: dict[str, Any]) -> str:
        digest = hashlib.sha1(row.contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(repr((str(row.dtype), tuple(row.shape), sorted(kwargs.items()))).encode())
        return digest.hexdigest()

    def _cached_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(pixel_values: torch.Tensor, **kwargs: Any) -> Any:
            if pixel_values.device.type != "cpu":
                return original(pixel_values, **kwargs)
            keys = [self._key(row, kwargs) for row in pixel_values.detach()]
            first_of = {key: i for i, key in reversed(list(enumerate(keys)))}
            missing = sorted(i for key, i in first_of.items() if key not in self._store)  # each new image once
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            fresh: dict[str, dict[str, Any]] = {}
            if missing:
                output = original(pixel_values[missing], **kwargs)
                self._output_class = type(output)
                for row, index in enumerate(missing):
                    fresh[keys[index]] = _row_of(output, row)
                for key, entry in fresh.items():
                    size = _entry_bytes(entry)
                    if self.stored_bytes + size <= self.max_bytes:
                        self._store[key] = entry
                        self.stored_bytes += size
            entries = [fresh.get(key) or self._store[key] for key in keys]
            return _stack(entries, self._output_class)

        return forward


def _row_of(output: ModelOutput, row: int) -> dict[str, Any]:
    # transformers keeps only the hidden states the caller reads; the others are None in the tuple
    entry: dict[str, Any] = {}
    for name, value in output.items():
        if isinstance(value, torch.Tensor):
            entry[name] = value[row:row + 1].clone()
        elif isinstance(value, tuple) and all(v is None or isinstance(v, torch.Tensor) for v in value):
            entry[name] = tuple(None if v is None else v[row:row + 1].clone() for v in value)
        else:
            raise TypeError(f"cannot cache the vision tower's output field {name!r} of type {type(value).__name__}.")
    return entry


def _entry_bytes(entry: dict[str, Any]) -> int:
    tensors = [t for value in entry.values() for t in (value if isinstance(value, tuple) else (value,)) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _stack(entries: list[dict[str, Any]], output_class: type[ModelOutput]) -> ModelOutput:
    fields: dict[str, Any] = {}
    for name, value in entries[0].items():
        if isinstance(value, tuple):
            fields[name] = tuple(None if v is None else torch.cat([e[name][i] for e in entries])
                                 for i, v in enumerate(value))
        else:
            fields[name] = torch.cat([e[name] for e in entries])
    return output_class(**fields)
