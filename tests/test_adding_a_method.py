"""docs/adding-a-method.md, followed literally: a toy method in one place, one ``@register_method`` line, and it
shows up everywhere (registry, config, ``divico bench`` / ``divico train`` choices, ``count_flops``) and passes the
same contract checks as the shipped methods (imported from tests/contract_cases.py, not copied).

The toy keeps the *last* k visual tokens of each sample: no scores, no trainable module of its own (LoRA only, as
FastV). Its class statement runs inside a module-scoped fixture, i.e. after collection: tests/test_contract.py reads
``divico.available_methods()`` when it is collected, so the toy never joins (nor breaks) that matrix, and the
fixture unregisters it before any other file's tests run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import divico
from contract_cases import (
    ATTN_IMPLEMENTATIONS,
    CELL_CHECKS,
    LAYER,
    compress_config,
    fresh,
    is_layer_level,
    one_torch_thread,
    scores_apply,
)
from divico.commands import bench, train
from divico.efficiency import PromptShape, count_flops
from divico.methods.base import CompressionMethod
from divico.registry import register_method, trainable_methods, unregister_method
from tiny_models import TOKENS_PER_IMAGE, llava_batch, llava_prompt, tiny_llava_config

TOY = "toy-keep-last"
# Every contract check applies except the score check: the toy has needs_scores = False (asserted below).
TOY_CHECKS = [name for name in CELL_CHECKS if name != "scores"]
MODELS = divico.available_models()


def define_toy_method() -> type[CompressionMethod]:
    """The method of the guide's checklist: subclass, ``@register_method``, class attributes, ``select``."""

    @register_method(TOY)
    class KeepLastVisualTokens(CompressionMethod):
        """Keep the last k visual tokens of each sample (of each frame/image with ``per_frame_keep``)."""

        display_name = "Keep-last"
        needs_scores = False  # the engine then skips scoring; select() gets zeros
        trainable = True  # through LoRA only, like FastV

        def select(self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
            # The same keep count as the base class (CompressionConfig.keep_count per pool), so the inherited
            # accounting (kept_visual_tokens, tokens_per_layer, overhead_flops) stays true.
            if self.config.per_frame_keep:
                pools = [groups == group for group in range(int(groups.max()) + 1 if groups.numel() else 0)]
            else:
                pools = [visual]
            keep = ~visual
            for pool in pools:
                k = torch.tensor([self.config.keep_count(int(n)) for n in pool.sum(dim=1)], device=visual.device)
                from_end = pool.long().flip(1).cumsum(1).flip(1)  # 1 at the pool's last token, 2 before it, ...
                keep = keep | (pool & (from_end <= k[:, None]))
            return keep

    return KeepLastVisualTokens


@pytest.fixture(scope="module", autouse=True)
def toy_method():
    assert TOY not in divico.available_methods()
    cls = define_toy_method()
    try:
        with one_torch_thread():
            yield cls
    finally:
        unregister_method(TOY)
    assert TOY not in divico.available_methods()


def test_registered_everywhere(toy_method):
    assert TOY in divico.available_methods()
    assert TOY in trainable_methods()
    assert divico.registry.get_method_class(TOY) is toy_method and toy_method.name == TOY
    assert toy_method.title() == "Keep-last"
    assert divico.CompressionConfig(TOY, keep_ratio=0.5).method == TOY
    # The CLI reads the registry when its parser is built: `divico bench --methods` and `divico train --method`.
    assert TOY in bench.method_choices()
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    bench.register(subparsers)
    train.register(subparsers)
    args = parser.parse_args(["bench", "--model", "tiny-llava", "--methods", f"none,{TOY}", "--out", "unused"])
    assert args.methods == ["none", TOY]
    args = parser.parse_args(["train", "--model", "m", "--data", "d.json", "--output", "o", "--method", TOY])
    assert args.method == TOY
    # The contract gates: a layer-level method without scores (so TOY_CHECKS is the applicable set).
    assert is_layer_level(TOY) and not scores_apply(TOY)
    assert sorted(TOY_CHECKS) == sorted(name for name, (_, applies) in CELL_CHECKS.items() if applies(TOY))


def test_count_flops_uses_its_accounting():
    """count_flops(method=TOY) counts, per decoder layer, the tokens a real prefill of the toy leaves in the cache."""
    images, before, after = 2, 3, 4
    spec = llava_prompt(images, before, after, seed=2)  # text, image, one text token, image, text
    model = fresh("LlavaForConditionalGeneration", "sdpa")
    config = compress_config(TOY)
    divico.apply_compression(model, config)
    with torch.no_grad():
        out = model(**llava_batch([spec]), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    num_layers = len(model.model.language_model.layers)
    measured = [cache.get_seq_length(i) for i in range(num_layers)]
    prompt = PromptShape(visual_tokens=images * TOKENS_PER_IMAGE, text_tokens=after + 1, system_tokens=before,
                         images=images)
    flops = count_flops(tiny_llava_config(), prompt, compression=config)
    assert [layer.tokens for layer in flops.llm_layers] == measured
    kept = config.keep_count(images * TOKENS_PER_IMAGE)
    assert measured == [prompt.seq_len] * LAYER + [prompt.seq_len - images * TOKENS_PER_IMAGE + kept] * (num_layers - LAYER)
    assert flops.method == TOY and flops.keep_tokens == kept and flops.layer == LAYER
    assert flops.scoring == 0 and flops.compressor == 0  # no scores, no compressor: no overhead
    # The same call by name, as `divico bench` makes it.
    by_name = count_flops(tiny_llava_config(), prompt, method=TOY, keep_ratio=config.keep_ratio, layer=LAYER)
    assert [layer.tokens for layer in by_name.llm_layers] == measured


def test_keeps_the_last_visual_tokens():
    """The toy's own behaviour, so the contract checks below run on a method that really compresses."""
    spec = llava_prompt(1, 5, 7, seed=1)
    model = fresh("LlavaForConditionalGeneration", "sdpa")
    divico.apply_compression(model, compress_config(TOY))
    with torch.no_grad():
        model(**llava_batch([spec]))
    report = divico.last_report(model)
    kept = int(report.num_kept[0])
    assert 0 < kept < int(report.num_visual[0])
    assert torch.equal(report.kept_positions[0], report.visual_positions[0, -kept:])


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("model_class", MODELS)
@pytest.mark.parametrize("check", TOY_CHECKS)
def test_contract(check, model_class, attn, tmp_path: Path):
    function, _ = CELL_CHECKS[check]
    if check == "save_load":
        function(TOY, model_class, attn, tmp_path)
    else:
        function(TOY, model_class, attn)
