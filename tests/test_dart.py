"""The ``dart`` method (issue 19, item 6) against a reference written here from the published algorithm.

Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(arXiv 2502.11494, 2025). Official code: github.com/ZichenWen1/DART, ``llava/model/language_model/
modeling_llama_self.py`` (``get_retained_image_token`` and the pruning block of ``DART_K_norm.forward``), read in a
fork's copy (xqy1111111/DART) and in LightCompress' ``llmc/compression/token_reduction/dart.py``, which hooks layer
K-1's attention to rebuild its keys *after RoPE*. The reference below follows that code step by step on one sample:

* ``K_states``: layer K-1's ``k_proj(input_layernorm(h))``, RoPE'd with the layer's own (cos, sin) (rebuilt here
  with transformers' ``apply_rotary_pos_emb``, not with the engine's capture), heads concatenated;
* ``last_layer_state = norm(layer K-1's output)``, the text model's final norm;
* pivots: ``topk`` of the keys' L1 norm among the image tokens (4) and among the tokens after the image (4);
* ``TOKEN_TOPK = int(k // 8)``; for each pivot, ``(-cosine_similarity).topk(TOKEN_TOPK)`` over the still-valid image
  tokens, which then leave the valid set; kept = image pivots + chosen tokens (text pivots dropped from the set).

The one documented difference: the official loop runs over a Python ``set``; divico (and this reference) take the
pivots in ascending position. FLOPs: DART = random with the same kept count plus exactly one (8, d) x (d, N)
similarity product per sample (FlopCounterMode), as :func:`divico.efficiency.count_flops` says.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import divico
from contract_cases import one_torch_thread
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, count_flops, measure_flops
from divico.registry import get_method_class, trainable_methods
from tiny_models import IMAGE_TOKEN_ID, llava_batch, llava_prompt, tiny_llava

LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def llava() -> Any:
    return tiny_llava(seed=0)


def dart_config(**options: Any) -> divico.CompressionConfig:
    keep = {} if "keep_ratio" in options else {"keep_tokens": 16}
    return divico.CompressionConfig(**{"method": "dart", **keep, "layer": LAYER, **options})


def official_reference(model: Any, inputs: dict[str, torch.Tensor], keep: int, pivot_image: int = 4,
                       pivot_text: int = 4) -> list[int]:
    """Kept image positions of one sample (batch 1), following the official ``get_retained_image_token``."""
    language_model = model.model.language_model
    captured: dict[str, Any] = {}

    def grab_layer_input(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        captured["rope"] = kwargs["position_embeddings"]

    def grab_next_input(module, args, kwargs):
        captured["state"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handles = [language_model.layers[LAYER - 1].register_forward_pre_hook(grab_layer_input, with_kwargs=True),
               language_model.layers[LAYER].register_forward_pre_hook(grab_next_input, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    layer = language_model.layers[LAYER - 1]
    attention = layer.self_attn
    with torch.no_grad():
        key = attention.k_proj(layer.input_layernorm(captured["h"]))
        key = key.view(1, key.shape[1], -1, attention.head_dim).transpose(1, 2)
        cos, sin = captured["rope"]
        _, key = apply_rotary_pos_emb(key, key, cos, sin)
        last_layer_state = language_model.norm(captured["state"])
    k_states = key.permute(0, 2, 1, 3).reshape(1, key.shape[2], -1)
    image = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    start, length = int(image[0]), image.numel()
    assert torch.equal(image, torch.arange(start, start + length))  # one contiguous run, as the official code needs
    token_topk = int(keep // (pivot_image + pivot_text))
    image_l1 = torch.norm(k_states[0][start:start + length], p=1, dim=-1)
    query_l1 = torch.norm(k_states[0][start + length:], p=1, dim=-1)
    image_indices = (image_l1.topk(pivot_image).indices + start).tolist()
    query_indices = (query_l1.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    for item in sorted(indices_set):
        valid_list = sorted(valid_indices)
        cos_sim = -F.cosine_similarity(last_layer_state[0][item, :], last_layer_state[0][valid_list, :], dim=-1)
        chosen = [valid_list[i] for i in cos_sim.topk(token_topk).indices.tolist()]
        indices_set.update(chosen)
        valid_indices.difference_update(chosen)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def kept_positions(model: Any, inputs: dict[str, torch.Tensor], config: divico.CompressionConfig) -> list[list[int]]:
    divico.apply_compression(model, config)
    try:
        with torch.no_grad():
            model(**inputs)
        report = divico.last_report(model)
    finally:
        divico.remove_compression(model)
    assert torch.isnan(report.scores).all()  # attention-free: nothing scored
    return [[int(p) for p in row if p >= 0] for row in report.kept_positions]


@pytest.mark.parametrize(("keep", "text_after"), [(16, 7), (24, 9), (40, 5)])
def test_dart_keeps_the_official_set(llava, keep, text_after):
    inputs = llava_batch([llava_prompt(1, 5, text_after, seed=keep)])
    kept = kept_positions(llava, inputs, dart_config(keep_tokens=keep))[0]
    expected = official_reference(llava, inputs, keep)
    assert kept == expected
    assert len(kept) == 4 + 8 * (keep // 8)  # the official count: image pivots + 8 pivots x TOKEN_TOPK


def test_dart_batch_equals_singles_and_count_rule(llava):
    prompts = [llava_prompt(1, 5, 7, seed=1), llava_prompt(2, 3, 4, seed=2), llava_prompt(0, 9, 6, seed=3)]
    batched = kept_positions(llava, llava_batch(prompts), dart_config(keep_ratio=0.25))
    padding = [llava_batch(prompts)["input_ids"].shape[1] - len(p["ids"]) for p in prompts]
    for row, prompt in enumerate(prompts[:2]):
        alone = kept_positions(llava, llava_batch([prompt]), dart_config(keep_ratio=0.25))[0]
        assert [p - padding[row] for p in batched[row]] == alone
    method = get_method_class("dart")(dart_config(keep_ratio=0.25))
    # 64 tokens: k = 16 -> 4 + 8 * 2; 128 tokens (one pool): k = 32 -> 4 + 8 * 4; 16 tokens: k = 4 -> the pivots.
    assert [len(batched[0]), len(batched[1])] == [20, 36] == [method.kept_visual_tokens(1, 64),
                                                           method.kept_visual_tokens(2, 64)]
    assert method.kept_visual_tokens(1, 16) == 4
    assert get_method_class("dart")(dart_config(keep_ratio=1.0)).kept_visual_tokens(1, 64) == 64  # saturates


def test_dart_text_pivots_count_and_options(llava):
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=4)])
    # No text pivots: only image pivots choose, 2 x floor(16 / 2) = 16 tokens besides the 2 pivots.
    kept = kept_positions(llava, inputs, dart_config(extra={"pivot_image_tokens": 2, "pivot_text_tokens": 0}))[0]
    assert kept == official_reference(llava, inputs, 16, pivot_image=2, pivot_text=0)
    assert len(kept) == 2 + 16
    for extra, message in [({"pivot_image_tokens": -1}, "pivot_image_tokens"), ({"pivot_text_tokens": 1.5},
                           "pivot_text_tokens"), ({"pivot_image_tokens": 0, "pivot_text_tokens": 0}, ">= 1"),
                           ({"pivots": 3}, "unknown")]:
        with pytest.raises(ValueError, match=message):
            get_method_class("dart")(dart_config(extra=extra))
    assert "dart" in trainable_methods()  # through LoRA, like FastV
    assert get_method_class("dart").needs_scores is False


def test_dart_per_frame_keep_gives_each_image_its_pivots(llava):
    inputs = llava_batch([llava_prompt(2, 3, 6, seed=5)])
    kept = kept_positions(llava, inputs, dart_config(keep_tokens=8, per_frame_keep=True))[0]
    image = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    first, second = set(image[:64].tolist()), set(image[64:].tolist())
    assert len(first & set(kept)) == len(second & set(kept)) == 4 + 8 * 1


# --- FLOPs -----------------------------------------------------------------------------------------------------
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


def test_dart_flops_are_random_plus_the_similarity_product():
    with one_torch_thread():
        config = build_config("tiny-llava")
        model = build_random_model(config, seed=0)
        inputs = build_inputs(config, TINY_PROMPT, seed=0)
        batch, length = inputs["input_ids"].shape
        dart_cfg = divico.CompressionConfig("dart", keep_tokens=16, layer=LAYER)
        random_cfg = divico.CompressionConfig("random", keep_tokens=20, layer=LAYER)  # DART keeps 4 + 8 * 2 = 20
        measured = {}
        for name, cfg in (("dart", dart_cfg), ("random", random_cfg)):
            divico.apply_compression(model, cfg)
            try:
                with torch.inference_mode():
                    measured[name], _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
                assert divico.last_report(model).num_kept.tolist() == [20, 20]
            finally:
                divico.remove_compression(model)
        hidden = model.model.language_model.config.hidden_size
        similarity = batch * 2 * 8 * hidden * length  # 8 pivots against every token, per sample
        assert measured["dart"] - measured["random"] == similarity
        analytic = count_flops(config, TINY_PROMPT, compression=dart_cfg, attention="dense")
        analytic_random = count_flops(config, TINY_PROMPT, compression=random_cfg, attention="dense")
        assert analytic.keep_tokens == 20 and analytic.per_layer == analytic_random.per_layer
        assert analytic.compressor == similarity and analytic.scoring == 0
        assert analytic.total - analytic_random.total == measured["dart"] - measured["random"]


def test_dart_teacher_forcing_keeps_the_inference_set(llava):
    """With labels the text pivots come from the prompt only (up to the last prompt token), not from the answer."""
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1)])
    alone = kept_positions(llava, inputs, dart_config())
    answer = torch.tensor([[5, 6, 7]])
    extended = {"input_ids": torch.cat([inputs["input_ids"], answer], dim=1),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1),
                "pixel_values": inputs["pixel_values"]}
    prompt_length = inputs["input_ids"].shape[1]
    labels = extended["input_ids"].masked_fill(torch.arange(extended["input_ids"].shape[1]) < prompt_length, -100)
    divico.apply_compression(llava, dart_config())
    try:
        with torch.no_grad():
            llava(**extended, labels=labels)
        report = divico.last_report(llava)
    finally:
        divico.remove_compression(llava)
    assert [[int(p) for p in row if p >= 0] for row in report.kept_positions] == alone
