"""The ``pdrop`` method (issue 19, item 3) against a reference written here from the published algorithm.

Paper: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (CVPR 2025). Official code: github.com/Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``
(``pdrop_forward``: after the layer before each entry of ``layer_list`` the sequence is ranked and dropped;
``pdrop_rank_drop``: the last instruction token's attention, mean over heads, over the image tokens still present,
``topk(int(n * image_token_ratio_list[stage + 1]))``), LLaVA-1.5 scripts ``layer_list [8,16,24]``,
``image_token_ratio_list [0.5,0.25,0.125]``.

The reference runs the *unmodified* eager model, stage by stage: the attention of the last prompt token at the layer
before boundary s, in a model whose layers from each earlier boundary on cannot see the tokens dropped there
(additive masks, positions unchanged), ranks the visual tokens left; the top ``max(1, floor(n * lambda^s))`` stay.
It shares no code with the engine (which shortens the sequence instead of masking it). The documented differences
from the official code (the layer before the boundary ranks; original RoPE positions kept) are the engine's.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import divico
from contract_cases import one_torch_thread
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, count_flops, measure_flops
from divico.methods.pdrop import scaled_layers
from divico.registry import get_method_class
from tiny_models import IMAGE_TOKEN_ID, llava_batch, llava_prompt, tiny_llava


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def llava() -> Any:
    return tiny_llava(seed=0, attn_implementation="eager")


def pdrop_config(share: float, **extra: Any) -> divico.CompressionConfig:
    return divico.CompressionConfig("pdrop", keep_ratio=share, extra=extra)


def masked_attention(model: Any, inputs: dict[str, torch.Tensor], keeps: dict[int, torch.Tensor],
                     layer: int) -> torch.Tensor:
    """(N,) eager attention of the last token at ``layer``, mean over heads; layers in ``keeps`` (index -> (N,)
    bool) attend only to the kept keys."""
    layers = model.model.language_model.layers
    length = inputs["input_ids"].shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    def hook(idx: int, module, args, kwargs):
        allowed = causal & keeps[idx][None, :]
        mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return args, {**kwargs, "attention_mask": mask[None, None]}

    handles = [layers[idx].register_forward_pre_hook(functools.partial(hook, idx), with_kwargs=True) for idx in keeps]
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        for handle in handles:
            handle.remove()
    return attentions[layer][0, :, -1, :].mean(dim=0)


def reference_stages(model: Any, inputs: dict[str, torch.Tensor], boundaries: list[int],
                     share: float) -> list[list[int]]:
    """Kept visual positions after each boundary of one sample, from the algorithm."""
    visual = inputs["input_ids"][0] == IMAGE_TOKEN_ID
    n = int(visual.sum())
    keep = torch.ones_like(visual)
    keeps: dict[int, torch.Tensor] = {}
    stages = []
    for stage, boundary in enumerate(boundaries, start=1):
        scores = masked_attention(model, inputs, dict(keeps), boundary - 1)
        remaining = (visual & keep).nonzero().flatten()
        count = max(1, int(n * share**stage))
        top = remaining[torch.sort(scores[remaining], descending=True, stable=True).indices[:count]]
        keep = ~visual
        keep[top] = True
        for idx in range(boundary, len(model.model.language_model.layers)):
            keeps[idx] = keep.clone()
        stages.append(sorted(top.tolist()))
    return stages


def engine_stages(model: Any, inputs: dict[str, torch.Tensor], config: divico.CompressionConfig) -> Any:
    divico.apply_compression(model, config)
    try:
        with torch.no_grad():
            model(**inputs)
        return divico.last_report(model)
    finally:
        divico.remove_compression(model)


@pytest.mark.parametrize(("share", "extra", "boundaries"), [(0.5, {}, [1, 2, 3]), (0.25, {"layers": [1, 3]}, [1, 3])])
def test_pdrop_keeps_the_reference_set_at_every_stage(llava, share, extra, boundaries):
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1)])
    report = engine_stages(llava, inputs, pdrop_config(share, **extra))
    expected = reference_stages(llava, inputs, boundaries, share)
    stages = report.extra["stages"]
    assert [stage["layer"] for stage in stages] == boundaries and report.layer == boundaries[0]
    assert [[int(p) for p in stage["kept_positions"][0]] for stage in stages] == expected
    assert [int(p) for p in report.kept_positions[0]] == expected[-1]  # the report's kept set is the final one
    assert [len(kept) for kept in expected] == [max(1, int(64 * share**s)) for s in range(1, len(boundaries) + 1)]
    # The report's scores: the first boundary's (the unmodified model's attention at the layer before it).
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    first = masked_attention(llava, inputs, {}, boundaries[0] - 1)[visual]
    torch.testing.assert_close(report.scores[0], first, atol=1e-6, rtol=0)


def test_pdrop_batch_equals_singles(llava):
    prompts = [llava_prompt(1, 5, 7, seed=1), llava_prompt(2, 3, 4, seed=2), llava_prompt(0, 9, 6, seed=3)]
    batch = llava_batch(prompts)
    batched = engine_stages(llava, batch, pdrop_config(0.5))
    for row, prompt in enumerate(prompts[:2]):
        shift = batch["input_ids"].shape[1] - len(prompt["ids"])
        alone = engine_stages(llava, llava_batch([prompt]), pdrop_config(0.5))
        for stage_batched, stage_alone in zip(batched.extra["stages"], alone.extra["stages"]):
            got = [int(p) - shift for p in stage_batched["kept_positions"][row] if p >= 0]
            assert got == [int(p) for p in stage_alone["kept_positions"][0]]


def test_pdrop_schedule_scaling_and_options():
    assert scaled_layers(32) == [8, 16, 24]
    assert scaled_layers(28) == [7, 14, 21]
    assert scaled_layers(30) == [8, 15, 23]  # 7.5 and 22.5 round up
    assert scaled_layers(4) == [1, 2, 3]
    assert scaled_layers(2) == [1]  # 0.5 -> 1, 1 -> 1, 1.5 -> 2 (outside [1, 1])
    method = get_method_class("pdrop")(pdrop_config(0.5))
    assert method.compression_layers(32) == [8, 16, 24] and method.first_compressed_layer == 8
    assert method.kept_visual_tokens(1, 576) == 72  # 576 -> 288 -> 144 -> 72
    assert method.tokens_per_layer(32, 600, 576, 72) == [600] * 8 + [312] * 8 + [168] * 8 + [96] * 8
    for config, message in [
        (lambda: divico.CompressionConfig("pdrop", keep_tokens=64), "keep_ratio"),
        (lambda: divico.CompressionConfig("pdrop", keep_ratio=0.5, per_frame_keep=True), "per_frame_keep"),
        (lambda: pdrop_config(0.5, layers=[3, 2]), "strictly increasing"),
        (lambda: pdrop_config(0.5, layers=[0, 2]), "strictly increasing"),
        (lambda: pdrop_config(0.5, layers=[]), "non-empty"),
        (lambda: pdrop_config(0.5, ratio=0.5), "unknown"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_method_class("pdrop")(config())
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        get_method_class("pdrop")(pdrop_config(0.5, layers=[2, 4])).compression_layers(4)


# --- FLOPs -----------------------------------------------------------------------------------------------------
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


def test_pdrop_flops_match_flop_counter():
    """Each stage's layers at the stage's length plus one last-token scoring product per boundary."""
    config = build_config("tiny-llava")
    model = build_random_model(config, seed=0)
    inputs = build_inputs(config, TINY_PROMPT, seed=0)
    pdrop_cfg = pdrop_config(0.5, layers=[1, 2, 3])
    measured = {}
    for name, cfg in (("none", None), ("pdrop", pdrop_cfg)):
        if cfg is not None:
            divico.apply_compression(model, cfg)
        try:
            with torch.inference_mode():
                measured[name], _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
            if cfg is not None:
                stages = divico.last_report(model).extra["stages"]
                assert [stage["num_kept"].tolist() for stage in stages] == [[36, 36], [18, 18], [9, 9]]
        finally:
            divico.remove_compression(model)
    analytic = count_flops(config, TINY_PROMPT, compression=pdrop_cfg, attention="dense")
    analytic_none = count_flops(config, TINY_PROMPT, method="none", attention="dense")
    length = TINY_PROMPT.seq_len
    assert analytic.per_layer == [length, length - 36, length - 54, length - 63]
    text = model.model.language_model.config
    head_dim = text.hidden_size // text.num_attention_heads
    per_key = 2 * text.num_attention_heads * head_dim
    assert analytic.scoring == TINY_PROMPT.batch_size * per_key * (length + (length - 36) + (length - 54))
    assert analytic_none.total - analytic.total == measured["none"] - measured["pdrop"]


def test_pdrop_teacher_forcing_keeps_the_inference_stages(llava):
    """With labels every boundary scores from the last prompt token (mapped into each stage's sequence), so the
    prompt followed by an answer keeps, stage by stage, what the prompt alone keeps."""
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1)])
    alone = engine_stages(llava, inputs, pdrop_config(0.5))
    answer = torch.tensor([[5, 6, 7]])
    extended = {"input_ids": torch.cat([inputs["input_ids"], answer], dim=1),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1),
                "pixel_values": inputs["pixel_values"]}
    prompt_length = inputs["input_ids"].shape[1]
    labels = extended["input_ids"].masked_fill(torch.arange(extended["input_ids"].shape[1]) < prompt_length, -100)
    divico.apply_compression(llava, pdrop_config(0.5))
    try:
        with torch.no_grad():
            llava(**extended, labels=labels)
        forced = divico.last_report(llava)
    finally:
        divico.remove_compression(llava)
    for with_answer, without in zip(forced.extra["stages"], alone.extra["stages"]):
        assert torch.equal(with_answer["kept_positions"], without["kept_positions"])
