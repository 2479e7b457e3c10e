"""Core engine on tiny random LLaVA models: what the contract matrix (tests/test_contract.py) does not cover.

The matrix runs every method's default config; here: DiViCo's encoder variants and FastV-style scoring through the
same checks, DiViCo's gap and KL, errors, peft-wrapped models and teacher-forced scoring.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import divico
from contract_cases import (
    ATTN_IMPLEMENTATIONS,
    check_batch_equals_singles,
    check_cached_decode,
    check_keep_all,
    check_oracle,
    check_save_load,
    check_scores,
    one_torch_thread,
)
from tiny_models import make_batch, prompt_ids, randomize_compressor, sample, tiny_llava, tiny_llava_config

LAYER = 2
LLAVA = "LlavaForConditionalGeneration"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("encoder", ["deterministic", "none"])
def test_divico_encoder_variants_keep_the_contract(encoder, attn, tmp_path: Path):
    """Fig. 8's variants b (deterministic g_theta) and a (selection only) keep the engine's contract too."""
    for check in (check_keep_all, check_cached_decode, check_batch_equals_singles, check_oracle):
        check("divico", LLAVA, attn, encoder=encoder)
    check_save_load("divico", LLAVA, attn, tmp_path, encoder=encoder)


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_full_attention_scoring_matches_eager_attention(attn):
    """The official FastV way (the full N x N attention at K-1) gives the same scores as the default q/k product."""
    check_scores("fastv", LLAVA, attn, scoring="full_attention")
    check_oracle("fastv", LLAVA, attn, scoring="full_attention")


def mixed_batch() -> tuple[list[list[int]], list[int]]:
    prompts = [prompt_ids(1, 5, 7, seed=1), prompt_ids(2, 3, 4, seed=2), prompt_ids(0, 9, 6, seed=3)]
    return prompts, [1, 2, 0]


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
    with pytest.raises(ValueError, match=rf"Unknown method 'nope'; known methods: {', '.join(divico.available_methods())}\."):
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
                                        f"{', '.join(divico.available_models())}\\."):
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
    with pytest.raises(ValueError, match="keep_tokens=65 exceeds the 64 tokens of one 8x8 image/frame grid"):
        divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=65))
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
