"""Video-LLaVA (image and video inputs, frames x tokens per frame) on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

import divico
from tiny_models import randomize_compressor

IMAGE, VIDEO, PAD, VOCAB = 120, 121, 0, 128
IMAGE_SIZE, PATCH = 16, 4
PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16 image tokens (CLS dropped); a video frame keeps CLS: 17 tokens
FRAMES = 4
LAYER = 2
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)


def tiny_video_llava(attn: str = "sdpa", seed: int = 0) -> VideoLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                       rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, video_token_index=VIDEO,
                              vision_feature_select_strategy="default", vision_feature_layer=-1)
    config._attn_implementation = attn
    model = VideoLlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)
    model.set_attn_implementation(attn)
    return model.eval()


def make_batch(specs: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """Left-padded batch; each spec is (images, videos, seed): text, images, videos, text."""
    rows, images, videos = [], [], []
    for num_images, num_videos, seed in specs:
        generator = torch.Generator().manual_seed(seed)
        text = lambda n, g=generator: torch.randint(1, IMAGE, (n,), generator=g).tolist()
        ids = text(3) + ([IMAGE] * PATCHES + text(1)) * num_images + ([VIDEO] * FRAMES * (PATCHES + 1) + text(1)) * num_videos
        rows.append(ids + text(4))
        images += [torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for _ in range(num_images)]
        videos += [torch.randn(FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for _ in range(num_videos)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if images:
        batch["pixel_values"] = torch.stack(images)
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch


SPECS = [(0, 1, 1), (1, 0, 2), (1, 1, 3)]  # video only (68 tokens), image only (16), both (84)



@pytest.fixture(scope="module")
def model():
    return tiny_video_llava()


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "model" in request.fixturenames:
        divico.remove_compression(request.getfixturevalue("model"))


def test_keep_all_is_bit_identical(model):
    batch = make_batch(SPECS[:2])
    with torch.no_grad():
        ref_logits, ref_tokens = model(**batch).logits, model.generate(**batch, **GEN)
    for config in (dict(method="fastv", keep_ratio=1.0), dict(method="divico", keep_ratio=1.0, per_frame_keep=True),
                   dict(method="deco", keep_tokens=PATCHES)):
        divico.apply_compression(model, divico.CompressionConfig(layer=LAYER, **config))
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, ref_logits), config
            assert torch.equal(model.generate(**batch, **GEN), ref_tokens), config
        divico.remove_compression(model)


def test_scores_match_eager_attention():
    batch = make_batch(SPECS)
    eager = tiny_video_llava(attn="eager")
    with torch.no_grad():
        expected = eager(**batch, output_attentions=True).attentions[LAYER - 1][:, :, -1, :].mean(dim=1)
    model = tiny_video_llava()
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER))
    with torch.no_grad():
        model(**batch)
    report = divico.last_report(model)
    assert report.num_visual.tolist() == [68, 16, 84] and report.num_kept.tolist() == [17, 4, 21]
    for row in range(3):
        count = int(report.num_visual[row])
        positions = report.visual_positions[row, :count]
        torch.testing.assert_close(report.scores[row, :count], expected[row, positions], atol=1e-5, rtol=0)


def test_per_frame_keep_and_cache_lengths(model):
    batch = make_batch(SPECS[:1])
    length = batch["input_ids"].shape[1]
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=3, layer=LAYER, per_frame_keep=True))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    report = divico.last_report(model)
    frame_of_kept = (report.kept_positions[0] - int(report.visual_positions[0, 0])) // (PATCHES + 1)
    assert frame_of_kept.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # 3 tokens from each of the 4 frames
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [length] * 2 + [length - 68 + 12] * 2
    divico.remove_compression(model)
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=4))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    # DeCo pools each frame's 4x4 grid to 2x2 and keeps its CLS: 4 x (1 + 4) tokens, in every layer.
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [length - 68 + 20] * 4


@pytest.mark.parametrize("method", ["fastv", "divico"])
def test_cached_decode_equals_uncached_forward_on_same_kept_set(model, method):
    batch = make_batch(SPECS)
    divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.2, layer=LAYER))
    randomize_compressor(model)
    runtime = divico.get_runtime(model)
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        next_ids = prefill.logits[:, -1, :IMAGE].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)
        decode = model(input_ids=next_ids, attention_mask=mask, past_key_values=prefill.past_key_values,
                       use_cache=True)
        full_ids = torch.cat([batch["input_ids"], next_ids], 1)
        kept = runtime.report.kept_positions
        visual = (full_ids == IMAGE) | (full_ids == VIDEO)
        positions = torch.arange(full_ids.shape[1])
        keep = torch.stack([~visual[r] | torch.isin(positions, kept[r][kept[r] >= 0]) for r in range(3)])
        runtime.method.select = lambda scores, visual_mask, groups: keep
        uncached = model(**dict(batch, input_ids=full_ids, attention_mask=mask), use_cache=False)
    torch.testing.assert_close(decode.logits[:, -1], uncached.logits[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [dict(method="divico", keep_ratio=0.25), dict(method="deco", keep_tokens=4)],
                         ids=["divico", "deco"])
def test_batch_equals_single_runs(model, config):
    divico.apply_compression(model, divico.CompressionConfig(layer=LAYER, **config))
    randomize_compressor(model)
    batch = make_batch(SPECS)
    with torch.no_grad():
        batch_logits = model(**batch).logits[:, -1]
        batch_tokens = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1]:]
        for row, spec in enumerate(SPECS):
            one = make_batch([spec])
            torch.testing.assert_close(batch_logits[row], model(**one).logits[0, -1], atol=1e-4, rtol=0)
            assert torch.equal(batch_tokens[row], model.generate(**one, **GEN)[0, one["input_ids"].shape[1]:])


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
    fresh = tiny_video_llava()
    divico.load_compressor(fresh, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=0)
