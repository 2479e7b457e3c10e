"""Tests of divico.perturbation: sigma = 0 is the clean model bit for bit, the noise added is sigma x the seeded
standard Gaussian of one item's shape (checked against the difference of the projector's output before and after the
hook), the same for a sample alone and inside a batch, on LLaVA, Qwen2-VL (one flat projector output split per item)
and Video-LLaVA; pixel noise; hooks come off; bad values are refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import (
    llava_batch,
    llava_prompt,
    qwen_batch,
    qwen_item,
    qwen_prompt,
    tiny_llava,
    tiny_qwen,
    tiny_video_llava,
    video_llava_batch,
    video_llava_prompt,
)

import divico
from divico.perturbation import NoiseConfig, add_noise, gaussian_noise, perturbed
from divico.registry import get_adapter


def _family(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model, batch of two samples, the first sample alone)."""
    if name == "llava":
        first, second = llava_prompt(1, 3, 4, seed=1), llava_prompt(2, 2, 5, seed=2)
        return tiny_llava(), llava_batch([first, second]), llava_batch([first])
    if name == "qwen2_vl":
        first = qwen_prompt([qwen_item("image", 1, 4, 4, seed=3)], 3, 4, seed=1)
        second = qwen_prompt([qwen_item("image", 1, 4, 6, seed=4), qwen_item("video", 2, 4, 4, seed=5)], 2, 3, seed=2)
        return tiny_qwen("qwen2_vl"), qwen_batch([first, second]), qwen_batch([first])
    first, second = video_llava_prompt(1, 1, seed=1), video_llava_prompt(1, 0, seed=2)
    return tiny_video_llava(), video_llava_batch([first, second]), video_llava_batch([first])


FAMILIES = ["llava", "qwen2_vl", "video_llava"]


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


class ProjectorRecorder:
    """Records the projector's output of every call; registered before / after the noise hook, it sees the
    clean / the noisy output (forward hooks run in registration order)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.outputs.append(output.detach().clone())


@pytest.mark.parametrize("family", FAMILIES)
def test_sigma_zero_is_the_clean_model_exactly(family: str) -> None:
    model, batch, _ = _family(family)
    clean = _logits(model, batch)
    with perturbed(model, NoiseConfig(0.0, "features", seed=3)):
        features_zero = _logits(model, batch)
    with perturbed(model, NoiseConfig(0.0, "pixels", seed=3)):
        pixels_zero = _logits(model, batch)
    assert torch.equal(features_zero, clean)
    assert torch.equal(pixels_zero, clean)
    with perturbed(model, NoiseConfig(0.5, "features", seed=3)):
        noisy = _logits(model, batch)
    assert not torch.allclose(noisy, clean, atol=1e-3)
    assert torch.equal(_logits(model, batch), clean)  # the hooks came off


def test_sigma_zero_under_compression_is_clean() -> None:
    model, batch, _ = _family("llava")
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=2))
    clean = _logits(model, batch)
    with perturbed(model, NoiseConfig(0.0)):
        assert torch.equal(_logits(model, batch), clean)


def _item_noises(recorder_clean: ProjectorRecorder, recorder_noisy: ProjectorRecorder) -> list[torch.Tensor]:
    return [noisy - clean for clean, noisy in zip(recorder_clean.outputs, recorder_noisy.outputs, strict=True)]


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_noise_is_sigma_times_the_seeded_gaussian_of_each_item(family: str) -> None:
    model, batch, alone = _family(family)
    projector = get_adapter(model).projector()
    sigma, seed = 0.7, 11
    clean = ProjectorRecorder(projector)
    hooks = add_noise(model, NoiseConfig(sigma, "features", seed))
    noisy = ProjectorRecorder(projector)
    _logits(model, batch)
    batch_noise = _item_noises(clean, noisy)
    clean.outputs, noisy.outputs = [], []
    _logits(model, alone)
    alone_noise = _item_noises(clean, noisy)
    hooks.remove()
    clean.handle.remove()
    noisy.handle.remove()
    for difference in batch_noise + alone_noise:
        if difference.dim() == 3:  # (items, tokens, d): every item gets the noise of one item's shape
            expected = sigma * gaussian_noise(tuple(difference.shape[1:]), seed)
            for item in difference:
                torch.testing.assert_close(item, expected, atol=1e-5, rtol=0)
    if family == "qwen2_vl":
        # One flat (tokens of all items, d) output per call: images 4x4 and 4x6 patches -> 4 and 6 tokens (merge 2x2),
        # the video 2 x 4 x 4 -> 8 tokens; each item has its own seeded noise of its own shape.
        images = batch_noise[0]
        torch.testing.assert_close(images[:4], sigma * gaussian_noise((4, images.shape[1]), seed), atol=1e-5, rtol=0)
        torch.testing.assert_close(images[4:], sigma * gaussian_noise((6, images.shape[1]), seed), atol=1e-5, rtol=0)
        torch.testing.assert_close(batch_noise[1], sigma * gaussian_noise((8, images.shape[1]), seed), atol=1e-5,
                                   rtol=0)
    # The first sample's noise alone equals its noise inside the batch.
    torch.testing.assert_close(alone_noise[0][:1] if alone_noise[0].dim() == 3 else alone_noise[0],
                               batch_noise[0][:1] if batch_noise[0].dim() == 3 else batch_noise[0][:4],
                               atol=1e-5, rtol=0)


def test_pixel_noise_reaches_the_vision_tower() -> None:
    model, batch, _ = _family("llava")
    seen: list[torch.Tensor] = []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    sigma, seed = 0.3, 5
    with perturbed(model, NoiseConfig(sigma, "pixels", seed)):
        _logits(model, batch)
    handle.remove()
    expected = batch["pixel_values"] + sigma * gaussian_noise(tuple(batch["pixel_values"].shape[1:]), seed)
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)


def test_other_seed_other_noise_and_one_perturbation_at_a_time() -> None:
    model, batch, _ = _family("llava")
    with perturbed(model, NoiseConfig(0.5, seed=1)):
        first = _logits(model, batch)
        with pytest.raises(ValueError, match="already carries a noise"):
            add_noise(model, NoiseConfig(0.5, seed=2))
    with perturbed(model, NoiseConfig(0.5, seed=1)):
        again = _logits(model, batch)
    with perturbed(model, NoiseConfig(0.5, seed=2)):
        other = _logits(model, batch)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma": -0.1}, "sigma must be a finite number >= 0"),
    ({"sigma": float("nan")}, "sigma must be a finite number >= 0"),
    ({"sigma": 1.0, "kind": "latent"}, "Unknown noise kind 'latent'; valid: features, pixels"),
    ({"sigma": 1.0, "seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_noise_configs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoiseConfig(**kwargs)
