"""Qwen2-VL / Qwen2.5-VL (3-D mRoPE, dynamic resolution, video, sliding-window layers) on tiny random models.

The contract matrix (tests/test_contract.py) covers both classes for every method; here: what is specific to them
(per-frame keeping, DeCo on dynamic-resolution grids, the sliding window the matrix relies on, LoRA training).
"""

from __future__ import annotations

import pytest
import torch

import divico
from contract_cases import (
    ATTN_IMPLEMENTATIONS,
    batch_of,
    check_batch_equals_singles,
    check_cache_lengths,
    check_cached_decode,
    check_keep_all,
    check_oracle,
    compress_config,
    fresh,
    one_torch_thread,
)
from tiny_models import (
    PAD_TOKEN_ID as PAD,
    qwen_batch as make_batch,
    qwen_item as item,
    qwen_prompt as prompt,
    tiny_qwen,
)

LAYER = 2
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def mixed_prompts() -> list[dict]:
    """16 image tokens / 12 image + 16 video tokens (2 frames) / text only: different visual counts per sample."""
    return [prompt([item("image", 1, 8, 8, 1)], 4, 5, seed=1),
            prompt([item("image", 1, 4, 12, 2), item("video", 2, 4, 8, 3)], 2, 3, seed=2),
            prompt([], 6, 4, seed=3)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_qwen("qwen2_vl")


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "model" in request.fixturenames:
        divico.remove_compression(request.getfixturevalue("model"))


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_contract_prompts_exercise_the_sliding_window(kind):
    """Layers >= 1 of the tiny models use a 24-token window: the score layer K-1 is one, and the matrix's compressed
    sequences (layers >= K) are longer than the window, so its masks are tested on both sides of K."""
    model_class = CLASSES[kind]
    model = fresh(model_class, "sdpa")
    adapter = divico.registry.get_adapter(model)
    assert [adapter.sliding_window(i) for i in range(adapter.num_layers())] == [None, 24, 24, 24]
    divico.apply_compression(model, compress_config("fastv"))
    inputs = batch_of(model_class, (0, 1))
    with torch.no_grad():
        model(**inputs)
    report = divico.last_report(model)
    lengths = inputs["attention_mask"].sum(dim=1) - report.num_visual + report.num_kept
    assert bool((lengths > 24).all()), lengths


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_per_frame_keep_keeps_the_contract(kind, attn):
    """``per_frame_keep`` (groups from the grids, or from mRoPE positions in generate()) passes the matrix checks."""
    for method in ("fastv", "divico"):
        for check in (check_keep_all, check_cache_lengths, check_cached_decode, check_batch_equals_singles,
                      check_oracle):
            check(method, CLASSES[kind], attn, per_frame_keep=True)


def test_deco_pools_each_item_grid(model):
    """Dynamic resolution: every image and every temporal slice of a video is pooled on its own grid."""
    batch = make_batch(mixed_prompts()[:2])
    length = batch["input_ids"].shape[1]
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=4))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    report = divico.last_report(model)
    # Image 4x4 -> 2x2; image 2x6 -> 1x4 (2x3 windows); each video frame 2x4 -> 1x2 (2x2 windows; 1x4 and 2x2 would
    # make 2:1 windows, so DeCo pools to the nearest near-square count): 16 -> 4 and 28 -> 4 + 2 x 2 = 8.
    assert report.num_visual.tolist() == [16, 28] and report.num_kept.tolist() == [4, 8]
    assert [(g.t, g.h, g.w) for g in report.extra["pooled_grids"][0]] == [(1, 2, 2), (1, 1, 4)]
    assert [out.cache.get_seq_length(i) for i in range(4)] == [length - (16 - 4)] * 4


def test_per_frame_keep_keeps_a_share_of_every_frame(model):
    """Every frame of a video keeps its share, in the prefill of a forward and of generate()."""
    batch = make_batch([prompt([item("video", 3, 4, 8, 5)], 3, 4, seed=5)])  # 3 frames x 8 tokens
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER,
                                                             per_frame_keep=True))
    with torch.no_grad():
        model(**batch)
    report = divico.last_report(model)
    start = int(report.visual_positions[0, 0])
    frames = (report.kept_positions[0] - start) // 8
    assert frames.tolist() == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():  # generate() passes no grids to the forward: frames come from the mRoPE positions
        model.generate(**batch, **GEN)
    assert torch.equal(((divico.last_report(model).kept_positions[0] - start) // 8), frames)


def test_lora_kl_training_steps_and_save_load(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_qwen("qwen2_5_vl")
    batch = make_batch(mixed_prompts()[:2])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=r".*language_model.*\.(q|v)_proj"))
    divico.apply_compression(wrapped, divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER))
    wrapped.train()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert any(p is q for q in model.divico_compressor.parameters() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = {id(p): p.detach().clone() for p in trainable}
    for _ in range(3):
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
    loaded = tiny_qwen("qwen2_5_vl")
    divico.load_compressor(loaded, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)


