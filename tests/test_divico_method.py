"""DiViCo's compress step, its gathers and its g_theta width, checked against a per-token reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import randomize_compressor, sample, tiny_llava

import divico
from divico.config import CompressionConfig
from divico.efficiency import build_config, count_flops
from divico.efficiency.presets import PromptShape
from divico.methods.base import TextShape
from divico.methods.divico import DEFAULT_MAX_ENCODER_WIDTH, DiViCo, GapEncoder, gaussian_kl
from divico.selection import TokenSelection, top_k_keep_mask


def _selection() -> tuple[TokenSelection, torch.Tensor]:
    """Three samples: two images of different sizes (so the compressed sequence is padded) and one without."""
    length = 40
    visual = torch.zeros(3, length, dtype=torch.bool)
    visual[0, 5:30] = True
    visual[1, 2:20] = True
    scores = torch.rand(3, length, generator=torch.Generator().manual_seed(0))
    keep = top_k_keep_mask(scores, visual, torch.tensor([4, 7, 0]))
    return TokenSelection.from_keep_mask(keep, visual), visual


def _encoder(hidden: int, width: int, dtype: torch.dtype) -> GapEncoder:
    encoder = GapEncoder(hidden, width, variational=True, init_sigma=1e-2)
    torch.nn.init.normal_(encoder.fc2.weight, std=0.3, generator=torch.Generator().manual_seed(1))
    return encoder.to(dtype).eval()


def _reference(hidden: torch.Tensor, selection: TokenSelection, encoder: GapEncoder) -> torch.Tensor:
    """Token by token: the kept sequence, and v_s + g_theta(concat(v_s, mean of the removed)) at kept visual slots."""
    batch, width = selection.index.shape
    out = torch.zeros(batch, width, hidden.shape[-1], dtype=hidden.dtype)
    for b in range(batch):
        removed = hidden[b][selection.removed_visual[b]].float()
        pooled = removed.mean(dim=0) if removed.shape[0] else torch.zeros(hidden.shape[-1])
        for m in range(width):
            if not selection.valid[b, m]:
                continue
            row = hidden[b, selection.index[b, m]]
            if selection.kept_visual[b, m]:
                gap = encoder(row[None], pooled.to(hidden.dtype)[None])[0]
                row = row + gap.to(hidden.dtype)
            out[b, m] = row
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_matches_the_per_token_reference(dtype) -> None:
    selection, _ = _selection()
    assert bool((~selection.valid).any())  # padding slots are exercised
    hidden = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    encoder = _encoder(16, 8, dtype)
    method = DiViCo(CompressionConfig("divico", keep_tokens=4))
    with torch.no_grad():
        out = method.compress(hidden, selection, encoder)
        expected = _reference(hidden, selection, encoder)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert out.dtype == dtype
    assert encoder.last_kl is not None and encoder.last_kl.dtype == torch.float32  # float32 for bf16 models too


def test_compress_gradients_reach_the_hidden_states_and_g_theta() -> None:
    selection, _ = _selection()
    hidden = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    encoder = _encoder(16, 8, torch.float32).train()
    out = DiViCo(CompressionConfig("divico", keep_tokens=4)).compress(hidden, selection, encoder)
    (out.square().sum() + encoder.last_kl).backward()
    assert hidden.grad is not None
    # Removed visual tokens feed v_p; the third sample (no image) only passes its tokens through.
    assert float(hidden.grad[0][selection.removed_visual[0]].abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in encoder.parameters())


@pytest.mark.parametrize(
    ("shape", "seq_dim"),
    [((3, 40, 5), 1), ((1, 40, 5), 1), ((2, 3, 40, 5), 2), ((1, 40, 5), -2), ((3, 40), 1), ((1, 40), -1)],
)
@pytest.mark.parametrize("fill", [None, 0])
def test_gather_equals_torch_gather(shape, seq_dim, fill) -> None:
    selection, _ = _selection()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    dim = seq_dim % len(shape)
    sizes = list(shape)
    sizes[dim - 1] = 3
    view = [1] * len(shape)
    view[dim - 1], view[dim] = selection.index.shape
    target = list(sizes)
    target[dim] = selection.compressed_length
    expected = x.expand(sizes).gather(dim, selection.index.view(view).expand(target))
    if fill is not None:
        expected = expected.masked_fill(~selection.valid.view(view).expand(target), fill)
    assert torch.equal(selection.gather(x, seq_dim=seq_dim, fill=fill), expected)
    with pytest.raises(ValueError, match="batch size 3 or 1"):
        selection.gather(torch.zeros(2, 40), seq_dim=1)


def test_default_width_is_min_of_d_and_512_and_flops_follow_the_built_encoder() -> None:
    method = DiViCo(CompressionConfig("divico", keep_tokens=64))
    assert DEFAULT_MAX_ENCODER_WIDTH == 512
    assert [method.encoder_width(d) for d in (64, 576, 4096, 5120)] == [64, 512, 512, 512]
    explicit = DiViCo(CompressionConfig("divico", keep_tokens=64, encoder_hidden_size=288))
    assert explicit.encoder_width(576) == explicit.encoder_width(4096) == 288
    # The analytic count is the product count of the g_theta that build_compressor would build.
    config = build_config("llava-1.5-7b", layers=4)
    breakdown = count_flops(config, PromptShape(visual_tokens=576, text_tokens=60), method="divico",
                            keep_tokens=64, layer=2)
    encoder = GapEncoder(4096, method.encoder_width(4096), variational=True, init_sigma=1e-2)
    per_row = sum(layer.in_features * layer.out_features for layer in (encoder.fc1, encoder.fc2))
    assert breakdown.compressor == 64 * 2 * per_row + 2 * 636 * 4096
    assert method.overhead_flops(TextShape(4096, 32, 128), 636, 64)["compressor"] == breakdown.compressor


def test_kl_is_float32_and_zero_for_no_rows() -> None:
    empty = gaussian_kl(torch.zeros(0, 4, dtype=torch.bfloat16), torch.zeros(0, 4, dtype=torch.bfloat16))
    assert empty.dtype == torch.float32 and float(empty) == 0.0
    mu = torch.linspace(-1, 1, 12).view(3, 4)
    sigma = torch.linspace(0.2, 2.0, 12).view(3, 4)
    per_token = (0.5 * (mu**2 + sigma**2 - 1 - 2 * sigma.log())).sum(dim=1)  # Eq. 8: a sum over the 4 dimensions
    closed = float(per_token.mean())
    assert float(gaussian_kl(mu.bfloat16(), sigma.log().bfloat16())) == pytest.approx(closed, rel=2e-2)
    assert gaussian_kl(mu.bfloat16(), sigma.log().bfloat16()).dtype == torch.float32


def test_gap_statistics_are_the_gap_to_token_norm_ratio_and_sigma_mean() -> None:
    """``last_stats`` by hand: g_theta made to output fixed (mu, log sigma) for every row."""
    encoder = GapEncoder(4, 8, variational=True, init_sigma=1e-2, kl_reduction="sum")
    mu = torch.tensor([3.0, 0.0, -4.0, 0.0])  # ||mu|| = 5
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.25])
    with torch.no_grad():
        encoder.fc2.bias.copy_(torch.cat([mu, sigma.log()]))
    selected = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 6.0, 8.0, 0.0]])  # norms 1 and 10
    gap = encoder.eval()(selected, torch.zeros(2, 4))
    assert torch.equal(gap, mu.expand(2, 4))  # eval adds mu
    assert float(encoder.last_stats["gap_norm_ratio"]) == pytest.approx((5 / 1 + 5 / 10) / 2)
    assert float(encoder.last_stats["sigma_mean"]) == pytest.approx(float(sigma.mean()))
    expected_kl = 0.5 * sum(m * m + s * s - 1 - 2 * math.log(s) for m, s in zip(mu.tolist(), sigma.tolist()))
    assert float(encoder.last_kl.detach()) == pytest.approx(expected_kl, rel=1e-6)
    deterministic = GapEncoder(4, 8, variational=False, init_sigma=1e-2)
    with torch.no_grad():
        deterministic.fc2.bias.copy_(mu)
    deterministic(selected, torch.zeros(2, 4))
    assert set(deterministic.last_stats) == {"gap_norm_ratio"} and deterministic.last_kl is None
    encoder(selected[:0], torch.zeros(0, 4))
    assert encoder.last_stats == {}
    with pytest.raises(ValueError, match=r"kl_reduction must be one of \('sum', 'mean'\), got 'max'"):
        GapEncoder(4, 8, variational=True, init_sigma=1e-2, kl_reduction="max")


def test_a_float32_encoder_runs_on_bfloat16_hidden_states() -> None:
    """Training keeps g_theta in float32; on a bf16 model without autocast it casts in and back out."""
    selection, _ = _selection()
    hidden = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(5))
    encoder = _encoder(16, 8, torch.float32)
    with torch.no_grad():
        out = DiViCo(CompressionConfig("divico", keep_tokens=4)).compress(hidden.bfloat16(), selection, encoder)
        expected = _reference(hidden.bfloat16(), selection, encoder)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_bench_plans_one_divico_row_per_encoder_width() -> None:
    import argparse

    from divico.commands import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--model", "tiny-llava", "--methods", "none,fastv,divico",
                              "--encoder-hidden-size", "8,16", "--out", "unused"])
    plan = bench._row_plan(args)
    assert [row["name"] for row in plan] == ["none", "fastv", "divico-h8", "divico-h16"]
    assert [bench._compression(row).encoder_hidden_size for row in plan[2:]] == [8, 16]
    assert bench._compression(plan[1]).encoder_hidden_size is None


def test_checkpoint_of_another_width_is_refused_with_a_clear_error(tmp_path):
    model = tiny_llava()
    divico.apply_compression(model, CompressionConfig("divico", keep_ratio=0.25, encoder_hidden_size=8))
    divico.save_compressor(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["compression"]["encoder_hidden_size"] = None  # as an old checkpoint saved under the former default
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"(?s)do not fit the 'compressor' module.*encoder_hidden_size"):
        divico.load_compressor(tiny_llava(), tmp_path)


@pytest.mark.parametrize("method", ["fastv", "divico", "deco"])
def test_bf16_engine_applies_and_generates(method) -> None:
    """A bf16 model, compressed (g_theta / projector perturbed so they act): forward and greedy generate agree."""
    model = tiny_llava().to(torch.bfloat16)
    divico.apply_compression(model, CompressionConfig(method, keep_ratio=0.25, layer=2))
    randomize_compressor(model)
    if method == "divico":
        assert model.divico_compressor.fc1.weight.dtype == torch.bfloat16  # attach casts g_theta to the base
    inputs = sample()
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with torch.no_grad():
        logits = model(**inputs).logits
        report = divico.last_report(model)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    assert report.num_kept.tolist() == [16]
    assert generated[0, inputs["input_ids"].shape[1]] == logits[0, -1].argmax()
    if method == "divico":
        assert report.kl.dtype == torch.float32 and float(report.kl) > 0
