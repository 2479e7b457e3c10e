"""Efficiency suite: analytic FLOPs against FlopCounterMode and the engine, memory/timing helpers, bench CLI."""

from __future__ import annotations

import json

import pytest
import torch

import divico
from divico.efficiency import (
    PromptShape,
    TimingStats,
    build_config,
    build_inputs,
    build_random_model,
    count_flops,
    decode_step_flops,
    extrapolate_layers,
    kv_cache_bytes,
    measure_flops,
    measure_peak_memory,
    paper_eq10_layer,
    paper_eq11_reduction,
    preset_names,
)

HAS_ENGINE = hasattr(divico, "apply_compression")
needs_engine = pytest.mark.skipif(not HAS_ENGINE, reason="divico.apply_compression not available yet")

# tiny-llava: CLIP 84 px / patch 14 -> 36 visual tokens per image; Llama 4 layers, 4 heads, 2 KV heads (GQA).
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    config = build_config("tiny-llava")
    model = build_random_model(config, seed=0)
    inputs = build_inputs(config, TINY_PROMPT, seed=0)
    return config, model, inputs


def _counted(model, inputs) -> int:
    with torch.inference_mode():
        flops, _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
    return flops


def test_uncompressed_flops_match_flop_counter(tiny) -> None:
    config, model, inputs = tiny
    analytic = count_flops(config, TINY_PROMPT, method="none", attention="dense")
    measured = _counted(model, inputs)
    assert analytic.total == pytest.approx(measured, rel=0.02)
    # The parts separately: vision tower alone and vision tower + projector.
    with torch.inference_mode():
        vision, _ = measure_flops(lambda: model.model.vision_tower(inputs["pixel_values"]))
        features, _ = measure_flops(lambda: model.model.get_image_features(inputs["pixel_values"]))
    assert analytic.vision_tower == pytest.approx(vision, rel=0.02)
    assert analytic.vision_tower + analytic.projector == pytest.approx(features, rel=0.02)
    assert analytic.per_layer == [TINY_PROMPT.seq_len] * 4


def test_lm_head_all_positions_matches_flop_counter(tiny) -> None:
    config, model, inputs = tiny
    analytic = count_flops(config, TINY_PROMPT, method="none", attention="dense", lm_head="all")
    with torch.inference_mode():
        measured, _ = measure_flops(lambda: model(**inputs, logits_to_keep=0))
    assert analytic.total == pytest.approx(measured, rel=0.02)
    assert analytic.lm_head == 2 * TINY_PROMPT.seq_len * 2 * 64 * 320


def test_causal_attention_counts_masked_pairs_exactly() -> None:
    config = build_config("tiny-llava", layers=1)
    prompt = PromptShape(visual_tokens=36, text_tokens=4, batch_size=1)
    causal = count_flops(config, prompt, attention="causal").llm_layers[0]
    dense = count_flops(config, prompt, attention="dense").llm_layers[0]
    seq = prompt.seq_len
    allowed_pairs = int(torch.ones(seq, seq).tril().sum())
    heads, head_dim = 4, 16
    # scores (2 * head_dim per pair) + weighted sum (2 * head_dim per pair), per query head
    assert causal.attention == 4 * head_dim * heads * allowed_pairs
    assert dense.attention == 4 * head_dim * heads * seq * seq
    # GQA: k and v project to 2 heads x 16 = 32 features, q and o to 64.
    assert causal.projections == 2 * seq * 64 * (64 + 32 + 32 + 64)
    assert causal.mlp == 3 * 2 * seq * 64 * 160


def test_compressed_token_counts_and_paper_figure() -> None:
    config = build_config("llava-1.5-7b", layers=4)
    prompt = PromptShape(visual_tokens=576, text_tokens=60)
    fastv = count_flops(config, prompt, method="fastv", keep_tokens=64, layer=2)
    assert fastv.per_layer == [636, 636, 124, 124]
    deco = count_flops(config, prompt, method="deco", keep_tokens=64)
    assert deco.per_layer == [124] * 4 and deco.overhead == 0
    full = count_flops(config, prompt, method="fastv", keep_tokens=64, layer=2, num_layers=32)
    assert full.per_layer == [636] * 2 + [124] * 30
    assert full.paper_eq10 == sum(paper_eq10_layer(n, 4096, 11008) for n in full.per_layer)
    # Eq. 11's first term is the per-layer difference of Eq. 10 for the visual tokens alone.
    visual_only = (32 - 2) * (paper_eq10_layer(576, 4096, 11008) - paper_eq10_layer(64, 4096, 11008))
    assert paper_eq11_reduction(32, 2, 576, 64, 4096, 11008) == pytest.approx(visual_only - 4 * 64 * 4096**2)
    divico_flops = count_flops(config, prompt, method="divico", keep_tokens=64, layer=2)
    # g_theta's default width min(d, 512) = 512: Linear(8192 -> 512) and Linear(512 -> 8192) on 64 kept tokens.
    assert divico_flops.compressor == 64 * 2 * (2 * 4096 * 512 + 512 * 8192) + 2 * 636 * 4096
    wide = count_flops(config, prompt, method="divico", keep_tokens=64, layer=2, compressor_hidden=4096)
    assert wide.compressor == 64 * 2 * (2 * 4096 * 4096 + 4096 * 8192) + 2 * 636 * 4096
    assert divico_flops.scoring == 2 * 32 * 128 * 636


def test_decode_step_flops_shrink_with_the_cache() -> None:
    config = build_config("tiny-llava")
    full = decode_step_flops(config, [120] * 4)
    compressed = decode_step_flops(config, [120, 120, 40, 40])
    per_layer_attention_saving = 4 * 4 * 16 * 80  # heads x head_dim x (scores + sum) x removed keys
    assert full - compressed == 2 * per_layer_attention_saving


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: PromptShape(visual_tokens=-1, text_tokens=5), "visual_tokens"),
        (lambda: PromptShape(visual_tokens=10, text_tokens=5, batch_size=0), "batch_size"),
        (lambda: build_config("llava-9b"), "valid presets: " + ", ".join(preset_names())),
        (lambda: build_config("tiny-llava", layers=9), r"\[1, 4\]"),
        (lambda: count_flops(build_config("tiny-llava"), PromptShape(36, 5), method="nope"), "valid methods"),
        (lambda: count_flops(build_config("tiny-llava"), PromptShape(36, 5), method="fastv", keep_tokens=40),
         "exceeds"),
        (lambda: count_flops(build_config("tiny-llava"), PromptShape(36, 5), method="fastv", keep_tokens=4, layer=4),
         r"\[1, 3\]"),
        (lambda: count_flops(build_config("tiny-llava"), PromptShape(36, 5), method="fastv", keep_ratio=1.5),
         r"\(0, 1\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()
    assert "tiny-llava" in preset_names()


def test_peak_memory_tracks_freed_temporaries() -> None:
    def work() -> torch.Tensor:
        kept = torch.empty(1_000_000)
        temporary = torch.empty(2_000_000)
        del temporary
        later = torch.empty(500_000)  # fits in what the temporary released: no new peak
        del later
        return kept

    stats = measure_peak_memory(work)
    assert stats.peak_bytes == 4 * 3_000_000


def test_kv_cache_bytes_and_timing_stats(tiny) -> None:
    _, model, inputs = tiny
    with torch.inference_mode():
        output = model(**inputs, use_cache=True, logits_to_keep=1)
    # keys + values: batch 2, 2 KV heads, N tokens, head_dim 16, fp32
    assert kv_cache_bytes(output.past_key_values) == [2 * 2 * 2 * TINY_PROMPT.seq_len * 16 * 4] * 4
    stats = TimingStats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.q1, stats.q3, stats.iqr) == (3.0, 2.0, 4.0, 2.0)
    assert extrapolate_layers(10.0, 2.0, layers_run=4, full_depth=32) == 10.0 + 28 * 2.0


ENGINE_CASES = [
    ("fastv", {"keep_tokens": 20}, "sdpa", {}),
    ("fastv", {"keep_ratio": 0.25}, "full_attention", {}),
    ("divico", {"keep_tokens": 20}, "sdpa", {}),
    ("divico", {"keep_tokens": 20}, "sdpa", {"encoder": "deterministic"}),
    ("deco", {"keep_tokens": 9}, "sdpa", {}),
]


@needs_engine
@pytest.mark.parametrize(("method", "keep", "scoring", "extra"), ENGINE_CASES)
def test_compressed_flops_and_token_counts_match_engine(tiny, method, keep, scoring, extra) -> None:
    config, model, inputs = tiny
    layer = 2
    cfg = divico.CompressionConfig(method=method, layer=layer, scoring=scoring, **keep, **extra)
    divico.apply_compression(model, cfg)
    try:
        measured = _counted(model, inputs)
        report = divico.last_report(model)
    finally:
        divico.remove_compression(model)
    analytic = count_flops(config, TINY_PROMPT, method=method, layer=layer, scoring=scoring, attention="dense",
                           deterministic=extra.get("encoder") == "deterministic", **keep)
    assert analytic.total == pytest.approx(measured, rel=0.02)
    before, after = int(report.seq_len_before), int(report.seq_len_after)
    if method == "deco":
        assert set(analytic.per_layer) == {after}
    else:
        assert int(report.layer) == layer
        assert analytic.per_layer[:layer] == [before] * layer
        assert analytic.per_layer[layer:] == [after] * (4 - layer)
    assert after == TINY_PROMPT.seq_len - TINY_PROMPT.visual_tokens + analytic.keep_tokens


@needs_engine
def test_bench_cli_writes_results_and_plot(tmp_path) -> None:
    from divico.cli import main

    code = main(["bench", "--model", "tiny-llava", "--methods", "none,fastv,divico,deco", "--keep-tokens", "9",
                 "--visual-tokens", "36", "--text-tokens", "8", "--repeats", "2", "--warmup", "0",
                 "--reference-fastv", "--count-flops", "--decode-tokens", "2", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["none", "fastv", "divico", "deco", "fastv-ref"]  # the official-scoring reference comes last
    for row in result["rows"]:
        assert row["flop_counter"]["measured"] == pytest.approx(row["flop_counter"]["analytic_dense"], rel=0.02)
        assert row["ratios"]["flops_total"] <= 1.0 + 1e-9
    assert (tmp_path / "bench.png").stat().st_size > 0
