"""The ``random`` and ``pooling`` methods (issue 19, items 1 and 2), against references computed here.

* ``random``: the kept set is, per sample, ``torch.randperm(Nv, generator=Generator().manual_seed(seed))[:k]``
  of the sample's visual tokens in prompt order (the documented draw, rebuilt here from the prompt alone); the same
  in a left-padded batch and alone; the same for the same seed, different for another; ``keep_count`` tokens kept
  (per image with ``per_frame_keep``); no scores computed, so its FLOPs are FastV's minus exactly the scoring
  product (FlopCounterMode), as :func:`divico.efficiency.count_flops` says.
* ``pooling``: acts, as DeCo does, on the vision features *before* the projector: the projector's input is
  ``F.adaptive_avg_pool2d`` of the uncompressed vision features on DeCo's near-square grid, and the LLM's visual
  rows are the projector applied by hand to those pooled features. Nothing is trained (the untrained projector
  gives DeCo's logits exactly). FLOPs saved = the shorter projector and layers (FlopCounterMode, exact).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import divico
from contract_cases import one_torch_thread
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, count_flops, measure_flops
from divico.methods.deco import pooled_grid
from divico.registry import get_method_class, trainable_methods
from tiny_models import IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, llava_batch, llava_prompt, tiny_llava

LAYER = 2
SPECS = [(1, 5, 7, 1), (2, 3, 4, 2), (0, 9, 6, 3)]  # (images, text before, text after, seed): padding, 2 pools, none


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def llava() -> Any:
    return tiny_llava(seed=0)


def kept_per_sample(model: Any, inputs: dict[str, torch.Tensor], config: divico.CompressionConfig) -> list[list[int]]:
    """Kept visual tokens of each sample, as ranks among the sample's own visual tokens (padding-independent)."""
    if not bool((inputs["input_ids"] == IMAGE_TOKEN_ID).any()):
        return [[] for _ in range(inputs["input_ids"].shape[0])]  # nothing to compress: no report
    divico.apply_compression(model, config)
    try:
        with torch.no_grad():
            model(**inputs)
        report = divico.last_report(model)
    finally:
        divico.remove_compression(model)
    ranks = []
    for row in range(inputs["input_ids"].shape[0]):
        visual = (inputs["input_ids"][row] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
        kept = [int(p) for p in report.kept_positions[row] if p >= 0]
        assert len(set(kept)) == len(kept) == int(report.num_kept[row]) and set(kept) <= set(visual)
        ranks.append(sorted(visual.index(p) for p in kept))
    return ranks


def reference_draw(num_visual: int, keep: int, seed: int) -> list[int]:
    """The documented draw, from scratch: a fresh generator per sample, ``randperm`` over its visual tokens."""
    if num_visual == 0:
        return []
    return sorted(torch.randperm(num_visual, generator=torch.Generator().manual_seed(seed))[:keep].tolist())


def random_config(seed: int | None = None, **options: Any) -> divico.CompressionConfig:
    extra = {} if seed is None else {"seed": seed}
    return divico.CompressionConfig(**{"method": "random", "keep_ratio": 0.25, "layer": LAYER, "extra": extra,
                                       **options})


# --- random --------------------------------------------------------------------------------------------------
def test_random_keeps_the_documented_draw_in_a_batch_and_alone(llava):
    prompts = [llava_prompt(*spec) for spec in SPECS]
    batched = kept_per_sample(llava, llava_batch(prompts), random_config(seed=5))
    alone = [kept_per_sample(llava, llava_batch([prompt]), random_config(seed=5))[0] for prompt in prompts]
    assert batched == alone
    for (images, *_), kept in zip(SPECS, batched):
        num_visual = images * TOKENS_PER_IMAGE
        keep = max(1, round(0.25 * num_visual)) if num_visual else 0
        assert len(kept) == keep
        assert kept == reference_draw(num_visual, keep, seed=5)


def test_random_same_seed_same_draw_other_seed_other_draw(llava):
    inputs = llava_batch([llava_prompt(2, 3, 4, seed=2)])  # 128 visual tokens, 32 kept
    first = kept_per_sample(llava, inputs, random_config(seed=0))
    assert kept_per_sample(llava, inputs, random_config(seed=0)) == first
    assert kept_per_sample(llava, inputs, random_config()) == first  # default seed 0
    other = kept_per_sample(llava, inputs, random_config(seed=1))
    assert other != first and len(other[0]) == len(first[0]) == 32
    assert other == [reference_draw(128, 32, seed=1)]


def test_random_per_frame_keep_draws_each_image_in_turn(llava):
    inputs = llava_batch([llava_prompt(2, 3, 4, seed=2)])
    kept = kept_per_sample(llava, inputs, random_config(seed=3, keep_ratio=None, keep_tokens=5, per_frame_keep=True))[0]
    generator = torch.Generator().manual_seed(3)  # one generator per sample, image after image
    expected = [int(i) for i in torch.randperm(TOKENS_PER_IMAGE, generator=generator)[:5]]
    expected += [TOKENS_PER_IMAGE + int(i) for i in torch.randperm(TOKENS_PER_IMAGE, generator=generator)[:5]]
    assert kept == sorted(expected)


def test_random_computes_no_scores(llava):
    divico.apply_compression(llava, random_config(seed=0))
    try:
        assert divico.get_runtime(llava).scorer is None
        with torch.no_grad():
            llava(**llava_batch([llava_prompt(1, 5, 7, seed=1)]))
        assert torch.isnan(divico.last_report(llava).scores).all()
    finally:
        divico.remove_compression(llava)
    assert "random" in trainable_methods()  # through LoRA, like FastV


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_random_rejects_a_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        get_method_class("random")(random_config(seed=seed))


# --- pooling -------------------------------------------------------------------------------------------------
def pre_hook(store: list[torch.Tensor]):
    return lambda module, args: store.append(args[0].detach().clone())


@pytest.mark.parametrize("keep_tokens", [16, 12])  # 8 x 8 -> 4 x 4, and to the non-square 3 x 4
def test_pooling_is_adaptive_average_pooling_before_the_projector(llava, keep_tokens):
    projector = llava.model.multi_modal_projector
    inputs = llava_batch([llava_prompt(2, 3, 4, seed=2)])
    features: list[torch.Tensor] = []
    handle = projector.register_forward_pre_hook(pre_hook(features))
    with torch.no_grad():
        llava(**inputs)  # uncompressed: the projector sees all 2 x 64 patch features
    handle.remove()
    pooled: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    divico.apply_compression(llava, divico.CompressionConfig("pooling", keep_tokens=keep_tokens))
    handles = [projector.register_forward_pre_hook(pre_hook(pooled)),
               llava.model.language_model.register_forward_pre_hook(
                   lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"].detach().clone()),
                   with_kwargs=True)]
    try:
        with torch.no_grad():
            llava(**inputs)
        report = divico.last_report(llava)
    finally:
        for handle in handles:
            handle.remove()
        divico.remove_compression(llava)
    h, w = pooled_grid(keep_tokens, 8, 8)
    assert h * w == keep_tokens and (h == w) == (keep_tokens == 16)
    assert report.num_kept.tolist() == [2 * keep_tokens]
    grid = features[0].reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.adaptive_avg_pool2d(grid, (h, w)).permute(0, 2, 3, 1).reshape(2, h * w, -1)
    torch.testing.assert_close(pooled[0], expected, atol=1e-6, rtol=1e-6)
    # The LLM's visual rows: the (untrained) projector applied by hand to the pooled features, in grid order.
    assert embeds[0].shape[1] == inputs["input_ids"].shape[1] - 2 * (TOKENS_PER_IMAGE - keep_tokens)
    with torch.no_grad():
        projected = projector.linear_2(projector.act(projector.linear_1(expected))).reshape(2 * h * w, -1)
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    first, between = embeds[0][0][start:start + h * w], embeds[0][0][start + h * w + 1:start + 2 * h * w + 1]
    torch.testing.assert_close(torch.cat([first, between]), projected, atol=1e-5, rtol=1e-5)


def test_pooling_is_deco_with_the_projector_as_is(llava):
    inputs = llava_batch([llava_prompt(*spec) for spec in SPECS])
    logits = {}
    for method in ("pooling", "deco"):
        divico.apply_compression(llava, divico.CompressionConfig(method, keep_tokens=9))
        try:
            with torch.no_grad():
                logits[method] = llava(**inputs).logits
        finally:
            divico.remove_compression(llava)
    assert torch.equal(logits["pooling"], logits["deco"])
    method = get_method_class("pooling")(divico.CompressionConfig("pooling", keep_tokens=9))
    assert method.trainable_modules(divico.registry.get_adapter(llava), None) == {}
    assert "pooling" not in trainable_methods() and "deco" in trainable_methods()


# --- FLOPs: the method's accounting vs FlopCounterMode ----------------------------------------------------------
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, dict[str, torch.Tensor]]:
    config = build_config("tiny-llava")
    model = build_random_model(config, seed=0)
    return config, model, build_inputs(config, TINY_PROMPT, seed=0)


def counted(model: Any, inputs: dict[str, torch.Tensor], config: divico.CompressionConfig | None) -> int:
    if config is not None:
        divico.apply_compression(model, config)
    try:
        with torch.inference_mode():
            flops, _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
    finally:
        divico.remove_compression(model)
    return flops


def linear_flops(module: torch.nn.Linear, rows: int) -> int:
    return 2 * rows * module.in_features * module.out_features


def decoder_layer_flops(model: Any, tokens: int) -> int:
    """One Llama decoder layer on ``tokens`` tokens of one sample: its linears plus dense SDPA (2 x 2 x head_dim
    per query head and key)."""
    layer = model.model.language_model.layers[0]
    attention = layer.self_attn
    linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    heads = attention.config.num_attention_heads
    return sum(linear_flops(m, tokens) for m in linears) + 4 * heads * attention.head_dim * tokens * tokens


def test_random_is_fastv_without_the_scoring_product(tiny):
    config, model, inputs = tiny
    batch, length = inputs["input_ids"].shape
    text = model.model.language_model.config
    head_dim = text.hidden_size // text.num_attention_heads
    fastv_config = divico.CompressionConfig("fastv", keep_tokens=20, layer=LAYER)
    random_cfg = divico.CompressionConfig("random", keep_tokens=20, layer=LAYER, extra={"seed": 4})
    none, fastv, random = (counted(model, inputs, c) for c in (None, fastv_config, random_cfg))
    scoring = batch * 2 * text.num_attention_heads * head_dim * length  # the last query times every key
    assert fastv - random == scoring
    short = length - 72 + 20
    layers = len(model.model.language_model.layers)
    assert none - random == (layers - LAYER) * batch * (decoder_layer_flops(model, length)
                                                        - decoder_layer_flops(model, short))
    analytic = count_flops(config, TINY_PROMPT, compression=random_cfg, attention="dense")
    analytic_fastv = count_flops(config, TINY_PROMPT, compression=fastv_config, attention="dense")
    assert analytic.scoring == analytic.compressor == 0 and analytic_fastv.scoring == scoring
    assert analytic_fastv.total - analytic.total == fastv - random
    analytic_none = count_flops(config, TINY_PROMPT, method="none", attention="dense")
    assert analytic_none.total - analytic.total == none - random


def test_pooling_saves_exactly_the_shorter_projector_and_layers(tiny):
    config, model, inputs = tiny
    batch, length = inputs["input_ids"].shape
    layers = len(model.model.language_model.layers)
    pooling_cfg = divico.CompressionConfig("pooling", keep_tokens=9)
    none, pooling = counted(model, inputs, None), counted(model, inputs, pooling_cfg)
    projector = model.model.multi_modal_projector
    images, patches, pooled = 4, 36, 9  # 2 samples x 2 images of 6 x 6 patches, pooled to 3 x 3
    projector_saving = sum(linear_flops(m, images * (patches - pooled))
                           for m in (projector.linear_1, projector.linear_2))
    short = length - 2 * (patches - pooled)
    layer_saving = layers * batch * (decoder_layer_flops(model, length) - decoder_layer_flops(model, short))
    assert none - pooling == projector_saving + layer_saving
    analytic = count_flops(config, TINY_PROMPT, compression=pooling_cfg, attention="dense")
    analytic_none = count_flops(config, TINY_PROMPT, method="none", attention="dense")
    assert analytic.scoring == analytic.compressor == 0 and analytic.per_layer == [short] * layers
    assert analytic_none.total - analytic.total == none - pooling
