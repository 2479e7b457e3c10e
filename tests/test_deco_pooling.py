"""DeCo's pooled grids: near-square (h', w') for every target count, the count really kept reported everywhere.

Expected grids are stated by hand from the rule of :func:`divico.methods.deco.pooled_grid`: the factorisation of the
target count whose pooling windows are closest to square; if its windows are off square by more than 4:3, the
nearest count (ties: the smaller) whose grid is not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import (
    IMAGE_TOKEN_ID,
    PATCH_SIZE,
    VIDEO_LLAVA_FRAMES,
    VIDEO_LLAVA_PATCHES,
    make_batch,
    prompt_ids,
    tiny_llava,
    tiny_llava_config,
    tiny_video_llava,
    video_llava_batch,
    video_llava_prompt,
)
from transformers import LlavaForConditionalGeneration

import divico
from divico.efficiency import build_config, count_flops
from divico.efficiency.presets import PromptShape
from divico.methods.deco import MAX_ASPECT_DISTORTION, DeCo, aspect_distortion, pooled_grid

# Target count on a 24 x 24 grid -> (h', w'), with why (windows are (24 / h') x (24 / w') patches).
EXPECTED_24x24 = {
    10: (3, 3),  # 2 x 5 has 12 x 4.8 windows (2.5:1); 9 = 3 x 3 is 1 away, 11 is prime
    16: (4, 4),
    24: (5, 5),  # 4 x 6 has 6 x 4 windows (3:2); 23 is prime, 25 = 5 x 5 is 1 away
    38: (6, 6),  # 2 x 19 (9.5:1); 37 prime, 39 = 3 x 13 (4.3:1), 36 = 6 x 6 is 2 away (below, taken first)
    64: (8, 8),
    96: (9, 11),  # 8 x 12 (3:2); 95, 97, 94, 98 = 7 x 14 (2:1), 93 fail; 99 = 9 x 11 (11:9) is 3 away
}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("count", sorted(EXPECTED_24x24))
def test_pooled_grid_of_a_24x24_grid_is_near_square(count: int) -> None:
    assert pooled_grid(count, 24, 24) == EXPECTED_24x24[count]


def test_pooled_grid_rule_on_other_grids() -> None:
    assert MAX_ASPECT_DISTORTION == pytest.approx(4 / 3)
    assert aspect_distortion(8, 12, 24, 24) == pytest.approx(1.5)
    assert aspect_distortion(1, 4, 2, 6) == pytest.approx(4 / 3)  # windows 2 x 1.5
    # The shipped testbed grid (168 px / 14 = 12 x 12) at its three rates: round(r * 144) = 10, 16, 24.
    assert [pooled_grid(n, 12, 12) for n in (10, 16, 24)] == [(3, 3), (4, 4), (5, 5)]
    assert pooled_grid(13, 8, 8) == (3, 4)  # 13 prime; 12 = 3 x 4 (windows 8/3 x 2 = 4:3) is 1 away
    assert pooled_grid(12, 24, 24) == (3, 4)  # 3 x 4 and 4 x 3 tie: the smaller h'
    # A non-square grid is judged by its windows: 2 x 6 -> 1 x 4 has 2 x 1.5 windows (4:3), 2 x 2 would be 1 x 3.
    assert pooled_grid(4, 2, 6) == (1, 4)
    # 2 x 4 -> 4: 1 x 4 and 2 x 2 both have 2:1 windows; 2 = 1 x 2 (square windows) and 6 = 2 x 3 tie: the smaller.
    assert pooled_grid(4, 2, 4) == (1, 2)
    # One row cannot hold square windows of sqrt(20 / 4) patches: every count is as lopsided, the count is kept.
    assert pooled_grid(4, 1, 20) == (1, 4)
    assert pooled_grid(576, 24, 24) == (24, 24)
    for bad in (0, 577):
        with pytest.raises(ValueError, match=rf"cannot pool a 24x24 patch grid to {bad} tokens; valid range is "
                                             r"\[1, 576\]"):
            pooled_grid(bad, 24, 24)


def test_pool_is_adaptive_average_pooling_on_the_chosen_grid() -> None:
    """3 x 3 from 6 x 6 by hand (each cell the mean of a 2 x 2 window), and the general case equals torch's op."""
    cells = torch.randn(2, 6, 6, 5, generator=torch.Generator().manual_seed(0))
    pooled = DeCo(divico.CompressionConfig("deco", keep_tokens=10)).pool(cells)  # 10 -> 9 = 3 x 3 (2 x 5: 3:1.2)
    assert pooled.shape == (2, 3, 3, 5)
    for row in range(3):
        for col in range(3):
            window = cells[:, 2 * row:2 * row + 2, 2 * col:2 * col + 2].reshape(2, 4, 5).mean(dim=1)
            torch.testing.assert_close(pooled[:, row, col], window)
    wide = torch.randn(1, 24, 24, 3, generator=torch.Generator().manual_seed(1))
    out = DeCo(divico.CompressionConfig("deco", keep_tokens=96)).pool(wide)
    expected = F.adaptive_avg_pool2d(wide.permute(0, 3, 1, 2), (9, 11)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _llava_24x24() -> LlavaForConditionalGeneration:
    """The tiny LLaVA with 96 px images: a 24 x 24 patch grid (576 image tokens)."""
    torch.manual_seed(0)
    config = tiny_llava_config()
    config.vision_config.image_size = 24 * PATCH_SIZE
    return LlavaForConditionalGeneration(config).eval()


def test_reported_kept_count_and_flops_are_the_pooled_count() -> None:
    model = _llava_24x24()
    text_before, text_after = 3, 4
    ids = torch.randint(1, 100, (text_before + text_after,), generator=torch.Generator().manual_seed(0)).tolist()
    input_ids = torch.tensor([ids[:text_before] + [IMAGE_TOKEN_ID] * 576 + ids[text_before:]])
    pixels = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    seven_b = build_config("llava-1.5-7b", layers=4)
    for count, (height, width) in EXPECTED_24x24.items():
        kept = height * width
        for keep in ({"keep_ratio": count / 576}, {"keep_tokens": count}):
            config = divico.CompressionConfig("deco", **keep)
            with divico.compressed(model, config), torch.no_grad():
                out = model(input_ids=input_ids, pixel_values=pixels, use_cache=True)
                report = divico.last_report(model)
            assert report.num_visual.tolist() == [576] and report.num_kept.tolist() == [kept], (count, keep)
            assert [(g.h, g.w) for g in report.extra["pooled_grids"][0]] == [(height, width)]
            assert report.seq_len_after == text_before + text_after + kept
            assert [out.cache.get_seq_length(i) for i in range(4)] == [text_before + text_after + kept] * 4
            assert DeCo(config).kept_visual_tokens(images=1, tokens_per_image=576) == kept
            flops = count_flops(seven_b, PromptShape(visual_tokens=576, text_tokens=60), method="deco", **keep)
            assert flops.keep_tokens == kept and flops.per_layer == [60 + kept] * 4
            fastv = count_flops(seven_b, PromptShape(visual_tokens=576, text_tokens=60), method="fastv", **keep)
            assert fastv.keep_tokens == count  # layer-level methods keep the count itself


def test_every_image_of_a_multi_image_prompt_is_pooled_to_the_near_square_grid() -> None:
    model = tiny_llava()
    batch = make_batch([prompt_ids(2, 3, 4, seed=0), prompt_ids(1, 2, 5, seed=1)], [2, 1])
    with divico.compressed(model, divico.CompressionConfig("deco", keep_tokens=13)), torch.no_grad():
        model(**batch)
        report = divico.last_report(model)
    # Each 8 x 8 grid: 13 is prime (1 x 13 does not fit), 12 = 3 x 4 (4:3 windows) is 1 away.
    assert report.num_visual.tolist() == [128, 64] and report.num_kept.tolist() == [24, 12]
    assert [[(g.h, g.w) for g in grids] for grids in report.extra["pooled_grids"]] == [[(3, 4), (3, 4), (3, 4)]]


def test_every_video_frame_is_pooled_to_the_near_square_grid() -> None:
    model = tiny_video_llava()
    batch = video_llava_batch([video_llava_prompt(num_images=1, num_videos=1, seed=3)])
    with divico.compressed(model, divico.CompressionConfig("deco", keep_tokens=3)), torch.no_grad():
        model(**batch)
        report = divico.last_report(model)
    # A 4 x 4 grid and 3: 1 x 3 has 4 x 4/3 windows (3:1); 2 = 1 x 2 (2:1) fails, 4 = 2 x 2 is taken.
    # The image keeps 4; each of the 4 video frames keeps its CLS token and 2 x 2 pooled patches.
    assert report.num_visual.tolist() == [VIDEO_LLAVA_PATCHES + VIDEO_LLAVA_FRAMES * (VIDEO_LLAVA_PATCHES + 1)]
    assert report.num_kept.tolist() == [4 + VIDEO_LLAVA_FRAMES * (1 + 4)]
