"""Values pinned against an independent computation (issue 21), not "the output changed".

* g_theta's input is ``concat(v_s, mean of the removed layer-K hidden states)``, rebuilt here from layer K-1's output
  (a forward hook) and the kept positions of ``last_report``; layer K then receives the kept sequence with
  ``v_s + mu`` at the kept visual slots (eval mode), left-padded, with the kept tokens' own RoPE rows.
* The reported KL is the closed form on fc2's (mu, log sigma) with the configured reduction (Eq. 8: summed over
  the d dimensions, averaged over the kept tokens; ``"mean"``: averaged over dimensions too).
* DeCo's pooled features are region means of the vision features computed by hand (adaptive-pooling regions), on a
  square (LLaVA) and a non-square (Qwen2-VL) patch grid, to square and non-square pooled grids.
* FLOPs differences between methods, counted by FlopCounterMode (deterministic), equal the products of the added or
  removed work computed from the modules' sizes, exactly.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import divico
from contract_cases import one_torch_thread
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, measure_flops
from tiny_models import (
    IMAGE_TOKEN_ID,
    make_batch,
    prompt_ids,
    qwen_batch,
    qwen_item,
    qwen_prompt,
    randomize_compressor,
    tiny_llava,
    tiny_qwen,
)

LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def mixed_inputs() -> dict[str, torch.Tensor]:
    """One image / two images / text only: padding in the batch and in the compressed sequence."""
    prompts = [prompt_ids(1, 5, 7, seed=1), prompt_ids(2, 3, 4, seed=2), prompt_ids(0, 9, 6, seed=3)]
    return make_batch(prompts, [1, 2, 0])


def kl_options(reduction: str | None) -> dict[str, Any]:
    """Config options that set g_theta's KL reduction (None: the default)."""
    return {} if reduction is None else {"kl_reduction": reduction}


class Captured:
    """Tensors seen by forward hooks during one forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.values: dict[str, Any] = {}
        self.handles: list[Any] = []
        layers = model.model.language_model.layers
        compressor = divico.get_runtime(model).compressor
        # Registered after apply_compression: layer K's pre-hook runs after divico's, so it sees the compressed input.
        self.handles += [
            layers[LAYER - 1].register_forward_hook(self._store("layer_k_minus_1_out", output=True)),
            layers[LAYER - 1].register_forward_pre_hook(self._store_kwargs("layer_k_minus_1_kwargs"), with_kwargs=True),
            layers[LAYER].register_forward_pre_hook(self._store_kwargs("layer_k_kwargs"), with_kwargs=True),
            compressor.fc1.register_forward_pre_hook(self._store("fc1_in")),
            compressor.fc2.register_forward_hook(self._store("fc2_out", output=True)),
        ]

    def _store(self, name: str, output: bool = False):
        def hook(module, args, *rest):
            value = rest[0] if output else args[0]
            self.values[name] = value.detach().clone()
        return hook

    def _store_kwargs(self, name: str):
        def hook(module, args, kwargs):
            self.values[name] = (args, dict(kwargs))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_divico(reduction: str | None = None, encoder: str = "variational") -> tuple[Captured, Any, dict]:
    model = tiny_llava(seed=0)
    config = divico.CompressionConfig("divico", keep_ratio=0.25, layer=LAYER, encoder=encoder, **kl_options(reduction))
    divico.apply_compression(model, config)
    randomize_compressor(model, seed=5)
    fc2 = divico.get_runtime(model).compressor.fc2
    with torch.no_grad():  # moderate (mu, log sigma), so every term of the KL's closed form weighs in
        fc2.weight.mul_(0.1)
        fc2.bias.zero_()
        if encoder == "variational":
            fc2.bias[64:] = math.log(0.5)
    captured = Captured(model)
    inputs = mixed_inputs()
    with torch.no_grad():
        model(**inputs)
    captured.remove()
    return captured, divico.last_report(model), inputs


def kept_and_removed(report: Any, row: int) -> tuple[list[int], list[int]]:
    kept = [p for p in report.kept_positions[row].tolist() if p >= 0]
    visual = [p for p in report.visual_positions[row].tolist() if p >= 0]
    return kept, [p for p in visual if p not in set(kept)]


def test_g_theta_reads_the_kept_tokens_and_the_mean_of_the_removed_ones():
    captured, report, _ = run_divico()
    hidden = captured.values["layer_k_minus_1_out"].double()  # (B, N, d): layer K's input before compression
    rows = []
    for b in range(hidden.shape[0]):
        kept, removed = kept_and_removed(report, b)
        if not kept:
            continue
        assert removed, "every image loses tokens at keep_ratio 0.25"
        pooled = hidden[b, removed].sum(dim=0) / len(removed)  # v_p, by hand
        rows += [torch.cat([hidden[b, p], pooled]) for p in kept]
    expected = torch.stack(rows)  # (R, 2d), sample-major, kept positions in prompt order
    got = captured.values["fc1_in"].double()
    assert got.shape == expected.shape == (16 + 32, 2 * 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_layer_k_gets_kept_tokens_plus_the_gap_at_their_own_positions():
    """Eval mode: ``v_s + mu`` at kept visual slots, other kept tokens unchanged, left padding zero; RoPE rows and
    position ids of the kept tokens' original positions."""
    captured, report, inputs = run_divico()
    hidden = captured.values["layer_k_minus_1_out"]
    mu = captured.values["fc2_out"][:, :64]
    args, kwargs = captured.values["layer_k_kwargs"]
    compressed = args[0] if args else kwargs["hidden_states"]
    batch, length, _ = hidden.shape
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    keep_lists = []  # per sample: every position that stays (text, padding and kept visual), in order
    for b in range(batch):
        _, removed = kept_and_removed(report, b)
        keep_lists.append([p for p in range(length) if p not in set(removed)])
    width = max(len(k) for k in keep_lists)
    assert compressed.shape == (batch, width, 64) and report.seq_len_after == width
    expected = torch.zeros(batch, width, 64)  # slots that compression adds on the left stay zero
    real = torch.zeros(batch, width, dtype=torch.bool)  # slots holding a real (not padding) token
    gap_row = 0
    for b, keep in enumerate(keep_lists):
        start = width - len(keep)
        for slot, p in enumerate(keep, start=start):
            expected[b, slot] = hidden[b, p]
            real[b, slot] = bool(inputs["attention_mask"][b, p])
            if visual[b, p]:
                expected[b, slot] += mu[gap_row]
                gap_row += 1
    assert gap_row == mu.shape[0]
    torch.testing.assert_close(compressed, expected, atol=1e-6, rtol=1e-6)
    # RoPE (cos, sin) of each kept token is the row of its original position.
    _, before = captured.values["layer_k_minus_1_kwargs"]
    for full, gathered in zip(before["position_embeddings"], kwargs["position_embeddings"]):
        for b, keep in enumerate(keep_lists):
            source = full[b] if full.shape[0] == batch else full[0]
            torch.testing.assert_close(gathered[b, width - len(keep):], source[keep], atol=0, rtol=0)
    # The mask of layers >= K: a real token sees the real tokens up to itself, never padding.
    mask = kwargs["attention_mask"]
    assert mask is not None
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    for b in range(batch):
        for q in range(width):
            if real[b, q]:
                assert allowed[b, q].tolist() == [bool(real[b, k]) and k <= q for k in range(width)], (b, q)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reported_kl_is_the_closed_form_on_fc2s_mu_and_log_sigma(reduction):
    captured, report, _ = run_divico(reduction)
    mu, log_sigma = captured.values["fc2_out"].double().split(64, dim=-1)
    per_element = 0.5 * (mu.square() + (2 * log_sigma).exp() - 1.0 - 2 * log_sigma)  # KL(N(mu, sigma^2) || N(0, 1))
    if reduction == "sum":  # Eq. 8: the KL of a d-dimensional Gaussian, averaged over the kept tokens
        expected = per_element.sum(dim=-1).mean()
    else:
        expected = per_element.mean()
    assert report.kl is not None
    assert float(report.kl) == pytest.approx(float(expected), rel=1e-5)
    # Not vacuous: the two reductions differ by the factor d here.
    assert float(per_element.sum(dim=-1).mean()) == pytest.approx(64 * float(per_element.mean()), rel=1e-9)


def test_default_kl_is_eq8_summed_over_dimensions():
    captured, report, _ = run_divico(None)
    mu, log_sigma = captured.values["fc2_out"].double().split(64, dim=-1)
    eq8 = (0.5 * (mu.square() + (2 * log_sigma).exp() - 1.0 - 2 * log_sigma)).sum(dim=-1).mean()
    assert float(report.kl) == pytest.approx(float(eq8), rel=1e-5)


# --- DeCo ----------------------------------------------------------------------------------------------------
def region_means(cells: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Adaptive average pooling by hand: output cell (i, j) is the mean of input rows floor(i H / h) ..
    ceil((i + 1) H / h) - 1 and the same for columns. (n, H, W, d) -> (n, h, w, d), in float64."""
    n, height, width, dim = cells.shape
    out = torch.zeros(n, out_h, out_w, dim, dtype=torch.float64)
    for i in range(out_h):
        r0, r1 = (i * height) // out_h, math.ceil((i + 1) * height / out_h)
        for j in range(out_w):
            c0, c1 = (j * width) // out_w, math.ceil((j + 1) * width / out_w)
            out[:, i, j] = cells[:, r0:r1, c0:c1].double().mean(dim=(1, 2))
    return out


@pytest.mark.parametrize("keep_tokens", [16, 12])  # 8 x 8 -> 4 x 4, and to the non-square 3 x 4
def test_deco_pools_llava_patch_features_to_region_means(keep_tokens):
    model = tiny_llava(seed=0)
    projector = model.model.multi_modal_projector
    seen: list[torch.Tensor] = []
    handle = projector.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    inputs = make_batch([prompt_ids(2, 3, 4, seed=2)], [2])
    with torch.no_grad():
        model(**inputs)  # uncompressed: the projector sees every patch feature (2, 64, d_vision)
        divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=keep_tokens))
        handle.remove()
        handle = projector.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        model(**inputs)
    handle.remove()
    features, pooled = seen
    grids = divico.last_report(model).extra["pooled_grids"][0]
    assert len(grids) == 2 and all((g.h, g.w) == (grids[0].h, grids[0].w) for g in grids)
    h, w = grids[0].h, grids[0].w
    assert h * w == keep_tokens and (h == w) == (keep_tokens == 16)
    expected = region_means(features.reshape(2, 8, 8, -1), h, w).reshape(2, h * w, -1)
    assert pooled.shape == expected.shape
    torch.testing.assert_close(pooled.double(), expected, atol=1e-6, rtol=1e-6)
    reference = F.adaptive_avg_pool2d(features.reshape(2, 8, 8, -1).permute(0, 3, 1, 2), (h, w))
    torch.testing.assert_close(pooled, reference.permute(0, 2, 3, 1).reshape(2, h * w, -1), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(pooled, F.adaptive_max_pool2d(features.reshape(2, 8, 8, -1).permute(0, 3, 1, 2),
                                                            (h, w)).permute(0, 2, 3, 1).reshape(2, h * w, -1))


@pytest.mark.parametrize("keep_tokens", [6, 8])  # a 4 x 6 merged grid pooled to 2 x 3 / 2 x 4
def test_deco_pools_a_non_square_qwen_grid_to_region_means(keep_tokens):
    model = tiny_qwen("qwen2_vl")
    item = qwen_item("image", 1, 8, 12, seed=1)  # 8 x 12 patches -> 4 x 6 LLM tokens after the 2 x 2 merge
    inputs = qwen_batch([qwen_prompt([item], 4, 6, seed=1)])
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    embeds: list[torch.Tensor] = []
    divico.apply_compression(model, divico.CompressionConfig("deco", keep_tokens=keep_tokens))
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    grid = divico.last_report(model).extra["pooled_grids"][0][0]
    assert grid.t == 1 and grid.h * grid.w == keep_tokens and grid.h != grid.w
    # The shortened prompt keeps the first h' w' placeholders of the item's run, in order.
    ids = inputs["input_ids"][0]
    placeholder = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    shortened = torch.cat([ids[: placeholder[0] + keep_tokens], ids[placeholder[-1] + 1:]])
    rows = embeds[0][0][shortened == IMAGE_TOKEN_ID]
    expected = region_means(features.reshape(1, 4, 6, -1), grid.h, grid.w).reshape(keep_tokens, -1)
    torch.testing.assert_close(rows.double(), expected, atol=1e-5, rtol=1e-5)


# --- FLOPs ---------------------------------------------------------------------------------------------------
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=3, batch_size=2, images=2)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, dict[str, torch.Tensor]]:
    config = build_config("tiny-llava")
    model = build_random_model(config, seed=0)
    return config, model, build_inputs(config, TINY_PROMPT, seed=0)


def counted(model: Any, inputs: dict[str, torch.Tensor], config: divico.CompressionConfig | None) -> int:
    if config is not None:
        divico.apply_compression(model, config)
    try:
        with torch.inference_mode():
            flops, _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
    finally:
        divico.remove_compression(model)
    return flops


def linear_flops(module: torch.nn.Linear, rows: int) -> int:
    return 2 * rows * module.in_features * module.out_features


def decoder_layer_flops(model: Any, tokens: int) -> int:
    """One Llama decoder layer on ``tokens`` tokens of one sample: its linear layers, plus the dense SDPA count
    (scores + weighted sum, 2 x 2 x head_dim per query head and key)."""
    layer = model.model.language_model.layers[0]
    attention = layer.self_attn
    linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    heads = attention.config.num_attention_heads
    return sum(linear_flops(m, tokens) for m in linears) + 4 * heads * attention.head_dim * tokens * tokens


def test_fastv_keep_all_adds_exactly_its_scoring(tiny):
    _, model, inputs = tiny
    batch, length = inputs["input_ids"].shape
    text = model.model.language_model.config
    head_dim = text.hidden_size // text.num_attention_heads
    none = counted(model, inputs, None)
    sdpa = counted(model, inputs, divico.CompressionConfig("fastv", keep_ratio=1.0, layer=LAYER))
    full = counted(model, inputs, divico.CompressionConfig("fastv", keep_ratio=1.0, layer=LAYER,
                                                           scoring="full_attention"))
    # One (H, 1, N) product of the last query with every key per sample; the reference: the whole (H, N, N).
    assert sdpa - none == batch * 2 * text.num_attention_heads * head_dim * length
    assert full - none == batch * 2 * text.num_attention_heads * head_dim * length * length


def test_fastv_saves_exactly_the_shorter_layers(tiny):
    _, model, inputs = tiny
    batch, length = inputs["input_ids"].shape
    layers = len(model.model.language_model.layers)
    all_kept = counted(model, inputs, divico.CompressionConfig("fastv", keep_ratio=1.0, layer=LAYER))
    fastv = counted(model, inputs, divico.CompressionConfig("fastv", keep_tokens=20, layer=LAYER))
    short = length - 72 + 20
    saved = (layers - LAYER) * batch * (decoder_layer_flops(model, length) - decoder_layer_flops(model, short))
    assert all_kept - fastv == saved


@pytest.mark.parametrize("encoder", ["variational", "deterministic", "none"])
def test_divico_minus_fastv_is_exactly_g_theta_and_the_pooled_rest(tiny, encoder):
    _, model, inputs = tiny
    batch, length = inputs["input_ids"].shape
    fastv = counted(model, inputs, divico.CompressionConfig("fastv", keep_tokens=20, layer=LAYER))
    config = divico.CompressionConfig("divico", keep_tokens=20, layer=LAYER, encoder=encoder)
    divico.apply_compression(model, config)
    compressor = divico.get_runtime(model).compressor
    divico.remove_compression(model)
    measured = counted(model, inputs, config)
    if encoder == "none":
        assert compressor is None and measured == fastv
        return
    d = model.model.language_model.config.hidden_size
    rows = batch * 20  # kept visual tokens over the batch
    g_theta = linear_flops(compressor.fc1, rows) + linear_flops(compressor.fc2, rows)
    assert compressor.fc1.in_features == 2 * d
    assert compressor.fc2.out_features == (2 * d if encoder == "variational" else d)
    pooled_rest = batch * 2 * length * d  # one (1, N) x (N, d) product per sample
    assert measured - fastv == g_theta + pooled_rest


def test_deco_minus_uncompressed_is_exactly_the_shorter_projector_and_layers(tiny):
    _, model, inputs = tiny
    batch, length = inputs["input_ids"].shape
    layers = len(model.model.language_model.layers)
    none = counted(model, inputs, None)
    deco = counted(model, inputs, divico.CompressionConfig("deco", keep_tokens=9))
    projector = model.model.multi_modal_projector
    images, patches, pooled = 4, 36, 9  # 2 samples x 2 images of 6 x 6 patches, pooled to 3 x 3
    projector_saving = sum(linear_flops(m, images * (patches - pooled))
                           for m in (projector.linear_1, projector.linear_2))
    short = length - 2 * (patches - pooled)
    layer_saving = layers * batch * (decoder_layer_flops(model, length) - decoder_layer_flops(model, short))
    assert none - deco == projector_saving + layer_saving
