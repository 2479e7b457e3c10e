"""Video-LLaVA (image and video inputs, frames x tokens per frame) on a tiny random model.

The contract matrix (tests/test_contract.py) covers it for every method; here: per-frame keeping and LoRA training.
"""

from __future__ import annotations

import pytest
import torch

import divico
from contract_cases import (
    ATTN_IMPLEMENTATIONS,
    check_batch_equals_singles,
    check_cache_lengths,
    check_cached_decode,
    check_keep_all,
    check_oracle,
    one_torch_thread,
)
from tiny_models import (
    VIDEO_LLAVA_FRAMES as FRAMES,
    VIDEO_LLAVA_PATCHES as PATCHES,
    tiny_video_llava,
    video_llava_batch,
    video_llava_prompt,
)

LAYER = 2
MODEL_CLASS = "VideoLlavaForConditionalGeneration"


def make_batch(specs: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """Left-padded batch; each spec is (images, videos, seed): text, images, videos, text."""
    return video_llava_batch([video_llava_prompt(images, videos, seed) for images, videos, seed in specs])


SPECS = [(0, 1, 1), (1, 0, 2), (1, 1, 3)]  # video only (68 tokens), image only (16), both (84)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_video_llava()


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "model" in request.fixturenames:
        divico.remove_compression(request.getfixturevalue("model"))


def test_per_frame_keep_keeps_a_share_of_every_frame(model):
    """A video's 4 frames (CLS + 16 patches each) keep 3 tokens each; layers >= K cache only those."""
    batch = make_batch(SPECS[:1])
    length = batch["input_ids"].shape[1]
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=3, layer=LAYER, per_frame_keep=True))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    report = divico.last_report(model)
    frame_of_kept = (report.kept_positions[0] - int(report.visual_positions[0, 0])) // (PATCHES + 1)
    assert frame_of_kept.tolist() == [f for f in range(FRAMES) for _ in range(3)]  # 3 tokens from each frame
    visual = FRAMES * (PATCHES + 1)
    assert [out.cache.get_seq_length(i) for i in range(4)] == [length] * 2 + [length - visual + 3 * FRAMES] * 2


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_per_frame_keep_keeps_the_contract(attn):
    """``per_frame_keep`` (every frame and every image its own pool) passes the matrix checks."""
    for method in ("fastv", "divico"):
        for check in (check_keep_all, check_cache_lengths, check_cached_decode, check_batch_equals_singles,
                      check_oracle):
            check(method, MODEL_CLASS, attn, per_frame_keep=True)


def test_lora_kl_training_steps_and_save_load(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_video_llava()
    batch = make_batch(SPECS[:2])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=r".*language_model.*\.(q|v)_proj"))
    divico.apply_compression(wrapped, divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER))
    wrapped.train()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = [p.detach().clone() for p in trainable]
    for _ in range(3):
        loss = wrapped(**batch, labels=labels).loss + 0.1 * divico.last_report(wrapped).kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(**batch).logits
    divico.save_compressor(wrapped, tmp_path / "c")
    loaded = tiny_video_llava()
    divico.load_compressor(loaded, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
