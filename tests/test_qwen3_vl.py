"""Qwen3-VL (per-head q/k norms, interleaved mRoPE, DeepStack, per-frame video runs) on tiny random models.

The contract matrix (tests/test_contract.py) runs every check for ``Qwen3VLForConditionalGeneration``: keep-all
bit-identical, scores = eager attention, cache lengths, cached decode = uncached, batch = singles, save/load, and
the masked oracle — the unmodified model with the removed visual tokens hidden from layers >= K,
whose DeepStack additions after layers >= K land on the kept tokens. Here: that the tiny config puts a DeepStack
level after K and the oracle catches a skipped addition, per-frame keeping on videos, DeCo against a hand-built
reference (pooled main *and* DeepStack features through ``mm_encoder_outputs``), LoRA + KL training.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import divico
from contract_cases import (
    ATTN_IMPLEMENTATIONS,
    LAYER,
    batch_of,
    check_batch_equals_singles,
    check_cache_lengths,
    check_cached_decode,
    check_keep_all,
    check_oracle,
    check_scores,
    fresh,
    one_torch_thread,
)
from divico.adapters.qwen3_vl import Qwen3VLAdapter
from divico.methods.deco import pooled_grid
from divico.methods.divprune import divprune_indices
from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, QWEN_MERGE, VIDEO_TOKEN_ID, qwen_batch, qwen_item
from tiny_qwen3_vl import DEEPSTACK_LEVELS, qwen3_prompt, tiny_qwen3_vl

MODEL = "Qwen3VLForConditionalGeneration"
GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD_TOKEN_ID)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _skipping_deepstack_after_k(adapter: Qwen3VLAdapter, runtime: Any) -> list[Any]:
    """A broken adapter hook: on the compressed sequence, DeepStack is silently not added."""

    def deepstack(original: Any, hidden_states: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> Any:
        if runtime.current_selection is not None:  # after a layer >= K
            return hidden_states
        return original(hidden_states, mask, embeds)

    return [divico.adapters.base.wrap_method_call(adapter.text_model(), "_deepstack_process", deepstack)]


def test_deepstack_levels_reach_past_k():
    """The tiny config adds DeepStack features after layers 0..2, so with K = 2 one addition is on the compressed
    sequence; the contract prompts' DeepStack features are not negligible there."""
    model = fresh(MODEL, "sdpa")
    adapter = divico.registry.get_adapter(model)
    assert isinstance(adapter, Qwen3VLAdapter)
    assert adapter.deepstack_layers() == DEEPSTACK_LEVELS > LAYER
    seen: list[torch.Tensor] = []
    text = adapter.text_model()
    handle = divico.adapters.base.wrap_method_call(
        text, "_deepstack_process", lambda original, h, m, e: seen.append(e) or original(h, m, e))
    with torch.no_grad():
        model(**batch_of(MODEL, (0, 1)))
    handle.remove()
    assert len(seen) == DEEPSTACK_LEVELS
    assert float(seen[LAYER].abs().mean()) > 0.1


@pytest.mark.parametrize("method", ["fastv", "divico"])
def test_oracle_catches_a_skipped_or_missing_deepstack_addition(method, monkeypatch):
    """The matrix's oracle check passes with the adapter's DeepStack routing and fails when the addition after K is
    silently skipped. Without any routing the model crashes where the compressed sequence is shorter (the visual
    mask no longer fits the hidden states), and is silently wrong where a text-only sample keeps the batch's length
    (the mask then marks other rows of the rearranged sequence): the oracle catches that too."""
    check_oracle(method, MODEL, "sdpa")
    monkeypatch.setattr(Qwen3VLAdapter, "register_runtime_hooks", _skipping_deepstack_after_k)
    with pytest.raises(AssertionError):
        check_oracle(method, MODEL, "sdpa")
    monkeypatch.setattr(Qwen3VLAdapter, "register_runtime_hooks", lambda adapter, runtime: [])
    with pytest.raises(AssertionError):
        check_oracle(method, MODEL, "sdpa")  # the oracle's batch has a text-only sample: same length, wrong rows
    model = fresh(MODEL, "sdpa")
    divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.25, layer=LAYER))
    with pytest.raises(IndexError), torch.no_grad():
        model(**batch_of(MODEL, (0, 1)))


def test_scores_are_taken_after_the_qk_norms(monkeypatch):
    """Scores equal eager attention only with the q/k norms' outputs: the projections' (pre-norm) fail the check."""
    check_scores("fastv", MODEL, "eager")
    monkeypatch.setattr(Qwen3VLAdapter, "query_key_modules", lambda adapter, attn: (attn.q_proj, attn.k_proj))
    with pytest.raises(AssertionError):
        check_scores("fastv", MODEL, "eager")


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_per_frame_keep_keeps_the_contract(attn):
    """``per_frame_keep`` (one group per image / video frame) passes the matrix checks."""
    for check in (check_keep_all, check_cache_lengths, check_cached_decode, check_batch_equals_singles, check_oracle):
        check("fastv", MODEL, attn, per_frame_keep=True)


def test_per_frame_keep_keeps_a_share_of_every_frame():
    """Every frame run of a video (frames separated by timestamp text) keeps its share, in a forward and in the
    prefill of generate()."""
    model = tiny_qwen3_vl()
    batch = qwen_batch([qwen3_prompt([qwen_item("video", 3, 4, 8, seed=5)], 3, 4, seed=5)])  # 3 frames x 8 tokens
    ids = batch["input_ids"][0]
    video_positions = (ids == VIDEO_TOKEN_ID).nonzero().flatten()
    frame_of = {int(p): i // 8 for i, p in enumerate(video_positions)}
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER,
                                                             per_frame_keep=True))
    with torch.no_grad():
        model(**batch)
        kept = divico.last_report(model).kept_positions[0].tolist()
        assert [frame_of[p] for p in kept] == [0, 0, 1, 1, 2, 2]
        model.generate(**batch, **GEN)
    assert divico.last_report(model).kept_positions[0].tolist() == kept


def _reference_pooling(method: str, main: torch.Tensor, levels: list[torch.Tensor], t: int, h: int,
                       w: int) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """One item's (t * h * w, d) main and DeepStack features reduced by hand as ``method`` does at keep_ratio 0.25.

    DeCo / pooling average each frame's grid to the near-square ``pooled_grid``; DivPrune picks, per frame, the
    tokens its max-min selection chooses on the *main* features and takes those same tokens of every level.
    Returns the pooled main features, the pooled levels and the pooled grid (h', w').
    """
    keep = h * w // 4
    if method == "divprune":
        rows = [divprune_indices(frame, keep).sort().values for frame in main.reshape(t, h * w, -1)]

        def reduce(features: torch.Tensor) -> torch.Tensor:
            frames = features.reshape(t, h * w, -1)
            return torch.cat([frame[index] for frame, index in zip(frames, rows)])

        target = (1, keep)
    else:
        target = pooled_grid(keep, h, w)

        def reduce(features: torch.Tensor) -> torch.Tensor:
            cells = features.reshape(t, h, w, -1).permute(0, 3, 1, 2)
            return F.adaptive_avg_pool2d(cells, target).permute(0, 2, 3, 1).reshape(-1, features.shape[-1])

    return reduce(main), [reduce(level) for level in levels], target


@pytest.mark.parametrize("method", ["deco", "pooling", "divprune"])
def test_input_level_methods_pool_deepstack_features_like_the_main_ones(method):
    """DeCo / pooling / DivPrune equal the unmodified model given, by hand, a prompt with h' x w' placeholders per
    image and per video frame and every frame's main and DeepStack features reduced with the same choices (the same
    averages / the tokens selected on the main features), through ``mm_encoder_outputs``."""
    items = [qwen_item("image", 1, 8, 8, seed=1), qwen_item("video", 2, 4, 8, seed=3)]
    full = qwen_batch([qwen3_prompt(items, 3, 5, seed=7)])
    model = tiny_qwen3_vl()
    reference = tiny_qwen3_vl()
    divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.25))
    with torch.no_grad():
        compressed = model(**full).logits[0, -1]
        compressed_tokens = model.generate(**full, **GEN)[0, full["input_ids"].shape[1]:]
    report = divico.last_report(model)

    encoder_outputs = {}
    pooled_items = []
    with torch.no_grad():
        for kind, pixels, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
            output = reference.model.get_image_features(full[pixels], full[grid_key])
            t, h, w = (int(v) for v in full[grid_key][0])
            h, w = h // QWEN_MERGE, w // QWEN_MERGE
            main, levels, target = _reference_pooling(
                method, output.pooler_output[0], [level[0] for level in output.deepstack_features], t, h, w)
            output.pooler_output = (main,)
            output.deepstack_features = [(level,) for level in levels]
            encoder_outputs[kind] = output
            pooled_items.append(dict(kind=kind, thw=(t, target[0] * QWEN_MERGE, target[1] * QWEN_MERGE)))
    short_ids = torch.tensor([qwen3_prompt(pooled_items, 3, 5, seed=7)["ids"]])  # same seed: same text ids
    inputs = dict(input_ids=short_ids, attention_mask=torch.ones_like(short_ids),
                  mm_token_type_ids=(short_ids == IMAGE_TOKEN_ID).int() + 2 * (short_ids == VIDEO_TOKEN_ID).int())
    inputs.update(image_grid_thw=torch.tensor([pooled_items[0]["thw"]]),
                  video_grid_thw=torch.tensor([pooled_items[1]["thw"]]))
    with torch.no_grad():
        expected = reference(**inputs, mm_encoder_outputs=encoder_outputs).logits[0, -1]
    assert report.num_visual.tolist() == [16 + 2 * 8] and report.num_kept.tolist() == [4 + 2 * 2]
    assert [(g.t, g.h, g.w) for g in report.extra["pooled_grids"][1]] == [(1, 1, 2), (1, 1, 2)]
    assert report.seq_len_after == inputs["input_ids"].shape[1]
    torch.testing.assert_close(compressed, expected, atol=1e-5, rtol=0)
    # The video's two frame runs, each with its timestamp, survive in the shortened prompt.
    assert int((inputs["input_ids"][0] == VIDEO_TOKEN_ID).sum()) == 4
    with torch.no_grad():  # generate() continues from the shortened prompt's positions
        expected_tokens = reference.generate(**inputs, mm_encoder_outputs=encoder_outputs, **GEN)
    assert torch.equal(compressed_tokens, expected_tokens[0, inputs["input_ids"].shape[1]:])


def test_lora_kl_training_steps_and_save_load(tmp_path):
    """Teacher forcing (scores from the last prompt token, through the flattened q/k norms), LoRA + DiViCo's KL
    train; save/load reproduces the logits."""
    peft = pytest.importorskip("peft")
    model = tiny_qwen3_vl()
    batch = batch_of(MODEL, (0, 1))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=r".*language_model.*\.(q|v)_proj"))
    divico.apply_compression(wrapped, divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER))
    wrapped.train()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-4] = -100  # supervise the last 4 tokens: scoring is from the token before them
    before = {id(p): p.detach().clone() for p in trainable}
    for _ in range(2):
        out = wrapped(**batch, labels=labels)
        loss = out.loss + 0.1 * divico.last_report(wrapped).kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(before[id(p)], p) for p in trainable)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(**batch).logits
    divico.save_compressor(wrapped, tmp_path / "c")
    loaded = tiny_qwen3_vl()
    divico.load_compressor(loaded, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
