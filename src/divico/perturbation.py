"""The paper's input perturbation (Table II, Fig. 5): seeded Gaussian noise on the encoded image features or on the
pixels, attached to any supported model by hooks and removed without a trace.

``kind="features"`` (the paper's): ``v' = v + sigma * n`` on the output of the adapter's
:meth:`~divico.adapters.base.ModelAdapter.projector`, i.e. on the visual tokens as they enter the LLM (after DeCo's
pooling where DeCo pools before the projector). ``kind="pixels"``: the same on the processor's normalised
``pixel_values`` (``pixel_values_images`` / ``pixel_values_videos``), so ``sigma`` is in units of the normalised pixel scale (one ImageNet
standard deviation per unit for CLIP/DINOv2-style processors).

Seeding: ``n ~ N(0, 1)`` is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` with the shape of *one*
item (one image, or one video frame, as the projector sees it: ``(tokens, d)``; a pixel tensor's first dimension), so
every item of the same shape receives the very same noise tensor, as the paper adds "the same noise" to every encoded image. The noise
of a sample therefore depends only on ``seed`` and its own feature shape: alone or inside a batch, on any device and
under any compression method, it is identical. Projectors that return the tokens of all items of a forward as one
``(sum of tokens, d)`` matrix (Qwen2-VL's merger) are split per item with the ``image_grid_thw`` /
``video_grid_thw`` of that forward.

``sigma=0`` adds exact zeros: the outputs equal the clean model's bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from divico.api import unwrap_model
from divico.registry import get_adapter

__all__ = ["NOISE_KINDS", "NoiseConfig", "NoiseHooks", "add_noise", "gaussian_noise", "perturbed"]

#: Where the noise is added: ``features`` (the projector's output, the paper's) or ``pixels`` (the model's input).
NOISE_KINDS = ("features", "pixels")
_HOOKS_ATTR = "_divico_noise_hooks"
_GRID_KEYS = ("image_grid_thw", "video_grid_thw")
#: Pixel inputs of the supported families and the grid that splits a 2-D one (Qwen2-VL) into items.
_PIXEL_KEYS = {"pixel_values": "image_grid_thw", "pixel_values_images": None, "pixel_values_videos": "video_grid_thw"}


@dataclass(frozen=True)
class NoiseConfig:
    """A Gaussian perturbation of the visual input.

    Attributes
    ----------
    sigma
        Scale of the standard-Gaussian noise, finite and >= 0 (0: the clean model exactly).
    kind
        One of :data:`NOISE_KINDS`.
    seed
        Seed of the noise, an integer >= 0 (see the module docstring for what the noise depends on).
    """

    sigma: float
    kind: str = "features"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not math.isfinite(self.sigma) \
                or self.sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}.")
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"Unknown noise kind {self.kind!r}; valid: {', '.join(NOISE_KINDS)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (recorded in ``run_config.json``)."""
        return {"sigma": float(self.sigma), "kind": self.kind, "seed": self.seed}


def gaussian_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard-Gaussian float32 noise of ``shape`` drawn on the CPU from ``seed`` (the same on every device).

    Parameters
    ----------
    shape
        Shape of one item's features, e.g. (tokens, d).
    seed
        Generator seed, >= 0.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


class NoiseHooks:
    """The hooks of one :func:`add_noise` call; :meth:`remove` detaches them."""

    def __init__(self, model: nn.Module, config: NoiseConfig) -> None:
        self.model = model
        self.config = config
        self.handles: list[Any] = []
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        # The current forward's item grids, for projectors that return all items' tokens as one matrix.
        self._grids: dict[str, torch.Tensor] = {}
        self._grids_used: set[str] = set()

    # -- noise of one item shape, broadcast over the items ----------------------------------------------------------
    def _noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if shape not in self._cache:
            self._cache[shape] = gaussian_noise(shape, self.config.seed)
        return (self.config.sigma * self._cache[shape]).to(device=like.device, dtype=like.dtype)

    def _perturb(self, values: torch.Tensor) -> torch.Tensor:
        """``values + sigma * n``: (items, *item_shape) gets one noise tensor per item shape; a 2-D
        (sum of tokens, d) matrix is split into items by this forward's grids first."""
        if values.dim() >= 3:
            return values + self._noise(tuple(values.shape[1:]), values)
        sizes = self._item_rows(values.shape[0])
        parts = [part + self._noise(tuple(part.shape), part) for part in torch.split(values, sizes)]
        return torch.cat(parts, dim=0)

    def _item_rows(self, rows: int) -> list[int]:
        """Tokens of each item of a (rows, d) matrix: from the first grid of this forward not used yet whose
        items fit (the projector runs once for the images, once for the videos); one item without grids."""
        if not self._grids:
            return [rows]
        for key in _GRID_KEYS:
            grid = self._grids.get(key)
            if grid is None or key in self._grids_used:
                continue
            cells = grid.prod(-1).tolist()
            total = sum(cells)
            # The projector merges patches (Qwen2-VL: 2 x 2 per token): the totals give the merge factor.
            if total % rows == 0 and all(cell % (total // rows) == 0 for cell in cells):
                self._grids_used.add(key)
                return [cell // (total // rows) for cell in cells]
        shapes = {key: tuple(value.tolist()) for key, value in self._grids.items()}
        raise ValueError(f"Cannot split a ({rows}, d) projector output into items with this forward's grids {shapes}.")

    # -- hooks ------------------------------------------------------------------------------------------------------
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Top-level forward pre-hook: remember the item grids; add pixel noise (``kind="pixels"``)."""
        self._grids = {key: kwargs[key] for key in _GRID_KEYS if kwargs.get(key) is not None}
        self._grids_used = set()
        if self.config.kind != "pixels":
            return None
        if len(args) > 1:
            raise ValueError("Pixel noise needs pixel_values passed by keyword (model(input_ids, pixel_values=...)), "
                             "as generate() does.")
        changed = dict(kwargs)
        for key, grid_key in _PIXEL_KEYS.items():
            values = kwargs.get(key)
            if values is None:
                continue
            if values.dim() >= 3:
                changed[key] = values + self._noise(tuple(values.shape[1:]), values)
            else:  # Qwen2-VL: (patches of all items, patch dim), items of prod(grid_thw) patches each
                grid = None if grid_key is None else kwargs.get(grid_key)
                if grid is None:
                    raise ValueError(f"2-D {key} {tuple(values.shape)} without {grid_key}: cannot tell its items.")
                sizes = grid.prod(-1).tolist()
                changed[key] = torch.cat([part + self._noise(tuple(part.shape), part)
                                          for part in torch.split(values, sizes)], dim=0)
        return args, changed

    def _feature_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Projector forward hook: ``output + sigma * n`` per item."""
        if torch.is_tensor(output):
            return self._perturb(output)
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            return (self._perturb(output[0]), *output[1:])
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; feature noise expects a tensor.")

    def attach(self) -> NoiseHooks:
        base = unwrap_model(self.model)
        if getattr(base, _HOOKS_ATTR, None) is not None:
            raise ValueError("This model already carries a noise perturbation; remove it first (hooks.remove()).")
        adapter = get_adapter(base)
        self.handles.append(base.register_forward_pre_hook(self._capture, with_kwargs=True))
        if self.config.kind == "features":
            self.handles.append(adapter.projector().register_forward_hook(self._feature_hook))
        setattr(base, _HOOKS_ATTR, self)
        return self

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        base = unwrap_model(self.model)
        if getattr(base, _HOOKS_ATTR, None) is self:
            delattr(base, _HOOKS_ATTR)


def add_noise(model: nn.Module, config: NoiseConfig) -> NoiseHooks:
    """Perturb ``model``'s visual input as ``config`` says until the returned hooks are removed.

    Parameters
    ----------
    model
        A supported transformers LVLM (compressed or not, or a peft model wrapping one).
    config
        The perturbation.

    Returns
    -------
    NoiseHooks
        Call ``.remove()`` to restore the clean model.

    Raises
    ------
    TypeError
        The model's class has no registered adapter, or (features) its adapter has no projector.
    ValueError
        The model already carries a perturbation.
    """
    return NoiseHooks(model, config).attach()


@contextmanager
def perturbed(model: nn.Module, config: NoiseConfig | None) -> Iterator[nn.Module]:
    """``model`` with ``config``'s noise inside a ``with`` block (None: unchanged); the hooks always come off."""
    if config is None:
        yield model
        return
    hooks = add_noise(model, config)
    try:
        yield model
    finally:
        hooks.remove()
