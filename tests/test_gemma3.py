"""Gemma 3 under layer-K pruning, with the processor's ``token_type_ids`` (bidirectional image blocks).

The contract matrix runs the tiny Gemma 3 without ``token_type_ids`` (its oracle mask is causal only); here every
check keeps them, so each image's kept tokens must still see each other in both directions at layers >= K:

* the compressed model equals the unmodified model whose layers >= K get a hand-built mask: causal OR same image
  block, removed visual tokens and padding hidden, a sliding window counted in kept tokens; dropping the
  bidirectional blocks from the mask rebuild makes it fail;
* every layer >= K gets its own layer type's RoPE tables at the kept tokens' original positions;
* keep-all is bit-identical; per-layer cache lengths (sliding layers store the last window - 1 keys); cached decode
  equals an uncached forward on the same kept set; a padded batch equals single runs;
* a LoRA + KL training step reaches g_theta and the LoRA layers of every layer;
* DeCo pools the 4 x 4 token grid between the projector's own average pool and its norm + projection, which is an
  exact average pool of the 8 x 8 patch grid; a pooled grid that does not divide the token grid is refused.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn

import divico
from contract_cases import generation_kwargs, one_torch_thread
from divico.adapters.gemma3 import Gemma3Adapter
from divico.lora import inject_lora, lora_target_regex
from tiny_gemma3 import (
    GEMMA3_LAYER_TYPES,
    GEMMA3_ROPE_THETA,
    GEMMA3_SLIDING_WINDOW,
    gemma3_batch,
    gemma3_prompts,
    tiny_gemma3,
)
from tiny_models import IMAGE_TOKEN_ID

LAYER = 2
ATOL = 1e-5
MIXED = (0, 1, 2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@functools.lru_cache(maxsize=None)
def _pristine(attn: str) -> nn.Module:
    return tiny_gemma3(attn)


def _fresh(attn: str) -> nn.Module:
    return copy.deepcopy(_pristine(attn))


def _inputs(which: tuple[int, ...] = MIXED, token_type_ids: bool = True) -> dict[str, torch.Tensor]:
    prompts = gemma3_prompts()
    return gemma3_batch([prompts[i] for i in which], token_type_ids=token_type_ids)


def _config(method: str = "fastv", **overrides: Any) -> divico.CompressionConfig:
    return divico.CompressionConfig(**{"method": method, "keep_ratio": 0.25, "layer": LAYER, **overrides})


def _keep_mask(input_ids: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """(B, N): text and padding, plus the report's kept visual positions (-1 = none)."""
    visual = input_ids == IMAGE_TOKEN_ID
    positions = torch.arange(input_ids.shape[1])
    kept = torch.stack([torch.isin(positions, row[row >= 0]) for row in kept_positions])
    return ~visual | kept


def _image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) id of each contiguous run of image tokens (-1 at text): one block per image."""
    image = token_type_ids == 1
    starts = image & ~F.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(dim=1), -1)


def _oracle_mask(keep: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                 window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, N, N) additive mask of a layer >= K over the *original* positions.

    Allowed: (key at or before the query, or both in one image block) and the key is kept and not padding; in a
    sliding layer also the key at most ``window - 1`` kept tokens before the query (keys after it are not bounded,
    as in Gemma 3's AND(window, OR(causal, block))).
    """
    length = keep.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None].expand(keep.shape[0], -1, -1)
    if token_type_ids is not None:
        blocks = _image_blocks(token_type_ids)
        allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    allowed = allowed & (keep & attention_mask.bool())[:, None, :]
    if window is not None:
        rank = keep.long().cumsum(dim=1)
        allowed = allowed & ((rank[:, :, None] - rank[:, None, :]) < window)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _run_with_masks(model: nn.Module, inputs: dict[str, torch.Tensor], masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` with layer ``idx``'s attention mask replaced by ``masks[idx]``."""
    layers = model.model.language_model.layers

    def replace(idx: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        return args, {**kwargs, "attention_mask": masks[idx]}

    handles = [layers[idx].register_forward_pre_hook(functools.partial(replace, idx), with_kwargs=True)
               for idx in masks]
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()


def _oracle_logits(attn: str, inputs: dict[str, torch.Tensor], keep: torch.Tensor,
                   bidirectional: bool) -> torch.Tensor:
    """The unmodified model with the removed visual tokens hidden from layers >= K (positions unchanged)."""
    types = inputs["token_type_ids"] if bidirectional else None
    windows = [GEMMA3_SLIDING_WINDOW if kind == "sliding_attention" else None for kind in GEMMA3_LAYER_TYPES]
    masks = {idx: _oracle_mask(keep, inputs["attention_mask"], types, windows[idx], torch.float32)
             for idx in range(LAYER, len(GEMMA3_LAYER_TYPES))}
    return _run_with_masks(_pristine(attn), inputs, masks)


def _compressed(attn: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    model = _fresh(attn)
    divico.apply_compression(model, _config())
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, _keep_mask(inputs["input_ids"], divico.last_report(model).kept_positions)


# --- the oracle ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compressed_equals_the_bidirectional_oracle(attn):
    inputs = _inputs()
    with torch.no_grad():
        causal_everywhere = _pristine(attn)(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    # Not vacuous: the image blocks change the unmodified model's output.
    assert (causal_everywhere[:, -1] - _pristine(attn)(**inputs).logits[:, -1]).abs().max() > 1e-3
    compressed, keep = _compressed(attn, inputs)
    assert bool((~keep).any())
    oracle = _oracle_logits(attn, inputs, keep, bidirectional=True)
    rows = keep & inputs["attention_mask"].bool()
    torch.testing.assert_close(compressed[rows], oracle[rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(compressed[:, -1], oracle[:, -1], atol=ATOL, rtol=0)


def test_dropping_bidirectionality_from_the_rebuild_fails_the_oracle(monkeypatch):
    """With the mask rebuild's image blocks removed, the compressed model leaves the bidirectional oracle (and
    matches a causal-only one at layers >= K instead)."""
    inputs = _inputs()
    monkeypatch.setattr(Gemma3Adapter, "kept_token_type_ids", lambda self: None)
    compressed, keep = _compressed("eager", inputs)
    bidirectional = _oracle_logits("eager", inputs, keep, bidirectional=True)
    causal = _oracle_logits("eager", inputs, keep, bidirectional=False)
    assert (compressed[:, -1] - bidirectional[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(compressed[:, -1], causal[:, -1], atol=ATOL, rtol=0)


def test_each_layer_gets_its_own_rope_at_the_kept_positions():
    """Layers >= K run on the kept tokens with their layer type's base (100 sliding, 10000 full) at the original
    positions (Gemma 3 numbers positions 0..N-1 without looking at padding)."""
    inputs = _inputs()
    model = _fresh("sdpa")
    divico.apply_compression(model, _config())
    received: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = model.model.language_model.layers

    def capture(idx: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        received[idx] = kwargs["position_embeddings"]

    handles = [layers[idx].self_attn.register_forward_pre_hook(functools.partial(capture, idx), with_kwargs=True)
               for idx in range(LAYER, len(layers))]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    keep = _keep_mask(inputs["input_ids"], divico.last_report(model).kept_positions)
    head_dim = model.config.text_config.head_dim
    for idx in range(LAYER, len(layers)):
        theta = GEMMA3_ROPE_THETA[GEMMA3_LAYER_TYPES[idx]]
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
        cos, sin = received[idx]
        for row in range(keep.shape[0]):
            positions = keep[row].nonzero().flatten().float()
            angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
            count = positions.shape[0]  # the kept tokens fill the last slots (left padding)
            torch.testing.assert_close(cos[row, -count:], angles.cos(), atol=1e-6, rtol=0)
            torch.testing.assert_close(sin[row, -count:], angles.sin(), atol=1e-6, rtol=0)
    assert not torch.allclose(received[LAYER][0], received[LAYER + 1][0])


# --- keep-all, cache, decode, batch --------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_is_bit_identical(attn):
    inputs = _inputs((0, 1))
    reference = _pristine(attn)
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
        ref_tokens = reference.generate(**inputs, **generation_kwargs(reference))
    model = _fresh(attn)
    divico.apply_compression(model, _config(keep_ratio=1.0))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
        assert torch.equal(model.generate(**inputs, **generation_kwargs(model)), ref_tokens)


def test_cache_lengths_per_layer():
    """Layers < K hold N entries and layers >= K the compressed length; a sliding layer stores only its last
    window - 1 keys (the window counts kept tokens)."""
    inputs = _inputs((0, 1))
    model = _fresh("sdpa")
    divico.apply_compression(model, _config())
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    report = divico.last_report(model)
    length, short = report.seq_len_before, report.seq_len_after
    assert short == length - int((report.num_visual - report.num_kept).min()) and short > GEMMA3_SLIDING_WINDOW
    for idx, kind in enumerate(GEMMA3_LAYER_TYPES):
        seen = length if idx < LAYER else short
        assert cache.get_seq_length(idx) == seen
        stored = min(seen, GEMMA3_SLIDING_WINDOW - 1) if kind == "sliding_attention" else seen
        assert cache.layers[idx].keys.shape[-2] == stored, (idx, kind)


def _extend(inputs: dict[str, torch.Tensor], new_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], new_ids], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_ids)], dim=1)
    out["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(new_ids)], dim=1)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decode_equals_uncached_forward(attn):
    """Each cached decode step's logits equal an uncached forward over the prompt plus the tokens so far that
    keeps the prefill's visual tokens (its image blocks rebuilt for the longer sequence)."""
    inputs = _inputs()
    model = _fresh(attn)
    divico.apply_compression(model, _config())
    runtime = divico.get_runtime(model)
    steps = 3
    with torch.no_grad():
        out = model.generate(**inputs, **{**generation_kwargs(model), "max_new_tokens": steps},
                             output_logits=True, return_dict_in_generate=True)
    report = divico.last_report(model)
    keep = _keep_mask(inputs["input_ids"], report.kept_positions)
    length = inputs["input_ids"].shape[1]
    for step in range(1, steps):
        new_ids = out.sequences[:, length:length + step]
        forced = torch.cat([keep, torch.ones_like(new_ids, dtype=torch.bool)], dim=1)
        runtime.method.select = lambda scores, visual, groups, forced=forced, **kwargs: forced
        with torch.no_grad():
            uncached = model(**_extend(inputs, new_ids), use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step], uncached, atol=ATOL, rtol=0)


def test_batch_equals_single_runs():
    inputs = _inputs()
    model = _fresh("sdpa")
    divico.apply_compression(model, _config())
    gen = dict(generation_kwargs(model), output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(**inputs, **gen)
        for row in MIXED:
            one = _inputs((row,))
            single = model.generate(**one, **gen)
            assert torch.equal(batched.sequences[row, inputs["input_ids"].shape[1]:],
                               single.sequences[0, one["input_ids"].shape[1]:])
            for step, logits in enumerate(single.logits):
                torch.testing.assert_close(batched.logits[step][row], logits[0], atol=1e-4, rtol=0)


# --- DeCo ----------------------------------------------------------------------------------------------------
def test_deco_is_an_average_pool_of_the_patch_grid():
    """keep 1/4 of a 4 x 4 token grid -> 2 x 2: each LLM token is the projector's norm + projection of the mean of
    a 4 x 4 patch window of the 8 x 8 vision grid; the prompt's placeholders shrink to 4 per image."""
    inputs = _inputs((1,))
    model = _fresh("sdpa")
    divico.apply_compression(model, _config("deco"))
    inner = model.model
    projector = inner.multi_modal_projector
    with torch.no_grad():
        patches = inner.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state  # (n, 64, d)
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, 8, 8)
        means = F.avg_pool2d(grid, kernel_size=4).flatten(2).transpose(1, 2)  # (n, 4, d)
        expected = projector.mm_soft_emb_norm(means) @ projector.mm_input_projection_weight
        got = inner.get_image_features(inputs["pixel_values"]).pooler_output
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        out = model(**inputs, use_cache=True)
    report = divico.last_report(model)
    assert report.num_kept.tolist() == [2 * 4]
    assert out.past_key_values.get_seq_length(0) == inputs["input_ids"].shape[1] - 2 * (16 - 4)


def test_deco_refuses_a_grid_that_does_not_divide_the_token_grid():
    model = _fresh("sdpa")
    with pytest.raises(ValueError, match=r"3x3, which does not\s+divide it"):
        divico.apply_compression(model, divico.CompressionConfig(method="deco", keep_tokens=9))
    assert divico.get_runtime(model) is None


# --- training ------------------------------------------------------------------------------------------------
def test_lora_and_kl_training_step_updates_lora_and_g_theta():
    """One LM + KL step in train mode, image blocks on: gradients reach g_theta and the LoRA layers of every
    layer (those >= K through the rebuilt masks), and the step changes the compressed model's logits."""
    inputs = _inputs((0, 1))
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -4:] = inputs["input_ids"][:, -4:]  # the answer: the last four text tokens
    model = _fresh("sdpa")
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=lora_target_regex(model, ["q_proj", "v_proj"])))
    divico.apply_compression(model, _config("divico"))
    runtime = divico.get_runtime(model)
    trained = [p for p in runtime.compressor.parameters()] + [p for n, p in model.named_parameters() if "lora_" in n]
    for param in trained:
        param.requires_grad_(True)
    with torch.no_grad():
        before = model(**inputs).logits[:, -1]
    model.train()
    out = model(**inputs, labels=labels)
    kl = divico.last_report(model).kl
    assert kl is not None and bool(torch.isfinite(kl).all())
    (out.loss + 0.1 * kl.mean()).backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    for idx in range(len(GEMMA3_LAYER_TYPES)):
        grads = [g for n, g in lora_b.items() if f"layers.{idx}." in n]
        assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads), f"layer {idx}"
    assert all(p.grad is not None for p in runtime.compressor.parameters())
    torch.optim.SGD(trained, lr=0.5).step()
    model.eval()
    with torch.no_grad():
        assert (model(**inputs).logits[:, -1] - before).abs().max() > 1e-4


def test_visionzip_keeps_the_tokens_whose_patches_receive_most_attention():
    """keep 4 of 16: 3 dominant + 1 contextual. The dominant tokens are the 3 whose 2 x 2 patches receive the most
    attention in SigLIP's last layer (eager ``output_attentions``, mean over heads and queries), in grid order, each
    projected exactly as the model projects its own pooled token."""
    inputs = _inputs((1,))
    model = _fresh("eager")
    divico.apply_compression(model, _config("visionzip"))
    inner = model.model
    projector = inner.multi_modal_projector
    with torch.no_grad():
        tower = inner.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
        received = tower.attentions[-1].mean(dim=(1, 2))  # (n, 64) over heads and queries
        per_token = received.view(-1, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1)  # (n, 16)
        grid = tower.last_hidden_state.transpose(1, 2).reshape(received.shape[0], -1, 8, 8)
        tokens = F.avg_pool2d(grid, kernel_size=2).flatten(2).transpose(1, 2)  # (n, 16, d)
        chosen = per_token.topk(3, dim=1).indices.sort(dim=1).values
        dominant = tokens.gather(1, chosen[:, :, None].expand(-1, -1, tokens.shape[-1]))
        expected = projector.mm_soft_emb_norm(dominant) @ projector.mm_input_projection_weight
        got = inner.get_image_features(inputs["pixel_values"]).pooler_output
    assert got.shape[1] == 4
    torch.testing.assert_close(got[:, :3], expected, atol=ATOL, rtol=0)
