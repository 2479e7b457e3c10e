"""InternVL (tiles + thumbnail, pixel shuffle) on a tiny random model: what the contract matrix does not cover.

The matrix (tests/test_contract.py) runs every method on `InternVLForConditionalGeneration` (oracle with the removed
tokens hidden, keep-all bit-identical, cache lengths, cached decode, batch of different tile counts = singles,
save/load). Here: the per-tile layout, the pool decision (one pool per sample; per tile with ``per_frame_keep``),
DeCo pooling each tile's grid after the pixel shuffle, LoRA + KL training, and the layout errors.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

import divico
from contract_cases import (
    check_batch_equals_singles,
    check_cache_lengths,
    check_cached_decode,
    check_oracle,
    one_torch_thread,
)
from divico.adapters.internvl import InternVLAdapter
from divico.lora import inject_lora, lora_target_regex
from tiny_internvl import (
    TOKENS_PER_TILE,
    internvl_batch,
    internvl_prompt,
    internvl_prompts,
    tiny_internvl,
)
from tiny_models import IMAGE_TOKEN_ID

MODEL_CLASS = "InternVLForConditionalGeneration"
LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def pristine() -> torch.nn.Module:
    return tiny_internvl()


@pytest.fixture
def model(pristine) -> torch.nn.Module:
    return copy.deepcopy(pristine)


def _tile_of_each_visual_token(ids: torch.Tensor) -> torch.Tensor:
    """(n_visual,) tile index of every placeholder of one sample: tiles are consecutive 16-token spans."""
    return torch.arange(int((ids == IMAGE_TOKEN_ID).sum())) // TOKENS_PER_TILE


def test_every_tile_is_one_fixed_grid(model):
    """A tile (thumbnail included) is a 4 x 4 grid of LLM tokens; an image's tiles are one run, split per tile."""
    adapter = divico.registry.get_adapter(model)
    assert isinstance(adapter, InternVLAdapter)
    assert adapter.tokens_per_image() == (16 // 2 // 2) ** 2 == TOKENS_PER_TILE
    batch = internvl_batch(internvl_prompts())
    visual = adapter.visual_token_mask(batch["input_ids"], None)
    [(mask, grids)] = adapter.visual_grids(batch["input_ids"], visual, batch)
    assert len(grids) == 3 + 5 == batch["pixel_values"].shape[0]  # one item per row of pixel_values
    assert {(g.t, g.h, g.w, g.prefix) for g in grids} == {(1, 4, 4, 0)}
    groups = adapter.visual_groups(batch["input_ids"], visual, batch)
    first = _tile_of_each_visual_token(batch["input_ids"][0])
    second = _tile_of_each_visual_token(batch["input_ids"][1]) + 3
    assert groups[visual].tolist() == torch.cat([first, second]).tolist()


def test_one_pool_per_sample_and_per_tile_with_per_frame_keep(model):
    """Default: the kept tokens are the top-k of the sample's attention over all its tiles (however they fall on the
    tiles); ``per_frame_keep=True``: every tile keeps exactly its own top-k."""
    batch = internvl_batch([internvl_prompt([1, 4], 2, 4, seed=2)])  # 5 tiles, 80 tokens
    ids = batch["input_ids"][0]
    tile = _tile_of_each_visual_token(ids)
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=6, layer=LAYER))
    with torch.no_grad():
        model(**batch)
    report = divico.last_report(model)
    assert report.num_kept.tolist() == [6]
    scores = report.scores[0, :80]
    top = report.visual_positions[0, torch.sort(scores, descending=True, stable=True).indices[:6]].sort().values
    assert torch.equal(report.kept_positions[0, :6], top)
    divico.remove_compression(model)

    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=2, layer=LAYER,
                                                             per_frame_keep=True))
    with torch.no_grad():
        model(**batch)
    report = divico.last_report(model)
    kept_index = torch.searchsorted(report.visual_positions[0, :80], report.kept_positions[0])  # among visual
    kept_tiles = tile[kept_index]
    assert kept_tiles.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    scores = report.scores[0, :80]
    for index in range(5):  # each tile's own top-2
        in_tile = (tile == index).nonzero().flatten()
        best = in_tile[torch.sort(scores[in_tile], descending=True, stable=True).indices[:2]].sort().values
        assert torch.equal(kept_index[kept_tiles == index], best)


@pytest.mark.parametrize("check", [check_cache_lengths, check_cached_decode, check_batch_equals_singles,
                                   check_oracle])
def test_per_tile_pools_keep_the_contract(check):
    check("fastv", MODEL_CLASS, "sdpa", per_frame_keep=True)


def _capture(module: torch.nn.Module, store: dict[str, Any], key: str, kwarg: str | None = None) -> Any:
    """A pre-hook storing ``module``'s first positional input (or keyword ``kwarg``)."""
    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        store[key] = (kwargs[kwarg] if kwarg is not None else args[0]).detach().clone()

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_deco_pools_each_tile_after_the_pixel_shuffle(model, pristine):
    """DeCo (keep 4 per tile) = the unmodified model's pixel-shuffled tile grids (4 x 4) average-pooled 2 x 2 by
    hand, then projected; the pooled tokens take the first 4 placeholders of every tile, nothing else changes."""
    batch = internvl_batch([internvl_prompt([1, 4], 2, 4, seed=2)])
    seen: dict[str, Any] = {}
    handle = _capture(pristine.model.multi_modal_projector, seen, "shuffled")
    try:
        with torch.no_grad():
            pristine(**batch)
    finally:
        handle.remove()
    shuffled = seen["shuffled"]  # (tiles, 16, 4 x vision width)
    assert shuffled.shape[:2] == (5, 16)
    grids = shuffled.reshape(5, 4, 4, -1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grids, kernel_size=2).permute(0, 2, 3, 1).reshape(5, 4, -1)
    with torch.no_grad():
        expected = pristine.model.multi_modal_projector(pooled).reshape(20, -1)

    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=4))
    handles = [_capture(model.model, seen, "ids", "input_ids"),
               _capture(model.model.language_model, seen, "embeds", "inputs_embeds")]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    ids = batch["input_ids"][0]
    image = ids == IMAGE_TOKEN_ID
    offset_in_tile = torch.zeros_like(ids)
    offset_in_tile[image] = torch.arange(int(image.sum())) % TOKENS_PER_TILE
    assert seen["ids"][0].tolist() == ids[~image | (offset_in_tile < 4)].tolist()
    got = seen["embeds"][0][seen["ids"][0] == IMAGE_TOKEN_ID]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_lora_kl_training_steps_and_save_load(model, tmp_path):
    """DiViCo with LoRA: three training steps (LM loss + KL) move every trainable tensor; save/load reproduces it."""
    batch = internvl_batch(internvl_prompts()[:2])
    inject_lora(model, LoraConfig(r=2, target_modules=lora_target_regex(model, ["q_proj", "v_proj"])))
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER))
    model.train()
    for name, param in model.named_parameters():  # the base stays frozen: only what save_compressor writes trains
        param.requires_grad_("lora_" in name or name.startswith("divico_compressor."))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.divico_compressor.parameters())) + 2 * 2 * 4  # + LoRA A, B of q, v x 4
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = [p.detach().clone() for p in trainable]
    for _ in range(3):
        out = model(**batch, labels=labels)
        loss = out.loss + 0.1 * divico.last_report(model).kl
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(old, p) for old, p in zip(before, trainable))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    divico.save_compressor(model, tmp_path / "saved")
    loaded = tiny_internvl()
    divico.load_compressor(loaded, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


@pytest.mark.parametrize(("image_size", "patch_size", "ratio"), [((16, 16), (2, 2), 0.3), ((16, 8), (2, 2), 0.5),
                                                                  ((14, 14), (2, 2), 0.5)])
def test_a_tile_grid_the_pixel_shuffle_cannot_fold_is_refused(image_size, patch_size, ratio):
    vision = SimpleNamespace(image_size=image_size, patch_size=patch_size)
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=vision, downsample_ratio=ratio))
    with pytest.raises(ValueError, match=r"downsample_ratio=.*whole number"):
        InternVLAdapter(fake).tokens_per_image()
