"""DivPrune (issue 19 item 7) against a reference written from the published algorithm.

Reference: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025;
official code github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py`` (``pairwise_cosine_similarity``,
``DivPrune``, and its call in ``prepare_inputs_labels_for_multimodal``): the distance is ``1 - cosine`` of the
*projected* visual tokens, the first token maximises the distance to its nearest other token, each next one the
distance to its nearest selected token, and the kept tokens stay in their original order. :func:`official_divprune`
below follows that function line by line (the full distance matrix, ``index_select`` of the selected rows and a
``min`` over them at every step), independently of divico's incremental version.

Checked here: the kept set on random features and on the tiny LLaVA / Qwen2-VL (the LLM's visual rows are exactly
the reference's rows of the uncompressed projector output, per image / frame; on Qwen2-VL each kept token keeps its
original mRoPE position), the same kept rows in a batch and alone, cached decode = uncached forward (a variant
outside the contract matrix), and FLOPs = FlopCounterMode.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import divico
from contract_cases import check_batch_equals_singles, check_cached_decode, one_torch_thread
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, count_flops, measure_flops
from divico.methods.divprune import divprune_indices
from tiny_models import (
    IMAGE_TOKEN_ID,
    llava_batch,
    llava_prompt,
    qwen_batch,
    qwen_item,
    qwen_prompt,
    tiny_llava,
    tiny_qwen,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def official_divprune(features: torch.Tensor, count: int) -> list[int]:
    """The official ``DivPrune`` loop (llava_arch.py), with ``threshold_terms = count``; sorted kept indices."""
    norm = features / features.norm(dim=1, keepdim=True)
    cosine = 1.0 - torch.mm(norm, norm.t())
    selected = torch.empty(count, dtype=torch.long)
    for i in range(count):
        if i == 0:
            scores = torch.topk(cosine, 2, dim=0, largest=False).values[1, :]
        else:
            rows = torch.index_select(cosine, 0, torch.index_select(selected, 0, torch.arange(0, i)))
            scores = torch.min(rows, dim=0).values
        selected[i] = torch.argmax(scores)
    return sorted(selected.tolist())


@pytest.mark.parametrize("tokens,count", [(64, 16), (30, 7), (5, 5), (9, 1)])
def test_selection_equals_the_official_loop(tokens, count):
    features = torch.randn(tokens, 12, generator=torch.Generator().manual_seed(tokens + count))
    assert sorted(divprune_indices(features, count).tolist()) == official_divprune(features, count)


def test_selection_prefers_diverse_tokens():
    # Three clusters of near-duplicates: three picks take one token of each cluster.
    base = torch.eye(3, 8)
    noise = 1e-3 * torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    features = base.repeat_interleave(4, dim=0) + noise
    assert sorted(i // 4 for i in divprune_indices(features, 3).tolist()) == [0, 1, 2]


def _projector_outputs(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs: list[torch.Tensor] = []
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: outputs.append(output.detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return outputs[0]


def _llm_inputs(model: Any, inputs: dict[str, torch.Tensor], language_model: torch.nn.Module) -> torch.Tensor:
    embeds: list[torch.Tensor] = []
    handle = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return embeds[0]


def test_llava_keeps_the_reference_rows_of_the_projected_tokens_per_image():
    model = tiny_llava(seed=0)
    inputs = llava_batch([llava_prompt(2, 3, 4, seed=2)])  # two images of 8 x 8 patches
    projected = _projector_outputs(model, inputs)  # (2, 64, d): the uncompressed projector output
    divico.apply_compression(model, divico.CompressionConfig("divprune", keep_tokens=10))
    embeds = _llm_inputs(model, inputs, model.model.language_model)
    report = divico.last_report(model)
    assert report.num_kept.tolist() == [20] and report.num_visual.tolist() == [128]
    expected = torch.cat([projected[image, official_divprune(projected[image], 10)] for image in range(2)])
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    # Each image's kept tokens fill the first slots of its placeholder run; one text token separates the images.
    got = torch.cat([embeds[0, start:start + 10], embeds[0, start + 11:start + 21]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert embeds.shape[1] == ids.shape[0] - 2 * (64 - 10)
    # The report's kept positions are the first 10 slots of each run, in the original prompt's numbering.
    kept = report.kept_positions[0][report.kept_positions[0] >= 0].tolist()
    assert kept == list(range(start, start + 10)) + list(range(start + 65, start + 75))


def test_qwen2_vl_keeps_the_reference_rows_per_frame():
    model = tiny_qwen("qwen2_vl")
    inputs = qwen_batch([qwen_prompt([qwen_item("image", 1, 4, 12, seed=2), qwen_item("video", 2, 4, 8, seed=3)],
                                     2, 12, seed=2)])
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        video = model.model.get_video_features(inputs["pixel_values_videos"],
                                               inputs["video_grid_thw"]).pooler_output[0]
    # Merged-token grids: the image 2 x 6 (12 tokens), the video 2 frames of 2 x 4 (8 tokens each).
    keep = {12: 3, 8: 2}  # keep_ratio 0.25 of each frame
    divico.apply_compression(model, divico.CompressionConfig("divprune", keep_ratio=0.25))
    shortened: list[torch.Tensor] = []  # the prompt ids the model itself receives
    positions: list[torch.Tensor] = []  # the mRoPE positions the language model receives
    handles = [model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shortened.append(kwargs["input_ids"]), with_kwargs=True),
        model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["position_ids"][-3:]), with_kwargs=True)]
    try:
        embeds = _llm_inputs(model, inputs, model.model.language_model)
    finally:
        for handle in handles:
            handle.remove()
    expected = [image[official_divprune(image, keep[12])]]
    for frame in video.view(2, 8, -1):
        expected.append(frame[official_divprune(frame, keep[8])])
    config = model.config
    row, compressed_ids = embeds[0], shortened[0][0]
    assert int((compressed_ids == config.image_token_id).sum()) == 3
    assert int((compressed_ids == config.video_token_id).sum()) == 4
    got = [row[compressed_ids == config.image_token_id], row[compressed_ids == config.video_token_id]]
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], torch.cat(expected[1:]), atol=1e-6, rtol=0)
    # Every kept token keeps its original (t, h, w) position, text included: the model's own get_rope_index on the
    # uncompressed prompt, at the reference's kept cells.
    original, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs.get("mm_token_type_ids"), attention_mask=inputs["attention_mask"],
        image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"])
    ids = inputs["input_ids"][0]
    image_start = int((ids == config.image_token_id).nonzero()[0])
    video_start = int((ids == config.video_token_id).nonzero()[0])
    kept = [image_start + i for i in official_divprune(image, keep[12])]
    kept += [video_start + 8 * f + i for f, frame in enumerate(video.view(2, 8, -1))
             for i in official_divprune(frame, keep[8])]
    text = (ids != config.image_token_id) & (ids != config.video_token_id)
    expected_positions = original[:, 0, sorted(kept + text.nonzero().flatten().tolist())]
    assert torch.equal(positions[0][:, 0], expected_positions)


def test_batch_equals_singles_and_cached_decode_with_keep_tokens():
    # A variant outside the matrix (fixed count per image / frame); the checks are the contract's.
    check_batch_equals_singles("divprune", "VideoLlavaForConditionalGeneration", "sdpa", keep_ratio=None, keep_tokens=5)
    check_cached_decode("divprune", "Qwen2VLForConditionalGeneration", "eager", keep_ratio=None, keep_tokens=2)


def test_keep_tokens_beyond_one_grid_is_refused():
    model = tiny_llava(seed=0)
    divico.apply_compression(model, divico.CompressionConfig("divprune", keep_tokens=65))
    with pytest.raises(ValueError, match="exceeds the 64 tokens"), torch.no_grad():
        model(**llava_batch([llava_prompt(1, 3, 4, seed=1)]))


# --- FLOPs ---------------------------------------------------------------------------------------------------
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


def test_flops_equal_flop_counter_mode():
    config = build_config("tiny-llava")
    model = build_random_model(config, seed=0)
    inputs = build_inputs(config, TINY_PROMPT, seed=0)
    compression = divico.CompressionConfig("divprune", keep_tokens=9)

    def counted(with_compression: bool) -> int:
        if with_compression:
            divico.apply_compression(model, compression)
        try:
            with torch.inference_mode():
                flops, _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
        finally:
            divico.remove_compression(model)
        return flops

    none, pruned = counted(False), counted(True)
    analytic = count_flops(config, TINY_PROMPT, compression=compression, attention="dense")
    analytic_none = count_flops(config, TINY_PROMPT, method="none", attention="dense")
    d = model.config.text_config.hidden_size
    # 2 samples x 2 images of 36 tokens: one (36, d) x (d, 36) cosine product each; the projector maps all tokens.
    assert analytic.compressor == 4 * 2 * 36 * 36 * d
    assert analytic.projector == analytic_none.projector
    assert analytic_none.total - analytic.total == none - pruned


def test_identical_tokens_are_each_selected_once():
    """Tokens that tie at distance 0 (duplicates) are never selected twice: the selection is a set of distinct
    indices even when every remaining token equals a selected one."""
    base = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    features = torch.cat([base, base, base[:1].repeat(4, 1)])  # 10 tokens, only 3 distinct
    for count in range(1, 11):
        chosen = divprune_indices(features, count)
        assert len(set(chosen.tolist())) == count
