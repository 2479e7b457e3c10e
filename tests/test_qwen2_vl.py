"""Qwen2-VL / Qwen2.5-VL (3-D mRoPE, dynamic resolution, video, sliding-window layers) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import divico
from tiny_models import randomize_compressor

IMAGE, VIDEO, START, END, PAD = 120, 121, 122, 123, 0
VOCAB, MERGE, PATCH, TEMPORAL = 128, 2, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
LAYER = 2
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)


def tiny_qwen(kind: str = "qwen2_vl", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """4 text layers (hidden 64, GQA 4/2, mRoPE sections 2/3/3), layers >= 1 use a 24-token sliding window."""
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                use_sliding_window=True, sliding_window=24, max_window_layers=1)
    if kind == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                      temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                      patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, window_size=8,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                          vision_start_token_id=START, vision_end_token_id=END)
    config._attn_implementation = attn
    model = model_class(config)
    with torch.no_grad():  # std 0.02 init gives near-uniform attention: scale up so selection matters
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)
    model.set_attn_implementation(attn)
    return model.eval()


def item(kind: str, t: int, h: int, w: int, seed: int) -> dict:
    """An image (t=1) or a video of t temporal patches with an (h, w) patch grid, and its pixel rows."""
    generator = torch.Generator().manual_seed(seed)
    return dict(kind=kind, thw=(t, h, w), pixels=torch.randn(t * h * w, PATCH_DIM, generator=generator))


def prompt(items: list[dict], before: int, after: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, IMAGE, (n,), generator=generator).tolist()
    ids = text(before)
    for it in items:
        t, h, w = it["thw"]
        ids += [START] + [IMAGE if it["kind"] == "image" else VIDEO] * (t * h * w // MERGE**2) + [END] + text(1)
    return dict(ids=ids + text(after), items=items)


def make_batch(prompts: list[dict]) -> dict[str, torch.Tensor]:
    """Left-padded batch as the Qwen2-VL processor builds it (ids, mask, mm_token_type_ids, pixels, grids)."""
    width = max(len(p["ids"]) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p["ids"]):] = torch.tensor(p["ids"])
        mask[row, width - len(p["ids"]):] = 1
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int())
    for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
        items = [it for p in prompts for it in p["items"] if it["kind"] == kind]
        if items:
            batch[pixels_key] = torch.cat([it["pixels"] for it in items])
            batch[grid_key] = torch.tensor([it["thw"] for it in items])
    return batch


def mixed_prompts() -> list[dict]:
    """16 image tokens / 12 image + 16 video tokens (2 frames) / text only: different visual counts per sample."""
    return [prompt([item("image", 1, 8, 8, 1)], 4, 5, seed=1),
            prompt([item("image", 1, 4, 12, 2), item("video", 2, 4, 8, 3)], 2, 3, seed=2),
            prompt([], 6, 4, seed=3)]



@pytest.fixture(scope="module")
def model():
    return tiny_qwen("qwen2_vl")


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "model" in request.fixturenames:
        divico.remove_compression(request.getfixturevalue("model"))


def test_available_models_lists_qwen():
    assert {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"} <= set(divico.available_models())


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_keep_all_is_bit_identical(kind):
    model = tiny_qwen(kind)
    batch = make_batch(mixed_prompts()[:2])
    with torch.no_grad():
        ref_logits, ref_tokens = model(**batch).logits, model.generate(**batch, **GEN)
    for config in (dict(method="fastv", keep_ratio=1.0), dict(method="divico", keep_ratio=1.0),
                   dict(method="deco", keep_ratio=1.0)):
        divico.apply_compression(model, divico.CompressionConfig(layer=LAYER, **config))
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, ref_logits), config
            assert torch.equal(model.generate(**batch, **GEN), ref_tokens), config
        divico.remove_compression(model)


def test_scores_match_eager_attention_with_sliding_window():
    batch = make_batch(mixed_prompts())
    eager = tiny_qwen("qwen2_vl", attn="eager")
    assert eager.config.text_config.layer_types[LAYER - 1] == "sliding_attention"
    with torch.no_grad():
        expected = eager(**batch, output_attentions=True).attentions[LAYER - 1][:, :, -1, :].mean(dim=1)
    for attn in ("sdpa", "eager"):
        model = tiny_qwen("qwen2_vl", attn=attn)
        divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.25, layer=LAYER))
        with torch.no_grad():
            model(**batch)
        report = divico.last_report(model)
        for row in range(3):
            count = int(report.num_visual[row])
            positions = report.visual_positions[row, :count]
            torch.testing.assert_close(report.scores[row, :count], expected[row, positions], atol=1e-5, rtol=0)
        assert report.num_visual.tolist() == [16, 28, 0] and report.num_kept.tolist() == [4, 7, 0]


def test_kv_cache_lengths_per_layer(model):
    batch = make_batch(mixed_prompts()[:2])
    length = batch["input_ids"].shape[1]
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    # Padding stays: the batch shrinks by the fewest tokens any sample loses (sample 0: 16 -> 4 visual).
    compressed = length - (16 - 4)
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [length] * LAYER + [compressed] * 2
    assert out.logits.shape[1] == length
    divico.remove_compression(model)
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=4))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    # DeCo: image 4x4 -> 2x2, image 2x6 -> 1x4, video 2 x (2x4) -> 2 x (1x4): 16 -> 4 and 28 -> 12, every layer.
    assert divico.last_report(model).num_kept.tolist() == [4, 12]
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [length - (16 - 4)] * 4


@pytest.mark.parametrize("method", ["divico", "deco"])
def test_cached_decode_equals_uncached_forward_on_same_kept_set(model, method):
    prompts = mixed_prompts()
    batch = make_batch(prompts)
    config = dict(keep_ratio=0.25, layer=LAYER) if method == "divico" else dict(keep_tokens=4)
    divico.apply_compression(model, divico.CompressionConfig(method, **config))
    randomize_compressor(model)
    runtime = divico.get_runtime(model)
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        next_ids = prefill.logits[:, -1, :IMAGE].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)
        # Full-prompt mRoPE position of the new token, as generate() passes it (transformers 5.24 mis-sizes the
        # positions of a plain decode call that gives a 2-D mask and no position_ids).
        full_positions = model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
            video_grid_thw=batch["video_grid_thw"], attention_mask=batch["attention_mask"])[0]
        next_position = (full_positions.amax(dim=(0, 2)) + 1).view(1, -1, 1).expand(3, -1, -1)
        decode = model(input_ids=next_ids, attention_mask=mask, position_ids=next_position,
                       past_key_values=prefill.past_key_values, use_cache=True)
        full = dict(batch, input_ids=torch.cat([batch["input_ids"], next_ids], 1), attention_mask=mask,
                    mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(next_ids).int()], 1))
        if method == "divico":  # force the prefill's kept set (scores of the longer prompt may differ)
            kept = runtime.report.kept_positions
            visual = (full["input_ids"] == IMAGE) | (full["input_ids"] == VIDEO)
            positions = torch.arange(full["input_ids"].shape[1])
            keep = torch.stack([~visual[r] | torch.isin(positions, kept[r][kept[r] >= 0]) for r in range(3)])
            runtime.method.select = lambda scores, visual_mask, groups: keep
        uncached = model(**full, use_cache=False)
    torch.testing.assert_close(decode.logits[:, -1], uncached.logits[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config", [dict(method="fastv", keep_ratio=0.25), dict(method="divico", keep_ratio=0.25, per_frame_keep=True),
               dict(method="deco", keep_tokens=4)], ids=["fastv", "divico-per-frame", "deco"])
def test_batch_equals_single_runs(model, config):
    prompts = mixed_prompts()
    divico.apply_compression(model, divico.CompressionConfig(layer=LAYER, **config))
    if config["method"] != "fastv":
        randomize_compressor(model)
    batch = make_batch(prompts)
    with torch.no_grad():
        batch_logits = model(**batch).logits[:, -1]
        batch_tokens = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1]:]
        for row, one_prompt in enumerate(prompts):
            one = make_batch([one_prompt])
            torch.testing.assert_close(batch_logits[row], model(**one).logits[0, -1], atol=1e-4, rtol=0)
            assert torch.equal(batch_tokens[row], model.generate(**one, **GEN)[0, one["input_ids"].shape[1]:])


def test_per_frame_keep_keeps_a_share_of_every_frame(model):
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
    fresh = tiny_qwen("qwen2_5_vl")
    divico.load_compressor(fresh, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=0)


def test_deco_save_load_round_trip(tmp_path, model):
    batch = make_batch(mixed_prompts())
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=4))
    randomize_compressor(model, seed=7)
    with torch.no_grad():
        expected = model(**batch).logits
    divico.save_compressor(model, tmp_path / "d")
    fresh = tiny_qwen("qwen2_vl")
    divico.load_compressor(fresh, tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
