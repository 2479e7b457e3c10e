"""DiViCo's gap encoder on any selector (issue 19 item 8): ``CompressionConfig(method="divico", selector=...)``.

The paper (Sec. III, Algorithm 1) selects by the last prompt token's attention at layer K-1 and adds
``g_theta(concat(v_s, mean(v_r)))`` to each kept token v_s, v_r being the removed ones. With another selector the
kept set is that selector's and v_r its removed tokens. The references here are independent of divico's engine:
the random draw is rebuilt from its documented rule (``torch.randperm`` of a generator seeded with the seed, over the
sample's visual tokens in prompt order, as tests/test_random_pooling.py), the gap from the encoder's two linear
layers applied by hand, FastV's and DART's kept sets from the methods themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import divico
from contract_cases import check_batch_equals_singles, check_cached_decode, check_oracle, one_torch_thread
from divico.cli import main
from divico.cli_options import add_compression_arguments, compression_from_args
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, count_flops, measure_flops
from divico.registry import available_methods
from test_training import tiny_processor, write_color_data
from tiny_models import IMAGE_TOKEN_ID, llava_batch, llava_prompt, randomize_compressor, tiny_llava

LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def config(selector: str, **options: Any) -> divico.CompressionConfig:
    return divico.CompressionConfig(**{"method": "divico", "keep_ratio": 0.25, "layer": LAYER, "selector": selector,
                                       **options})


# --- the config --------------------------------------------------------------------------------------------------
def test_default_is_the_papers_attention_and_old_configs_read_as_it():
    assert divico.CompressionConfig("divico", keep_ratio=0.25).selector == "attention"
    saved = config("random").to_dict()
    assert divico.CompressionConfig.from_dict(saved).selector == "random"
    del saved["selector"]  # a checkpoint written before the field existed
    assert divico.CompressionConfig.from_dict(saved).selector == "attention"


@pytest.mark.parametrize("method,selector,message", [
    ("divico", "nonsense", "valid: attention, "),
    ("divico", "deco", "valid: attention, "),  # input-level: acts before the LLM, no layer-K selection
    ("divico", "divico", "valid: attention, "),
    ("divico", "pdrop", "valid: attention, "),  # a schedule of layers: g_theta acts at one
    ("fastv", "random", "applies only to methods that take a selector"),
])
def test_a_bad_selector_is_refused_with_the_valid_ones(method, selector, message):
    with pytest.raises(ValueError, match=message):
        divico.CompressionConfig(method, keep_ratio=0.25, selector=selector)


def test_cli_option_reaches_the_config():
    parser = argparse.ArgumentParser()
    add_compression_arguments(parser, methods=available_methods(), default_method="divico", method_help="",
                              keep_ratio_help="", with_compressor=False)
    args = parser.parse_args(["--selector", "random", "--keep-ratio", "0.25"])
    assert compression_from_args(args, default_keep_ratio=None).selector == "random"
    args = parser.parse_args(["--method", "fastv", "--selector", "random", "--keep-ratio", "0.25"])
    with pytest.raises(ValueError, match="applies only to methods that take a selector"):
        compression_from_args(args, default_keep_ratio=None)


# --- behaviour ---------------------------------------------------------------------------------------------------
def reference_random_keep(input_ids: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """(B, N) keep mask of the documented random draw, per sample."""
    visual = input_ids == IMAGE_TOKEN_ID
    keep = ~visual
    for row in range(input_ids.shape[0]):
        positions = visual[row].nonzero().flatten()
        if positions.numel():
            count = max(1, round(ratio * positions.numel()))
            drawn = torch.randperm(positions.numel(), generator=torch.Generator().manual_seed(seed))[:count]
            keep[row, positions[drawn]] = True
    return keep


def test_random_selector_keeps_the_random_draw_and_adds_the_gap_of_its_removed_tokens():
    model = tiny_llava(seed=0)
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1), llava_prompt(2, 3, 4, seed=2)])
    divico.apply_compression(model, config("random", extra={"seed": 3}))
    runtime = divico.get_runtime(model)
    assert runtime.scorer is None  # the selector needs no scores: none are computed
    randomize_compressor(model)
    captured: dict[str, torch.Tensor] = {}
    layer = model.model.language_model.layers[LAYER]

    def grab(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured.setdefault(name, (args[0] if args else kwargs["hidden_states"]).clone())
        return hook

    handles = [layer.register_forward_pre_hook(grab("original"), with_kwargs=True, prepend=True),
               layer.register_forward_pre_hook(grab("compressed"), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    keep = reference_random_keep(inputs["input_ids"], 0.25, seed=3)
    report = divico.last_report(model)
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    for row in range(2):
        expected = (keep[row] & visual[row]).nonzero().flatten()
        assert report.kept_positions[row][report.kept_positions[row] >= 0].tolist() == expected.tolist()
    encoder = runtime.compressor
    original, compressed = captured["original"], captured["compressed"]
    with torch.no_grad():
        for row in range(2):
            kept, removed = keep[row] & visual[row], ~keep[row]
            v_s = original[row, kept]
            v_p = original[row, removed].mean(dim=0, keepdim=True).expand_as(v_s)
            mu = encoder.fc2(torch.nn.functional.gelu(encoder.fc1(torch.cat([v_s, v_p], dim=-1))))[:, :v_s.shape[1]]
            slots = compressed[row, -int(keep[row].sum()):]  # left-padded: this sample's slots are the last ones
            torch.testing.assert_close(slots[kept[keep[row]]], v_s + mu, atol=1e-5, rtol=1e-5)  # eval: the mean
            torch.testing.assert_close(slots[~kept[keep[row]]], original[row, keep[row] & ~visual[row]])


@pytest.mark.parametrize("selector", ["fastv", "dart"])
def test_layer_level_selectors_keep_their_own_set_and_untrained_divico_is_them(selector):
    if selector not in available_methods():
        pytest.skip(f"{selector} is not registered")
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1), llava_prompt(2, 3, 4, seed=2), llava_prompt(0, 9, 6, seed=3)])
    outputs = {}
    for name, cfg in ((selector, divico.CompressionConfig(selector, keep_ratio=0.25, layer=LAYER)),
                      ("divico", config(selector))):
        model = tiny_llava(seed=0)
        divico.apply_compression(model, cfg)
        with torch.no_grad():
            outputs[name] = (model(**inputs).logits, divico.last_report(model).kept_positions)
        if name == "divico":
            method = divico.get_runtime(model).method
            reference = divico.get_runtime(model).method.selector
            assert (method.needs_scores, method.needs_states) == (reference.needs_scores, reference.needs_states)
    assert torch.equal(outputs["divico"][1], outputs[selector][1])
    assert torch.equal(outputs["divico"][0], outputs[selector][0])  # g_theta starts at zero


def test_engine_contract_with_a_selector():
    check_oracle("divico", "Qwen2VLForConditionalGeneration", "sdpa", selector="random")
    check_batch_equals_singles("divico", "LlavaForConditionalGeneration", "sdpa", selector="random")
    check_cached_decode("divico", "VideoLlavaForConditionalGeneration", "eager", selector="random")


# --- FLOPs -------------------------------------------------------------------------------------------------------
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


def test_a_selector_without_scores_saves_exactly_the_scoring_product():
    shape = build_config("tiny-llava")
    model = build_random_model(shape, seed=0)
    inputs = build_inputs(shape, TINY_PROMPT, seed=0)
    configs = {"attention": divico.CompressionConfig("divico", keep_tokens=20, layer=LAYER),
               "random": divico.CompressionConfig("divico", keep_tokens=20, layer=LAYER, selector="random")}
    measured, analytic = {}, {}
    for name, cfg in configs.items():
        divico.apply_compression(model, cfg)
        try:
            with torch.inference_mode():
                measured[name], _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
        finally:
            divico.remove_compression(model)
        analytic[name] = count_flops(shape, TINY_PROMPT, compression=cfg, attention="dense")
    batch, length = inputs["input_ids"].shape
    text = model.config.text_config
    scoring = batch * 2 * text.num_attention_heads * (text.hidden_size // text.num_attention_heads) * length
    assert measured["attention"] - measured["random"] == scoring
    assert analytic["random"].scoring == 0 and analytic["attention"].scoring == scoring
    assert analytic["random"].compressor == analytic["attention"].compressor > 0  # g_theta on the same k tokens
    assert analytic["attention"].total - analytic["random"].total == scoring


# --- training ----------------------------------------------------------------------------------------------------
def test_divico_train_trains_g_theta_on_the_random_selector(tmp_path: Path):
    data, images = write_color_data(tmp_path, 4)
    model_dir = tmp_path / "base"
    tiny_llava().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    out = tmp_path / "out"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--image-folder", str(images),
                 "--output", str(out), "--selector", "random", "--keep-ratio", "0.25", "--layer", "2",
                 "--lora-r", "0", "--max-steps", "2", "--batch-size", "2", "--no-progress"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["compression"]["selector"] == "random"
    model = tiny_llava()
    divico.load_compressor(model, out)
    assert divico.compression_config(model).selector == "random"
    assert divico.get_runtime(model).scorer is None
    assert bool(divico.get_runtime(model).compressor.fc2.weight.abs().sum() > 0)  # trained away from its zero init
