"""LLaVA-NeXT and LLaVA-OneVision (any-resolution tiles, row-end tokens, several images, video) on tiny models.

The contract matrix (tests/test_contract.py) runs every method on both classes (oracle, keep-all, cache lengths,
cached decode, batch = singles with different image sizes and tile counts, save/load). Here: the layout against the
real processor, the row-end token rule, DeCo's pooling computed independently, per-frame keeping, training, errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import divico
from contract_cases import (
    ATTN_IMPLEMENTATIONS,
    batch_of,
    check_batch_equals_singles,
    check_cached_decode,
    check_keep_all,
    check_oracle,
    fresh,
    one_torch_thread,
)
from divico.grids import VisualGrid
from tiny_llava_next import (
    FRAME_SIDE,
    SIDE,
    VIDEO_FRAMES,
    next_batch,
    next_prompt,
    next_prompts,
    tiny_llava_next,
)
from tiny_models import IMAGE_TOKEN_ID

NEXT = "LlavaNextForConditionalGeneration"
ONEVISION = "LlavaOnevisionForConditionalGeneration"
LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _grids(model_class: str, which: tuple[int, ...]) -> list[list[VisualGrid]]:
    model = fresh(model_class, "sdpa")
    inputs = batch_of(model_class, which)
    adapter = divico.registry.get_adapter(model)
    visual = adapter.visual_token_mask(inputs["input_ids"], None)
    return [grids for _, grids in adapter.visual_grids(inputs["input_ids"], visual, inputs)]


def _row_end_positions(start: int, rows: int, width: int) -> list[int]:
    """Prompt positions of the row-end tokens of a mosaic of ``rows`` x ``width`` cells whose image starts at
    ``start`` (after the 4 x 4 base grid)."""
    return [start + SIDE * SIDE + row * (width + 1) + width for row in range(rows)]


def test_layout_matches_the_real_processor():
    """The real LlavaNextProcessor's token counts and tile padding, and the adapter's items for them: a 20 x 40 image
    is 1 x 2 tiles, 4 rows of 8 cells + a row end; a 30 x 24 image 2 x 2 tiles unpadded to 8 rows of 6 cells."""
    inputs = batch_of(NEXT, (0, 1))
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [16 + 4 * 9, 16 + 8 * 7]
    assert tuple(inputs["pixel_values"].shape) == (2, 5, 3, 16, 16)  # 3 and 5 tiles, padded to 5
    assert _grids(NEXT, (0, 1)) == [
        [VisualGrid(1, 4, 4), VisualGrid(1, 4, 9), VisualGrid(1, 4, 4), VisualGrid(1, 8, 7)],
    ]
    # OneVision: an image alone gets tiles; the two images of a multi-image sample only base + row end; a video of 4
    # frames of 2 x 2 tokens + one row end.
    assert _grids(ONEVISION, (0, 1)) == [
        [VisualGrid(1, 4, 4), VisualGrid(1, 4, 9), VisualGrid(1, 4, 4, prefix=1), VisualGrid(1, 4, 4, prefix=1)],
        [VisualGrid(VIDEO_FRAMES, FRAME_SIDE, FRAME_SIDE), VisualGrid(0, FRAME_SIDE, FRAME_SIDE, prefix=1)],
    ]


def test_row_end_tokens_are_visual_tokens_of_their_row():
    """The rule: row-end tokens are ordinary candidates. They are in the visual mask and the pool (the report counts
    them), the engine may drop exactly them (the result is the unmodified model with those keys hidden from layers
    >= K, checked by the oracle), and with per_frame_keep they share their mosaic's group."""
    model = fresh(NEXT, "sdpa")
    inputs = batch_of(NEXT, (0,))
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    row_ends = _row_end_positions(start, rows=4, width=8)
    adapter = divico.registry.get_adapter(model)
    visual = adapter.visual_token_mask(inputs["input_ids"], None)
    assert bool(visual[0, row_ends].all()) and int(visual.sum()) == 52
    newline = model.model.image_newline
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER))
    captured = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert divico.last_report(model).num_visual.tolist() == [52]
    # The LLM input at exactly those positions is the model's image_newline.
    assert all(torch.equal(captured["embeds"][0, p], newline) for p in row_ends)
    # Per-frame groups: base grid 0, the mosaic (row ends included) 1.
    groups = adapter.visual_groups(inputs["input_ids"], visual, inputs)[0]
    assert groups[start:start + 16].tolist() == [0] * 16
    assert groups[start + 16:start + 52].tolist() == [1] * 36 and groups[row_ends].tolist() == [1] * 4


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_dropping_only_row_end_tokens_equals_the_masked_model(attn):
    """Keep every visual token but the row ends: the logits are the unmodified model's with the row-end keys hidden
    from layers >= K (positions unchanged)."""
    model = fresh(NEXT, attn)
    inputs = batch_of(NEXT, (0,))
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    row_ends = _row_end_positions(start, rows=4, width=8)
    length = ids.shape[0]
    with torch.no_grad():
        divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER))
        runtime = divico.get_runtime(model)
        keep = torch.ones(1, length, dtype=torch.bool)
        keep[0, row_ends] = False
        runtime.method.select = lambda scores, visual, groups, states=None: keep
        compressed = model(**inputs).logits
        assert divico.last_report(model).num_kept.tolist() == [52 - 4]
        divico.remove_compression(model)
        allowed = torch.ones(length, length, dtype=torch.bool).tril() & keep[0][None, :]
        mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
        layers = model.model.language_model.layers
        handles = [layers[i].register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "attention_mask": mask}), with_kwargs=True)
            for i in range(LAYER, len(layers))]
        oracle = model(**inputs).logits
        for handle in handles:
            handle.remove()
    rows = keep[0]
    torch.testing.assert_close(compressed[0, rows], oracle[0, rows], atol=1e-5, rtol=0)


def test_deco_pools_vision_features_before_the_projector_and_row_ends():
    """DeCo on a 20 x 40 image, computed independently from the vision tower: the base 4 x 4 grid pools to 2 x 2;
    the mosaic (two tiles side by side, 4 x 8 cells, token grid 4 x 9) to DeCo's 2 x 4 target: 2 rows of 3 pooled
    cells and a row end. The LLM input is projector(pool(features)) and image_newline."""
    model = tiny_llava_next()
    inputs = next_batch([next_prompt([(20, 40)], 4, 6, seed=1)])
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"][0, :3], output_hidden_states=True).hidden_states[-1]
        tiles = hidden[:, 1:].reshape(3, SIDE, SIDE, -1)  # CLS dropped ("default")
        projector = model.model.multi_modal_projector

        def pooled(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            return projector(F.adaptive_avg_pool2d(grid.permute(2, 0, 1)[None], size)[0].permute(1, 2, 0))

        base = pooled(tiles[0], (2, 2)).reshape(4, -1)
        mosaic = pooled(torch.cat([tiles[1], tiles[2]], dim=1), (2, 3))  # (2, 3, d)
        newline = model.model.image_newline.expand(2, 1, -1)
        expected = torch.cat([base, torch.cat([mosaic, newline], dim=1).reshape(8, -1)])
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_ratio=0.25))
    captured = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    report = divico.last_report(model)
    assert report.num_kept.tolist() == [12]
    assert report.extra["pooled_grids"] == [[VisualGrid(1, 2, 2), VisualGrid(1, 2, 4)]]
    shortened = captured["embeds"][0]  # 4 words, the image's 12 tokens, 1 + 6 words
    assert shortened.shape[0] == 4 + 12 + 7
    torch.testing.assert_close(shortened[4:16], expected, atol=1e-6, rtol=0)


def test_deco_and_divprune_on_onevision_items():
    """OneVision: each image of a multi-image sample pools its base grid and keeps its row end; each video frame
    (2 x 2 after the model's own downsampling) pools to 1 x 1 and the video keeps its row end."""
    inputs = batch_of(ONEVISION, (1,))
    for method in ("deco", "divprune"):
        model = fresh(ONEVISION, "sdpa")
        divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.25))
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        report = divico.last_report(model)
        # images: 2 x (4 + 1); video: 4 frames x 1 + 1 -> 15 of 51.
        assert report.num_visual.tolist() == [51] and report.num_kept.tolist() == [15], method
        assert out.cache.get_seq_length(0) == inputs["input_ids"].shape[1] - 36


@pytest.mark.parametrize("model_class", [NEXT, ONEVISION])
def test_per_frame_keep_keeps_the_contract(model_class):
    """per_frame_keep (groups: base grids, mosaics, frames; a video's row end in its last frame) through the checks,
    in forward and in generate() (whose prefill gets only the encoded images)."""
    for check in (check_keep_all, check_cached_decode, check_batch_equals_singles, check_oracle):
        check("fastv", model_class, "sdpa", per_frame_keep=True)


def test_onevision_video_row_end_joins_the_last_frame():
    model = fresh(ONEVISION, "sdpa")
    inputs = batch_of(ONEVISION, (1,))
    adapter = divico.registry.get_adapter(model)
    visual = adapter.visual_token_mask(inputs["input_ids"], None)
    groups = adapter.visual_groups(inputs["input_ids"], visual, inputs)[0]
    video = inputs["input_ids"][0] == model.config.video_token_id
    # Groups 0 and 1: the two images (base + row end each); 2..5: the frames, the row end with frame 5.
    assert groups[video].tolist() == [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [5]
    assert sorted(set(groups[visual[0] & ~video].tolist())) == [0, 1]


@pytest.mark.parametrize("method", ["deco", "divico"])
def test_lora_training_steps(method):
    """LoRA + DeCo (the loss reaches the projector through the pooled path) and LoRA + DiViCo (loss + KL reach
    g_theta): three steps change every trainable weight."""
    peft = pytest.importorskip("peft")
    model = tiny_llava_next()
    inputs = next_batch(next_prompts()[:2])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=r".*language_model.*\.(q|v)_proj"))
    divico.apply_compression(wrapped, divico.CompressionConfig(method, keep_ratio=0.25, layer=LAYER))
    runtime = divico.get_runtime(wrapped)
    trained = runtime.method.trainable_modules(runtime.adapter, runtime.compressor)
    for module in trained.values():
        module.requires_grad_(True)
    wrapped.train()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    before = {id(p): p.detach().clone() for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    for _ in range(3):
        loss = wrapped(**inputs, labels=labels).loss
        kl = divico.last_report(wrapped).kl
        if kl is not None:
            loss = loss + 0.1 * kl
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        for module in trained.values():
            assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())
        optimizer.step()
    assert trained and all(not torch.equal(before[id(p)], p) for p in trainable)


def test_errors_name_the_value():
    model = fresh(NEXT, "sdpa")
    inputs = batch_of(NEXT, (0,))
    adapter = divico.registry.get_adapter(model)
    visual = adapter.visual_token_mask(inputs["input_ids"], None)
    without_sizes = {key: value for key, value in inputs.items() if key != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        adapter.visual_grids(inputs["input_ids"], visual, without_sizes)
    with pytest.raises(TypeError, match="resolution-dependent"):
        adapter.tokens_per_image()
    # One pooled token for a 4 x 9 token grid leaves no column for the cells beside the row ends.
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=1))
    with pytest.raises(ValueError, match="4x9 token grid .* pools to 1x1"):
        with torch.no_grad():
            model(**inputs)
    divico.remove_compression(model)
    if "visionzip" in divico.available_methods():
        with pytest.raises(TypeError, match="'visionzip' needs vision_attention.*LlavaNextAdapter"):
            divico.apply_compression(model, divico.CompressionConfig("visionzip", keep_ratio=0.25))
        assert divico.get_runtime(model) is None
