"""VisionZip (issue 19 item 4) against a reference written from the published algorithm.

Reference: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025;
official code github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip
.forward``) and ``visionzip/utils.py`` (``CLIPAttention_forward`` returns the layer's keys, mean over heads, as the
merge metric). :func:`official_visionzip` below follows ``CLIPVisionTower_VisionZip.forward`` step by step on the
*eager* attention weights (``output_attentions=True``) and hidden states of the layer the projector reads, which is
what the official code reads; divico computes the attention itself from q/k captured on an SDPA tower.

Checked: the projector's input on the tiny LLaVA (images: [CLS] inserted) and Video-LLaVA (frames: their [CLS]
prefix kept) equals the reference, the 54 + 10 split scaled as the paper's settings, Qwen2-VL's "attention received"
dominance against eager attention weights recorded from the tower, batch = singles and cached decode = uncached on a
variant outside the contract matrix, and FLOPs = FlopCounterMode.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers.models.qwen2_vl.modeling_qwen2_vl as qwen2_vl_modeling

import divico
from contract_cases import check_batch_equals_singles, check_cached_decode, one_torch_thread
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, count_flops, measure_flops
from divico.methods.visionzip import cls_tower_overhead_flops, contextual_count
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


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def official_visionzip(hidden: torch.Tensor, attention: torch.Tensor, metric: torch.Tensor, dominant_num: int,
                       contextual_num: int) -> torch.Tensor:
    """``CLIPVisionTower_VisionZip.forward`` after the tower: (B, 1 + P, d) -> (B, 1 + dominant_num + C, d)."""
    cls_attention = attention[:, :, 0, 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(hidden.shape[0], dominant_num + 1, hidden.shape[2])
    metric_filtered = metric[mask].view(hidden.shape[0], hidden.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(
        hidden.shape[0], hidden.shape[1] - (dominant_num + 1), hidden.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(similarity.shape[0], similarity.shape[1], contextual_num, dtype=hidden.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, others, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


def eager_layer_outputs(tower: torch.nn.Module, pixels: torch.Tensor, feature_layer: int) -> tuple[torch.Tensor, ...]:
    """Hidden states, eager attention weights and mean-over-heads keys of the layer the projector reads."""
    layers = tower.encoder.layers  # transformers 5: CLIPVisionModel holds the encoder itself
    layer = layers[feature_layer - 1 if feature_layer > 0 else len(layers) + feature_layer]
    keys: list[torch.Tensor] = []
    handle = layer.self_attn.k_proj.register_forward_hook(lambda module, args, output: keys.append(output))
    try:
        with torch.no_grad():
            out = tower(pixels, output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    heads = layer.self_attn.num_heads
    key = keys[0].view(keys[0].shape[0], keys[0].shape[1], heads, -1).transpose(1, 2)  # (B, H, S, hd), as the official
    return out.hidden_states[feature_layer], out.attentions[feature_layer], key.mean(1)


def projector_inputs(
    model: Any, inputs: dict[str, torch.Tensor], config: divico.CompressionConfig
) -> list[torch.Tensor]:
    """What the projector receives under compression (hooked after divico's own pre-hook)."""
    divico.apply_compression(model, config)
    seen: list[torch.Tensor] = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        divico.remove_compression(model)
    return seen


def test_split_scales_the_papers_settings():
    assert [(k - contextual_count(k), contextual_count(k)) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert contextual_count(1) == 0 and contextual_count(16) == 2


def test_llava_projector_input_equals_the_official_algorithm():
    model = tiny_llava(seed=0)  # SDPA vision tower: divico captures q/k
    eager = tiny_llava(seed=0, attn_implementation="eager")
    inputs = llava_batch([llava_prompt(2, 3, 4, seed=2)])
    hidden, attention, metric = eager_layer_outputs(
        eager.model.vision_tower, inputs["pixel_values"], eager.config.vision_feature_layer)
    keep = 16  # of 64 patches: 14 dominant ([CLS] + 13 patches) + 2 contextual
    expected = official_visionzip(hidden, attention, metric, dominant_num=keep - contextual_count(keep) - 1,
                                  contextual_num=contextual_count(keep))
    seen = projector_inputs(model, inputs, divico.CompressionConfig("visionzip", keep_tokens=keep))
    assert seen[0].shape == (2, keep, hidden.shape[-1])
    torch.testing.assert_close(seen[0], expected, atol=1e-4, rtol=1e-4)  # SDPA vs eager tower


def test_video_llava_frames_keep_their_cls_prefix_and_equal_the_official_algorithm():
    model = tiny_video_llava()
    eager = tiny_video_llava(attn="eager")
    inputs = video_llava_batch([video_llava_prompt(0, 1, seed=1)])  # 4 frames of [CLS] + 4 x 4 patches
    frames = inputs["pixel_values_videos"].flatten(0, 1)
    hidden, attention, metric = eager_layer_outputs(eager.model.video_tower, frames, eager.config.vision_feature_layer)
    keep = 5  # [CLS] + 3 dominant patches + 1 contextual
    expected = official_visionzip(hidden, attention, metric, dominant_num=keep - contextual_count(keep) - 1,
                                  contextual_num=contextual_count(keep))
    seen = projector_inputs(model, inputs, divico.CompressionConfig("visionzip", keep_tokens=keep))
    torch.testing.assert_close(seen[0], expected, atol=1e-4, rtol=1e-4)  # SDPA vs eager tower


def test_qwen2_vl_dominance_is_the_attention_received(monkeypatch):
    """Dominant tokens without [CLS]: the merged tokens whose patches receive the most eager attention."""
    model = tiny_qwen("qwen2_vl", attn="eager")
    recorded: list[torch.Tensor] = []
    original = qwen2_vl_modeling.eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        output, weights = original(module, query, key, value, attention_mask, **kwargs)
        if isinstance(module, qwen2_vl_modeling.VisionAttention):
            recorded.append(weights.detach())
        return output, weights

    monkeypatch.setattr(qwen2_vl_modeling, "eager_attention_forward", recording)
    inputs = qwen_batch([qwen_prompt([qwen_item("image", 1, 8, 8, seed=1)], 4, 20, seed=1)])  # 4 x 4 merged tokens
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    assert len(recorded) == 1  # one block, one frame: (1, H, 64, 64) over the 8 x 8 patches
    received = recorded[0][0].mean(dim=(0, 1)).view(16, 4).mean(dim=1)  # per merged token (2 x 2 patches)
    keep = 8  # 7 dominant + 1 contextual
    dominant = received.topk(keep - contextual_count(keep)).indices.sort().values
    recorded.clear()
    divico.apply_compression(model, divico.CompressionConfig("visionzip", keep_tokens=keep))
    embeds: list[torch.Tensor] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"].detach()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    ids = inputs["input_ids"][0]
    start = int((ids == model.config.image_token_id).nonzero()[0])
    torch.testing.assert_close(embeds[0][0, start:start + 7], features[dominant], atol=1e-5, rtol=1e-5)
    assert not torch.isin(embeds[0][0, start + 7], features).all()  # the contextual token is a merge


def test_batch_equals_singles_and_cached_decode_with_keep_tokens():
    check_batch_equals_singles("visionzip", "LlavaForConditionalGeneration", "sdpa", keep_ratio=None, keep_tokens=12)
    check_cached_decode("visionzip", "Qwen2_5_VLForConditionalGeneration", "sdpa", keep_ratio=None, keep_tokens=3)


def test_a_keep_count_that_leaves_only_the_cls_prefix_is_refused():
    model = tiny_video_llava()
    divico.apply_compression(model, divico.CompressionConfig("visionzip", keep_tokens=1))
    with pytest.raises(ValueError, match="no\npatch token|no patch token"), torch.no_grad():
        model(**video_llava_batch([video_llava_prompt(0, 1, seed=1)]))


# --- FLOPs ---------------------------------------------------------------------------------------------------
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


def test_flops_equal_flop_counter_mode():
    config = build_config("tiny-llava")
    model = build_random_model(config, seed=0)
    inputs = build_inputs(config, TINY_PROMPT, seed=0)
    compression = divico.CompressionConfig("visionzip", keep_tokens=9)

    def counted(with_compression: bool) -> int:
        if with_compression:
            divico.apply_compression(model, compression)
        try:
            with torch.inference_mode():
                flops, _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
        finally:
            divico.remove_compression(model)
        return flops

    none, zipped = counted(False), counted(True)
    vision = model.config.vision_config
    heads = vision.num_attention_heads
    overhead = TINY_PROMPT.batch_size * cls_tower_overhead_flops(
        images=2, patches=36, heads=heads, head_dim=vision.hidden_size // heads, hidden=vision.hidden_size, keep=9)
    analytic = count_flops(config, TINY_PROMPT, compression=compression, attention="dense")
    analytic_none = count_flops(config, TINY_PROMPT, method="none", attention="dense")
    # count_flops has no vision sizes for the method's own products in the tower: they are added here.
    assert analytic_none.total - analytic.total - overhead == none - zipped
    assert analytic.per_layer[0] == TINY_PROMPT.seq_len - 2 * (36 - 9)
