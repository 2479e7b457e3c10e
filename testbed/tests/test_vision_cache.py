"""The demo's shared vision-tower cache: the same logits as without it, each image encoded once."""

from __future__ import annotations

import copy

import divico
import pytest
import torch
from tiny_models import llava_batch, llava_prompt, tiny_llava

from divico_testbed.vision_cache import VisionFeatureCache


def _batch_with_a_repeated_image():
    first, second, third = (llava_prompt(1, 3, 4, seed) for seed in (0, 1, 2))
    third["pixels"] = first["pixels"].clone()  # e.g. two MMBench rotations of one image in one batch
    return llava_batch([first, second, third])


def _compressed(base, method="fastv"):
    model = copy.deepcopy(base)
    divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.25, layer=1))
    return model.eval()


@torch.no_grad()
def test_cached_runs_give_the_uncached_logits_and_encode_each_image_once():
    base = tiny_llava().eval()
    batch = _batch_with_a_repeated_image()
    cache = VisionFeatureCache()
    for build in (lambda: copy.deepcopy(base), lambda: _compressed(base)):
        plain, cached = build(), build()
        assert cache.attach(cached)
        torch.testing.assert_close(cached(**batch).logits, plain(**batch).logits, rtol=0, atol=0)
    # 2 distinct images of 3 encoded by the first model; the second model reads all 3 from the cache
    assert (cache.misses, cache.hits) == (2, 1 + 3)
    assert copy.deepcopy(cache) is cache  # copies of a cached model share it


@torch.no_grad()
def test_a_full_cache_stores_nothing_more_and_still_answers_exactly():
    base = tiny_llava().eval()
    batch = _batch_with_a_repeated_image()
    cache = VisionFeatureCache(max_bytes=1)
    cached = copy.deepcopy(base)
    assert cache.attach(cached)
    for _ in range(2):
        torch.testing.assert_close(cached(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    assert cache.stored_bytes == 0 and cache.misses == 4


def test_a_tower_observed_by_hooks_is_not_cached():
    base = tiny_llava().eval()
    zipped = _compressed(base, "visionzip")  # VisionZip captures the tower's [CLS] attention with hooks
    assert not VisionFeatureCache().attach(zipped)
    with pytest.raises(ValueError, match="max_bytes must be > 0, got 0"):
        VisionFeatureCache(max_bytes=0)
    with pytest.raises(TypeError, match="has no LLaVA-style model.vision_tower"):
        VisionFeatureCache().attach(torch.nn.Linear(2, 2))
