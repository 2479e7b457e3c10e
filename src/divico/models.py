"""Load a vision-language model and its processor by name: a registered named model, a local folder or a hub id.

Named models are registered by installed distributions through the ``divico.models`` entry-point group; each
entry names a callable ``(torch_dtype=...) -> (model, processor)``. ``divico-testbed`` registers ``default``, the
embedded default model, so ``divico train --model default`` works without the library importing the testbed.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL_ENTRY_POINT_GROUP = "divico.models"


def named_models() -> dict[str, Callable[..., tuple[Any, Any]]]:
    """Named model loaders registered by installed distributions, by name."""
    return {entry.name: entry.load() for entry in entry_points(group=MODEL_ENTRY_POINT_GROUP)}


def load_model_and_processor(name: str, torch_dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, processor)`` for a named model (e.g. ``"default"``), a local folder or a hub id.

    Parameters
    ----------
    name
        A name from :func:`named_models`, or anything ``from_pretrained`` accepts.
    torch_dtype
        Parameter dtype of the returned model.

    Raises
    ------
    ValueError
        ``name`` is ``"default"`` but no distribution registers it (the testbed is not installed).
    """
    # Only the entry point asked for is loaded, so one broken plug-in cannot break loading any other model.
    matches = list(entry_points(group=MODEL_ENTRY_POINT_GROUP, name=name))
    if matches:
        return matches[0].load()(torch_dtype=torch_dtype)
    if name == "default":
        registered = sorted(entry.name for entry in entry_points(group=MODEL_ENTRY_POINT_GROUP))
        raise ValueError(
            "Model 'default' is the testbed's default model; install it with `pip install -e testbed` "
            f"(registered names: {registered or 'none'})."
        )
    processor = AutoProcessor.from_pretrained(name)
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype)
    return model, processor
