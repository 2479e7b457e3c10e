"""Core engine on tiny random LLaVA models: exactness, scores, KV cache, batching, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import divico
from tiny_models import (
    TOKENS_PER_IMAGE, make_batch, prompt_ids, randomize_compressor, sample, tiny_llava, tiny_llava_config,
)

LAYER = 2
GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llava(seed=0, attn_implementation=request.param)


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    for name in ("model", "eager_model"):
        if name in request.fixturenames:
            divico.remove_compression(request.getfixturevalue(name))



def mixed_batch() -> tuple[list[list[int]], list[int]]:
    prompts = [prompt_ids(1, 5, 7, seed=1), prompt_ids(2, 3, 4, seed=2), prompt_ids(0, 9, 6, seed=3)]
    return prompts, [1, 2, 0]


KEEP_ALL = {
    "fastv": dict(method="fastv", keep_ratio=1.0),
    "divico": dict(method="divico", keep_ratio=1.0),
    "divico-deterministic": dict(method="divico", keep_ratio=1.0, encoder="deterministic"),
    "deco": dict(method="deco", keep_tokens=TOKENS_PER_IMAGE),
}


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_all_is_bit_identical(model, name):
    prompts, images = mixed_batch()
    batch = make_batch(prompts[:2], images[:2])
    single = sample()
    with torch.no_grad():
        ref_logits = model(**batch).logits
        ref_single = model(**single).logits
        ref_tokens = model.generate(**batch, **GEN)
    divico.apply_compression(model, divico.CompressionConfig(layer=LAYER, **KEEP_ALL[name]))
    with torch.no_grad():
        logits = model(**batch).logits
        single_logits = model(**single).logits
        tokens = model.generate(**batch, **GEN)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(single_logits, ref_single)
    assert torch.equal(tokens, ref_tokens)
    report = divico.last_report(model)
    assert report.seq_len_after == report.seq_len_before


@pytest.mark.parametrize("scoring", ["sdpa", "full_attention"])
def test_scores_match_eager_attention(scoring):
    eager = tiny_llava(seed=0, attn_implementation="eager")
    prompts, images = mixed_batch()
    batch = make_batch(prompts, images)
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    expected_full = attentions[LAYER - 1][:, :, -1, :].mean(dim=1)  # (B, N)
    for attn in ("sdpa", "eager"):
        model = tiny_llava(seed=0, attn_implementation=attn)
        divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER, scoring=scoring))
        with torch.no_grad():
            model(**batch)
        report = divico.last_report(model)
        for row in range(len(prompts)):
            count = int(report.num_visual[row])
            positions = report.visual_positions[row, :count]
            torch.testing.assert_close(report.scores[row, :count], expected_full[row, positions], atol=1e-5, rtol=0)
            assert torch.isnan(report.scores[row, count:]).all()
            # Kept = the top-k by score, sorted by position.
            k = int(report.num_kept[row])
            top = positions[report.scores[row, :count].topk(k).indices].sort().values
            assert torch.equal(report.kept_positions[row, :k], top)
        assert report.num_kept.tolist() == [16, 32, 0]


def test_kv_cache_lengths_per_layer(model):
    inputs = sample()
    length = inputs["input_ids"].shape[1]
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_tokens=10, layer=LAYER))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    compressed = length - TOKENS_PER_IMAGE + 10
    lengths = [cache.get_seq_length(i) for i in range(4)]
    assert lengths == [length] * LAYER + [compressed] * (4 - LAYER)
    assert out.logits.shape[1] == length  # outputs line up with input_ids
    with torch.no_grad():
        generated = model.generate(**inputs, **GEN, return_dict_in_generate=True)
    new = generated.sequences.shape[1] - length - 1  # the last token is not in the cache yet
    lengths = [generated.past_key_values.get_seq_length(i) for i in range(4)]
    assert lengths == [length + new] * LAYER + [compressed + new] * (4 - LAYER)


def test_deco_cache_is_short_in_every_layer(model):
    inputs = sample()
    length = inputs["input_ids"].shape[1]
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=16))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [length - TOKENS_PER_IMAGE + 16] * 4
    assert divico.last_report(model).layer == 0


@pytest.mark.parametrize("method", ["fastv", "divico"])
def test_cached_decode_equals_uncached_forward_on_same_kept_set(model, method):
    prompts, images = mixed_batch()
    batch = make_batch(prompts, images)
    divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.2, layer=LAYER))
    randomize_compressor(model)
    runtime = divico.get_runtime(model)
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        next_ids = prefill.logits[:, -1, :100].argmax(-1, keepdim=True)
        keep_prompt = ~runtime.report.num_visual.new_zeros(batch["input_ids"].shape, dtype=torch.bool)
        positions = torch.arange(batch["input_ids"].shape[1])
        visual = batch["input_ids"] == model.config.image_token_id
        for row in range(len(prompts)):
            kept = runtime.report.kept_positions[row]
            keep_prompt[row] = ~visual[row] | torch.isin(positions, kept[kept >= 0])
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)
        decode = model(input_ids=next_ids, attention_mask=mask, past_key_values=prefill.past_key_values,
                       use_cache=True)
        # Same kept set for an uncached forward over prompt + next token.
        extended_keep = torch.cat([keep_prompt, torch.ones_like(next_ids, dtype=torch.bool)], dim=1)
        runtime.method.select = lambda scores, visual_mask, groups: extended_keep
        full = dict(batch, input_ids=torch.cat([batch["input_ids"], next_ids], 1), attention_mask=mask)
        uncached = model(**full, use_cache=False)
    torch.testing.assert_close(decode.logits[:, -1], uncached.logits[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config",
    [dict(method="fastv", keep_ratio=0.2), dict(method="divico", keep_ratio=0.2),
     dict(method="divico", keep_tokens=8, encoder="deterministic"), dict(method="deco", keep_tokens=16)],
    ids=["fastv", "divico", "divico-deterministic", "deco"],
)
def test_batch_equals_single_runs(model, config):
    prompts, images = mixed_batch()
    divico.apply_compression(model, divico.CompressionConfig(layer=LAYER, **config))
    if config["method"] != "fastv":
        randomize_compressor(model)
    batch = make_batch(prompts, images)
    with torch.no_grad():
        batch_logits = model(**batch).logits[:, -1]
        batch_tokens = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1]:]
        for row, (ids, count) in enumerate(zip(prompts, images)):
            one = make_batch([ids], [count])
            if count:  # the same images as in the batch, in order
                start = sum(images[:row])
                one["pixel_values"] = batch["pixel_values"][start:start + count]
            single_logits = model(**one).logits[:, -1]
            single_tokens = model.generate(**one, **GEN)[:, one["input_ids"].shape[1]:]
            torch.testing.assert_close(batch_logits[row], single_logits[0], atol=1e-4, rtol=0)
            assert torch.equal(batch_tokens[row], single_tokens[0])


def test_sdpa_and_eager_compress_identically():
    inputs = make_batch(*mixed_batch())
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = tiny_llava(seed=0, attn_implementation=attn)
        divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.2, layer=LAYER))
        randomize_compressor(model)
        with torch.no_grad():
            outputs[attn] = (model(**inputs).logits[:, -1], divico.last_report(model).kept_positions)
    torch.testing.assert_close(outputs["sdpa"][0], outputs["eager"][0], atol=1e-5, rtol=0)
    assert torch.equal(outputs["sdpa"][1], outputs["eager"][1])


def test_remove_compression_restores_original_exactly(model):
    inputs = make_batch(*mixed_batch())
    with torch.no_grad():
        before = model(**inputs).logits
        tokens_before = model.generate(**inputs, **GEN)
    state_keys = set(model.state_dict())

    def hooks() -> dict[str, list]:
        # transformers installs its own output-capturing hooks; only ours must come and go.
        return {name: [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
                for name, module in model.named_modules()}

    hooks_before = hooks()
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.1, layer=LAYER))
    assert hooks() != hooks_before
    randomize_compressor(model)
    with torch.no_grad():
        changed = model(**inputs).logits
    assert not torch.allclose(changed, before)
    divico.remove_compression(model)
    assert hooks() == hooks_before
    assert set(model.state_dict()) == state_keys
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
        assert torch.equal(model.generate(**inputs, **GEN), tokens_before)
    with pytest.raises(ValueError, match="no divico compression"):
        divico.last_report(model)


@pytest.mark.parametrize(
    "config",
    [dict(method="divico", keep_ratio=0.2), dict(method="divico", keep_ratio=0.2, encoder="deterministic"),
     dict(method="fastv", keep_ratio=0.2), dict(method="deco", keep_tokens=16)],
    ids=["divico", "divico-deterministic", "fastv", "deco"],
)
def test_save_load_round_trip(tmp_path, config):
    inputs = make_batch(*mixed_batch())
    trained = tiny_llava(seed=0)
    divico.apply_compression(trained, divico.CompressionConfig(layer=LAYER, **config))
    if config["method"] != "fastv":
        randomize_compressor(trained, seed=7)
    with torch.no_grad():
        expected = trained(**inputs).logits
    divico.save_compressor(trained, tmp_path / "c")
    fresh = tiny_llava(seed=0)
    divico.load_compressor(fresh, tmp_path / "c")
    assert divico.compression_config(fresh) == divico.compression_config(trained)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)


def test_untrained_divico_equals_fastv(model):
    inputs = make_batch(*mixed_batch())
    outputs = []
    for method in ("fastv", "divico"):
        divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.2, layer=LAYER))
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
        divico.remove_compression(model)
    assert torch.equal(outputs[0], outputs[1])


def test_divico_gap_uses_removed_tokens_and_kl():
    inputs = sample()
    outputs = {}
    for method in ("fastv", "divico"):
        model = tiny_llava(seed=0)
        divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.25, layer=LAYER))
        if method == "divico":
            randomize_compressor(model)
        with torch.no_grad():
            base = model(**inputs).logits[:, -1]
            report = divico.last_report(model)
            kept = set(report.kept_positions[0].tolist())
            removed = [p for p in report.visual_positions[0].tolist() if p not in kept]

            def perturb_removed(module, args, kwargs):
                hidden = args[0].clone()
                hidden[:, removed[0]] += 3.0
                return (hidden, *args[1:]), kwargs

            # Runs before divico's own layer-K hook: changes a token that compression removes.
            handle = model.model.language_model.layers[LAYER].register_forward_pre_hook(
                perturb_removed, with_kwargs=True, prepend=True)
            outputs[method] = (base, model(**inputs).logits[:, -1], report)
            handle.remove()
    fastv_base, fastv_perturbed, _ = outputs["fastv"]
    divico_base, divico_perturbed, report = outputs["divico"]
    assert torch.equal(fastv_base, fastv_perturbed)  # FastV ignores removed tokens
    assert not torch.allclose(divico_base, divico_perturbed)  # DiViCo's v_p carries them
    assert report.kl is not None and report.kl.item() > 0
    model.train()
    torch.manual_seed(0)
    a = model(**inputs).logits[:, -1]
    b = model(**inputs).logits[:, -1]
    assert not torch.equal(a, b)  # training samples mu + eps * sigma


def test_bad_inputs_raise_clear_errors(tmp_path):
    model = tiny_llava(seed=0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
            divico.CompressionConfig("divico", keep_ratio=bad)
    with pytest.raises(ValueError, match="exactly one of keep_ratio"):
        divico.CompressionConfig("divico", keep_ratio=0.5, keep_tokens=4)
    with pytest.raises(ValueError, match="exactly one of keep_ratio"):
        divico.CompressionConfig("divico")
    with pytest.raises(ValueError, match="keep_tokens must be >= 1"):
        divico.CompressionConfig("divico", keep_tokens=0)
    with pytest.raises(ValueError, match=r"Unknown method 'nope'; known methods: deco, divico, fastv"):
        divico.CompressionConfig("nope", keep_ratio=0.5)
    for layer in (0, -1):
        with pytest.raises(ValueError, match=r"layer must be in \[1, num_hidden_layers - 1\]"):
            divico.CompressionConfig("fastv", keep_ratio=0.5, layer=layer)
    for layer in (4, 9):
        with pytest.raises(ValueError, match=rf"layer={layer} is out of range .* valid range is \[1, 3\]"):
            divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.5, layer=layer))
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="Unsupported model class LlamaForCausalLM; divico supports: "
                                        "LlavaForConditionalGeneration"):
        divico.apply_compression(llm, divico.CompressionConfig("fastv", keep_ratio=0.5))
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=65, layer=2))
    with pytest.raises(ValueError, match=r"keep_tokens=65 exceeds the 64 visual tokens .* valid range is \[1, 64\]"):
        model(**sample())
    with pytest.raises(ValueError, match="already compressed"):
        divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.5))
    divico.remove_compression(model)
    # Loading a compressor saved for another method or hidden size.
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.5))
    divico.save_compressor(model, tmp_path / "divico")
    divico.remove_compression(model)
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=16))
    with pytest.raises(ValueError, match="is for method='divico'.*compressed with method='deco'"):
        divico.load_compressor(model, tmp_path / "divico")
    divico.remove_compression(model)
    config = tiny_llava_config()
    config.text_config.hidden_size = 96
    wider = type(model)(config)
    with pytest.raises(ValueError, match="saved for hidden size 64, but this model's hidden size is 96"):
        divico.load_compressor(wider, tmp_path / "divico")
    with pytest.raises(ValueError, match="DeCo cannot pool a 8x8 patch grid to 13 tokens"):
        divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=13))
        model(**sample())
    divico.remove_compression(model)
    right_padded = sample()
    right_padded["attention_mask"][:, -1] = 0
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.5))
    with pytest.raises(ValueError, match="left padding"):
        model(**right_padded)
    divico.remove_compression(model)


def test_peft_wrapped_model_is_supported():
    peft = pytest.importorskip("peft")
    model = tiny_llava(seed=0)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))
    divico.apply_compression(wrapped, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER))
    with torch.no_grad():
        wrapped(**sample())
    assert divico.last_report(wrapped).seq_len_after < divico.last_report(wrapped).seq_len_before
    divico.remove_compression(wrapped)


@pytest.mark.parametrize("scoring", ["sdpa", "full_attention"])
def test_teacher_forcing_scores_from_last_prompt_token(scoring):
    """With labels, selection must use the last prompt token (as at inference), not the end of the answer."""
    model = tiny_llava(seed=0)
    prompts, images = mixed_batch()
    prompt_batch = make_batch(prompts[:2], images[:2])
    answer = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER, scoring=scoring))
    with torch.no_grad():
        model(**prompt_batch)
        inference = divico.last_report(model)
        full = dict(prompt_batch, input_ids=torch.cat([prompt_batch["input_ids"], answer], 1),
                    attention_mask=torch.cat([prompt_batch["attention_mask"], torch.ones_like(answer)], 1))
        labels = torch.full_like(full["input_ids"], -100)
        labels[:, -answer.shape[1]:] = answer
        model(**full, labels=labels)
        teacher_forced = divico.last_report(model)
        model(**full)  # no labels: the end of the answer scores, a different selection
        unlabeled = divico.last_report(model)
    assert torch.equal(teacher_forced.kept_positions, inference.kept_positions)
    torch.testing.assert_close(teacher_forced.scores, inference.scores, atol=1e-6, rtol=0, equal_nan=True)
    assert not torch.allclose(unlabeled.scores.nan_to_num(), inference.scores.nan_to_num())
