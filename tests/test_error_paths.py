"""Error paths and rarely taken paths of the public API (issue 21): each error names the bad value and the valid
range; each path is checked against a result computed independently (top-k by hand, the documented keep-count
rule, the uncompressed model's own embeddings).

Tiny random models from tests/tiny_models.py; every test builds what it needs (a few seconds in all).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import divico
from contract_cases import one_torch_thread
from divico.config import keep_count
from divico.lora import has_lora, inject_lora, lora_target_regex
from divico.methods.base import CompressionMethod
from divico.registry import register_method, unregister_method
from tiny_models import (
    IMAGE_TOKEN_ID,
    TOKENS_PER_IMAGE,
    make_batch,
    prompt_ids,
    randomize_compressor,
    sample,
    tiny_llava,
    tiny_qwen,
)

LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _compressed(method: str = "fastv", **options) -> torch.nn.Module:
    model = tiny_llava(seed=0)
    if "keep_tokens" not in options:
        options.setdefault("keep_ratio", 0.25)
    divico.apply_compression(model, divico.CompressionConfig(method, layer=LAYER, **options))
    return model


# --- the runtime's input checks ------------------------------------------------------------------------------
def test_prompt_ending_with_a_visual_token_names_sample_and_position():
    model = _compressed()
    ids = prompt_ids(1, 5, 0, seed=0)  # no text after the image
    inputs = make_batch([prompt_ids(1, 5, 7, seed=1), ids], [1, 1])
    length = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"sample 1 \(position {length - 1} of {length}\) is a visual token; "
                                         r"the prompt must end with text"):
        model(**inputs)


def test_prompt_ending_with_a_visual_token_under_teacher_forcing():
    """With labels, the scoring token is the one before the first label: it may not be visual either."""
    model = _compressed()
    inputs = sample()
    ids = inputs["input_ids"]
    last_visual = int((ids[0] == IMAGE_TOKEN_ID).nonzero().max())
    labels = torch.full_like(ids, -100)
    labels[0, last_visual + 1:] = ids[0, last_visual + 1:]
    with pytest.raises(ValueError, match=rf"sample 0 \(position {last_visual} of {ids.shape[1]}\) is a visual token"):
        model(**inputs, labels=labels)


def test_non_2d_attention_mask_names_its_shape_and_the_expected_one():
    model = _compressed()
    inputs = sample()
    length = inputs["input_ids"].shape[1]
    four_d = torch.zeros(1, 1, length, length)
    with pytest.raises(ValueError, match=rf"2-D \(batch, seq\) attention_mask .* got a 4-D mask of shape "
                                         rf"\(1, 1, {length}, {length}\).*expected shape \(1, {length}\)"):
        model(**dict(inputs, attention_mask=four_d))
    # Text-only prompts pass such a mask through untouched (nothing to compress).
    text_only = make_batch([prompt_ids(0, 6, 3, seed=2)], [0])
    n = text_only["input_ids"].shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        got = model(input_ids=text_only["input_ids"], attention_mask=causal).logits
    divico.remove_compression(model)
    with torch.no_grad():
        expected = model(input_ids=text_only["input_ids"]).logits
    torch.testing.assert_close(got, expected)


def test_visual_tokens_on_a_filled_cache_name_the_cache_length():
    model = _compressed()
    text = make_batch([prompt_ids(0, 6, 0, seed=2)], [0])
    with torch.no_grad():
        cache = model(**text, use_cache=True).past_key_values
    inputs = sample()
    with pytest.raises(ValueError, match=r"the cache already holds 6 tokens \(valid: 0, an empty cache\)"):
        model(**inputs, past_key_values=cache)


def test_last_report_before_any_prefill_and_on_an_uncompressed_model():
    model = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration has no divico compression; call "
                                         "apply_compression"):
        divico.last_report(model)
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER))
    with pytest.raises(ValueError, match="No prefill with visual tokens has run since apply_compression"):
        divico.last_report(model)
    with torch.no_grad():
        model(**make_batch([prompt_ids(0, 6, 3, seed=2)], [0]))  # text only: still no report
    with pytest.raises(ValueError, match="No prefill with visual tokens"):
        divico.last_report(model)


# --- configs -------------------------------------------------------------------------------------------------
def test_config_round_trips_through_dict_and_json(tmp_path: Path):
    config = divico.CompressionConfig("divico", keep_tokens=12, layer=3, encoder="deterministic",
                                      encoder_hidden_size=24, init_sigma=0.05, scoring="full_attention",
                                      per_frame_keep=True, kl_reduction="mean", extra={"note": [1, 2]})
    as_dict = config.to_dict()
    assert as_dict == {"method": "divico", "keep_ratio": None, "keep_tokens": 12, "layer": 3,
                       "encoder": "deterministic", "encoder_hidden_size": 24, "init_sigma": 0.05,
                       "scoring": "full_attention", "per_frame_keep": True, "kl_reduction": "mean",
                       "selector": "attention", "extra": {"note": [1, 2]}}
    assert divico.CompressionConfig.from_dict(as_dict) == config
    config.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == as_dict
    assert divico.CompressionConfig.from_json(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match=r"Unknown CompressionConfig fields \['keep', 'ratio'\]; known: \[.*'keep_ratio'"):
        divico.CompressionConfig.from_dict({"method": "fastv", "keep": 3, "ratio": 0.5})
    with pytest.raises(ValueError, match=r"encoder must be one of \('variational', 'deterministic', 'none'\), got 'vae'"):
        divico.CompressionConfig.from_dict({"method": "divico", "keep_ratio": 0.5, "encoder": "vae"})


@pytest.mark.parametrize(
    ("num_visual", "ratio", "expected"),
    [
        (64, 0.25, 16),
        (576, 64 / 576, 64),  # 64.00000000000001: no float drift in either direction
        (576, 192 / 576, 192),
        (36, 0.125, 4),  # 4.5: Python's round, half to even
        (36, 0.375, 14),  # 13.5 -> 14
        (10, 0.15, 2),  # 1.5 -> 2
        (5, 0.1, 1),  # 0.5 rounds to 0: at least one token stays
        (100, 0.001, 1),
        (7, 1.0, 7),
        (0, 0.5, 0),  # no visual tokens: nothing to keep
    ],
)
def test_keep_count_rounding(num_visual, ratio, expected):
    """``max(1, round(keep_ratio * Nv))`` (config.py's documented rule), by hand for each case."""
    assert keep_count(num_visual, keep_ratio=ratio) == expected
    assert divico.CompressionConfig("fastv", keep_ratio=ratio).keep_count(num_visual) == expected


@pytest.mark.parametrize("ratio", [9 / 128, 11 / 128, 0.3])  # 4.5 -> 4, 5.5 -> 6, 19.2 -> 19 of 64 tokens
def test_the_engine_keeps_the_documented_count(ratio):
    model = _compressed("fastv", keep_ratio=ratio)
    with torch.no_grad():
        model(**sample())
    assert int(divico.last_report(model).num_kept[0]) == max(1, round(ratio * TOKENS_PER_IMAGE))


def test_keep_count_errors_name_the_value_and_the_range():
    with pytest.raises(ValueError, match=r"keep_tokens=70 exceeds the 64 visual tokens of this sample; valid range "
                                         r"is \[1, 64\]"):
        keep_count(64, keep_tokens=70)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 1.2"):
        keep_count(64, keep_ratio=1.2)
    with pytest.raises(ValueError, match=r"keep_tokens must be >= 1, got 0"):
        keep_count(64, keep_tokens=0)
    with pytest.raises(ValueError, match=r"exactly one of keep_ratio \(in \(0, 1\]\) or keep_tokens \(>= 1\); got "
                                         r"keep_ratio=0.5, keep_tokens=3"):
        keep_count(64, keep_tokens=3, keep_ratio=0.5)


# --- register_method -----------------------------------------------------------------------------------------
def test_register_method_refuses_bad_and_taken_names():
    for bad in ("", "none", None):
        with pytest.raises(ValueError, match=re.escape(f"non-empty string other than 'none', got {bad!r}")):
            register_method(bad)  # type: ignore[arg-type]

    class Other(CompressionMethod):
        pass

    with pytest.raises(ValueError, match="Method name 'fastv' is already registered by FastV"):
        register_method("fastv")(Other)
    assert divico.CompressionConfig("fastv", keep_ratio=0.5)  # the shipped one is untouched
    register_method("h8-temporary")(Other)
    try:
        assert "h8-temporary" in divico.available_methods() and Other.name == "h8-temporary"
        register_method("h8-temporary")(Other)  # the same class again: idempotent
    finally:
        unregister_method("h8-temporary")
    assert "h8-temporary" not in divico.available_methods()
    with pytest.raises(ValueError, match=rf"Unknown method 'h8-temporary'; known methods: {', '.join(divico.available_methods())}\."):
        divico.CompressionConfig("h8-temporary", keep_ratio=0.5)


# --- rarely taken paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "divico", "deco"])
def test_inputs_embeds_path_equals_the_input_ids_path(method):
    """Visual tokens found from the placeholder's embedding give the same selection and logits as from ids."""
    options = {"keep_tokens": 16} if method == "deco" else {"keep_ratio": 0.25}
    model = _compressed(method, **options)
    if method == "divico":
        randomize_compressor(model)
    inputs = make_batch([prompt_ids(1, 5, 7, seed=1), prompt_ids(2, 3, 4, seed=2)], [1, 2])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        by_ids = divico.last_report(model)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values"]).logits
        by_embeds = divico.last_report(model)
    assert torch.equal(by_embeds.visual_positions, by_ids.visual_positions)
    assert torch.equal(by_embeds.kept_positions, by_ids.kept_positions)
    assert by_embeds.seq_len_after == by_ids.seq_len_after < by_ids.seq_len_before
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-5, rtol=0)


def test_per_frame_keep_on_multi_image_llava_keeps_each_images_top_k():
    """Two images of 64 tokens at keep_ratio 0.25: each keeps the 16 highest-scoring tokens of its own."""
    model = _compressed("fastv", keep_ratio=0.25, per_frame_keep=True)
    pooled = _compressed("fastv", keep_ratio=0.25)
    inputs = make_batch([prompt_ids(2, 3, 4, seed=2)], [2])
    with torch.no_grad():
        model(**inputs)
        pooled(**inputs)
    report, pooled_report = divico.last_report(model), divico.last_report(pooled)
    positions, scores = report.visual_positions[0], report.scores[0]
    expected = []
    for image in range(2):
        rows = slice(image * TOKENS_PER_IMAGE, (image + 1) * TOKENS_PER_IMAGE)
        top = torch.argsort(scores[rows], descending=True, stable=True)[:16]
        expected += positions[rows][top].tolist()
    assert report.kept_positions[0].tolist() == sorted(expected)
    # One pool over both images takes the top 32 of all 128 (here not 16 + 16, so the option matters).
    top_all = torch.argsort(pooled_report.scores[0], descending=True, stable=True)[:32]
    assert pooled_report.kept_positions[0].tolist() == sorted(pooled_report.visual_positions[0][top_all].tolist())
    per_image = [int(((pooled_report.kept_positions[0] >= int(positions[i * 64])) &
                      (pooled_report.kept_positions[0] <= int(positions[i * 64 + 63]))).sum()) for i in range(2)]
    assert per_image != [16, 16]


def test_encoder_none_is_fastv_with_nothing_to_save(tmp_path: Path):
    """Fig. 8's variant a: no g_theta, no weights, FastV's logits and FLOPs."""
    inputs = make_batch([prompt_ids(1, 5, 7, seed=1), prompt_ids(2, 3, 4, seed=2)], [1, 2])
    none = _compressed("divico", encoder="none")
    fastv = _compressed("fastv")
    with torch.no_grad():
        got, expected = none(**inputs).logits, fastv(**inputs).logits
    assert torch.equal(got, expected)
    assert divico.get_runtime(none).compressor is None and not hasattr(none, "divico_compressor")
    assert divico.last_report(none).kl is None
    divico.save_compressor(none, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["weights"] == [] and not (tmp_path / "compressor.safetensors").exists()
    loaded = tiny_llava(seed=0)
    divico.load_compressor(loaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


# --- load_compressor -----------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    """A DiViCo compressor (randomised g_theta) with a LoRA adapter, saved from a tiny LLaVA."""
    model = tiny_llava(seed=0)
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=lora_target_regex(model, ["q_proj"])))
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER,
                                                             encoder_hidden_size=8))
    randomize_compressor(model)
    return divico.save_compressor(model, tmp_path / "saved")


def test_missing_config_json_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=rf"No divico compressor at '{re.escape(str(tmp_path))}': "
                                                rf".*config.json is missing"):
        divico.load_compressor(tiny_llava(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"compression": {}}))
    with pytest.raises(ValueError, match=r"lacks \['model_class', 'hidden_size', 'num_layers'\]"):
        divico.load_compressor(tiny_llava(), tmp_path)


def test_another_model_class_is_refused_before_anything_changes(saved: Path):
    qwen = tiny_qwen("qwen2_vl")
    with pytest.raises(ValueError, match="saved for model class LlavaForConditionalGeneration, not "
                                         "Qwen2VLForConditionalGeneration"):
        divico.load_compressor(qwen, saved)
    assert divico.get_runtime(qwen) is None and not has_lora(qwen)


def test_another_weight_list_names_missing_and_unexpected_tensors(saved: Path):
    meta = json.loads((saved / "config.json").read_text())
    listed = meta["weights"]
    meta["weights"] = listed[1:] + ["compressor.extra.weight"]
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"missing \['compressor.extra.weight'\], unexpected \['{listed[0]}'\] "
                                         rf"\({len(listed)} tensors in the file\)"):
        divico.load_compressor(tiny_llava(), saved)
    # A file and list that agree with each other but not with what the config builds.
    state = load_file(str(saved / "compressor.safetensors"))
    state["compressor.extra.weight"] = torch.zeros(2)
    save_file(state, str(saved / "compressor.safetensors"))
    meta["weights"] = sorted(state)
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"the checkpoint has \['compressor.extra.weight'\] that this model lacks "
                                         r"and lacks nothing"):
        divico.load_compressor(tiny_llava(), saved)


def test_encoder_width_mismatch_names_the_module_and_both_shapes(saved: Path):
    meta = json.loads((saved / "config.json").read_text())
    meta["compression"]["encoder_hidden_size"] = None  # the tiny model's default width is d = 64, not 8
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"do not fit the 'compressor' module this config builds \("
                                         r"compressor.fc1.bias: saved \(8,\), built \(64,\), compressor.fc1.weight: "
                                         r"saved \(8, 128\), built \(64, 128\).*encoder_hidden_size is None"):
        divico.load_compressor(tiny_llava(), saved)


@pytest.mark.parametrize(("field", "value"), [("keep_ratio", 0.5), ("layer", 1), ("scoring", "full_attention")])
def test_same_method_with_another_config_is_an_error_unless_overridden(saved: Path, field, value):
    """The model's own config used to win silently; now the difference is named, or overridden explicitly."""
    meta = json.loads((saved / "config.json").read_text())
    saved_value = meta["compression"][field]
    options = dict(meta["compression"], **{field: value})
    model = tiny_llava(seed=0)
    divico.apply_compression(model, divico.CompressionConfig.from_dict(options))
    with pytest.raises(ValueError, match=rf"saved with another config .*\({field}: saved {saved_value!r}, model "
                                         rf"{value!r}\).*override_config=True"):
        divico.load_compressor(model, saved)
    assert not has_lora(model)  # refused before the adapter was injected
    divico.load_compressor(model, saved, override_config=True)
    assert getattr(divico.compression_config(model), field) == value
    weights = load_file(str(saved / "compressor.safetensors"))
    for key, tensor in divico.get_runtime(model).compressor.state_dict().items():
        assert torch.equal(tensor, weights[f"compressor.{key}"])
    assert has_lora(model)
    # Without a compression on the model, the saved config is applied.
    fresh = tiny_llava(seed=0)
    divico.load_compressor(fresh, saved)
    assert getattr(divico.compression_config(fresh), field) == saved_value


def test_another_method_is_refused_even_with_override(saved: Path):
    model = tiny_llava(seed=0)
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER,
                                                             encoder="deterministic", encoder_hidden_size=8))
    with pytest.raises(ValueError, match=r"is for method='divico' \(encoder='variational'\), but the model is "
                                         r"compressed with method='divico' \(encoder='deterministic'\)"):
        divico.load_compressor(model, saved, override_config=True)
