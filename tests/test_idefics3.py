"""Idefics3 and SmolVLM (image splitting, row/column markers, pixel shuffle) on tiny random models.

The contract matrix (tests/test_contract.py) runs every method on both classes with batches that mix split and
unsplit images and a text-only sample (all-zero padded images). Here: the marker-separated runs (one item per
tile), the text model at ``model.model.text_model``, the pool decision (one per sample; per tile with
``per_frame_keep``), DeCo pooling each tile after the pixel shuffle while keeping every marker, the zero-padded
image batches, and LoRA + KL training.
"""

from __future__ import annotations

import copy
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
from divico.adapters.idefics3 import Idefics3Adapter
from divico.lora import inject_lora, lora_target_regex
from tiny_idefics3 import (
    TOKENS_PER_TILE,
    idefics3_batch,
    idefics3_prompt,
    idefics3_prompts,
    tiny_idefics3,
)
from tiny_models import IMAGE_TOKEN_ID

CLASSES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
KINDS = sorted(CLASSES)
LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def pristine_models() -> dict[str, torch.nn.Module]:
    return {kind: tiny_idefics3(kind) for kind in KINDS}


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every run of True in a 1-D mask, end exclusive."""
    edges = torch.diff(torch.nn.functional.pad(mask.int(), (1, 1))).nonzero().flatten().tolist()
    return list(zip(edges[::2], edges[1::2]))


def _capture(module: torch.nn.Module, store: dict[str, Any], key: str, kwarg: str | None = None) -> Any:
    """A pre-hook storing ``module``'s first positional input (or keyword ``kwarg``)."""
    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        store[key] = (kwargs[kwarg] if kwarg is not None else args[0]).detach().clone()

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", KINDS)
def test_markers_split_an_image_into_one_run_per_tile(kind, pristine_models):
    """The markers are text; every marker-separated run is one tile of 16 tokens and one group for per-tile pools."""
    model = pristine_models[kind]
    adapter = divico.registry.get_adapter(model)
    assert isinstance(adapter, Idefics3Adapter)
    assert adapter.text_model() is model.model.text_model
    assert adapter.tokens_per_image() == TOKENS_PER_TILE
    batch = idefics3_batch(idefics3_prompts(kind))
    visual = adapter.visual_token_mask(batch["input_ids"], None)
    runs = [_runs(visual[row]) for row in range(3)]
    # 1 x 2 split: 2 tiles + global; unsplit + 2 x 1 split: 1 + (2 + 1); text only.
    assert [len(r) for r in runs] == [3, 4, 0]
    assert all(end - start == TOKENS_PER_TILE for sample in runs for start, end in sample)
    groups = adapter.visual_groups(batch["input_ids"], visual, batch)
    for row, sample in enumerate(runs):
        for start, end in sample:
            assert groups[row, start:end].unique().numel() == 1
    assert groups[visual].unique().numel() == 7 and bool((groups[~visual] == -1).all())


@pytest.mark.parametrize("kind", KINDS)
def test_zero_padded_images_never_reach_the_projector(kind, pristine_models):
    """In a batch, samples with fewer tiles are padded with all-zero images; the projector (where DeCo pools) maps
    the 7 real tiles only, in prompt order: the same features each sample gets alone."""
    model = pristine_models[kind]
    prompts = idefics3_prompts(kind)
    batch = idefics3_batch(prompts)
    assert batch["pixel_values"].shape[:2] == (3, 4)
    assert batch["pixel_values"][0, 3].abs().sum() == 0 and batch["pixel_values"][2].abs().sum() == 0
    seen: dict[str, Any] = {}
    handle = _capture(model.model.connector.modality_projection, seen, "features")
    try:
        with torch.no_grad():
            model(**batch)
            batched = seen.pop("features")
            singles = []
            for spec in prompts[:2]:
                model(**idefics3_batch([spec]))
                singles.append(seen.pop("features"))
    finally:
        handle.remove()
    assert batched.shape[0] == 3 + 4 and [f.shape[0] for f in singles] == [3, 4]
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_pool_per_sample_and_per_tile_with_per_frame_keep(kind, pristine_models):
    """Default: the sample's top-k over all its tiles; ``per_frame_keep=True``: each tile keeps its own top-k."""
    model = copy.deepcopy(pristine_models[kind])
    batch = idefics3_batch([idefics3_prompt(kind, [(0, 0), (2, 1)], 2, 4, seed=2)])  # 4 tiles, 64 tokens
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=5, layer=LAYER))
    with torch.no_grad():
        model(**batch)
    report = divico.last_report(model)
    scores = report.scores[0, :64]
    top = report.visual_positions[0, torch.sort(scores, descending=True, stable=True).indices[:5]].sort().values
    assert report.num_kept.tolist() == [5] and torch.equal(report.kept_positions[0, :5], top)
    divico.remove_compression(model)

    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=2, layer=LAYER,
                                                             per_frame_keep=True))
    with torch.no_grad():
        model(**batch)
    report = divico.last_report(model)
    tile = torch.arange(64) // TOKENS_PER_TILE  # tiles are consecutive 16-token runs among the visual tokens
    kept_index = torch.searchsorted(report.visual_positions[0, :64], report.kept_positions[0])
    assert tile[kept_index].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    scores = report.scores[0, :64]
    for index in range(4):
        in_tile = (tile == index).nonzero().flatten()
        best = in_tile[torch.sort(scores[in_tile], descending=True, stable=True).indices[:2]].sort().values
        assert torch.equal(kept_index[tile[kept_index] == index], best)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("check", [check_cache_lengths, check_cached_decode, check_batch_equals_singles,
                                   check_oracle])
def test_per_tile_pools_keep_the_contract(check, kind):
    check("fastv", CLASSES[kind], "sdpa", per_frame_keep=True)


@pytest.mark.parametrize("kind", KINDS)
def test_deco_pools_each_tile_after_the_pixel_shuffle_and_keeps_the_markers(kind, pristine_models):
    """DeCo (keep 4 per tile) = the unmodified model's pixel-shuffled tile grids (4 x 4) average-pooled 2 x 2 by
    hand, then projected; the pooled tokens take the first 4 slots of every tile's run and every marker stays."""
    pristine = pristine_models[kind]
    batch = idefics3_batch([idefics3_prompt(kind, [(0, 0), (2, 1)], 2, 4, seed=2)])
    seen: dict[str, Any] = {}
    handle = _capture(pristine.model.connector.modality_projection, seen, "shuffled")
    try:
        with torch.no_grad():
            pristine(**batch)
    finally:
        handle.remove()
    shuffled = seen["shuffled"]  # (tiles, 16, scale^2 x vision width)
    assert shuffled.shape[:2] == (4, 16)
    grids = shuffled.reshape(4, 4, 4, -1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grids, kernel_size=2).permute(0, 2, 3, 1).reshape(4, 4, -1)
    with torch.no_grad():
        expected = pristine.model.connector.modality_projection(pooled).reshape(16, -1)

    model = copy.deepcopy(pristine)
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=4))
    handles = [_capture(model.model, seen, "ids", "input_ids"),
               _capture(model.model.text_model, seen, "embeds", "inputs_embeds")]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    ids, short = batch["input_ids"][0], seen["ids"][0]
    image = ids == IMAGE_TOKEN_ID
    assert short[short != IMAGE_TOKEN_ID].tolist() == ids[~image].tolist()  # every marker and text token kept
    assert [end - start for start, end in _runs(short == IMAGE_TOKEN_ID)] == [4] * 4
    offset_in_tile = torch.zeros_like(ids)
    offset_in_tile[image] = torch.arange(int(image.sum())) % TOKENS_PER_TILE
    assert short.tolist() == ids[~image | (offset_in_tile < 4)].tolist()
    got = seen["embeds"][0][short == IMAGE_TOKEN_ID]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_lora_kl_training_steps_and_save_load(pristine_models, tmp_path):
    """SmolVLM + DiViCo + LoRA: three steps (LM loss + KL) move every trainable tensor; save/load reproduces it."""
    model = copy.deepcopy(pristine_models["smolvlm"])
    batch = idefics3_batch(idefics3_prompts("smolvlm"))
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
    loaded = tiny_idefics3("smolvlm")
    divico.load_compressor(loaded, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
